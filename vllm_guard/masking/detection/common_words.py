"""Common English words (PyPI ``wordfreq``, Apache-2.0 code, CC BY-SA data): a capitalised
word that is one ("Burger King", "Best Buy", "Black Friday") is no evidence of a name, while
an unlisted, uncommon one next to a known surname is ("Kuldeep Salvi", "Wiesław Ziętal").

Loaded once (0.3 s; build_detector does it up front). Without ``wordfreq`` the set is empty:
no word is common, so the rules that rely on it accept more and the log says so once.
"""

from __future__ import annotations

import functools
import itertools

from vllm_guard.log import get_logger

logger = get_logger(__name__)
# Zipf frequency 3.0 = once per million words: "taco" 3.7 and "burger" 4.1 are in,
# "madhu" 2.5, "tamer" 2.7 and "okan" 1.3 are out
MIN_ZIPF = 3.0
VERY_COMMON = 4.0  # once per 100k words: "home" 5.8, "abe" 3.6 is not
TOP_N = 60_000  # the English list's words down to zipf ~2.3; those above MIN_ZIPF are kept


@functools.cache
def common_english(min_zipf: float = MIN_ZIPF) -> frozenset[str]:
    try:
        import wordfreq
    except ImportError:
        logger.info("vllm-guard masking: wordfreq not installed; names with an unlisted "
                    "first name are found by NER only (install the 'masking' extra)")
        return frozenset()
    # the list is sorted by frequency
    return frozenset(itertools.takewhile(lambda w: wordfreq.zipf_frequency(w, "en") >= min_zipf,
                                         wordfreq.top_n_list("en", TOP_N)))


def is_common(word: str, min_zipf: float = MIN_ZIPF) -> bool:
    """``word`` (any case) is an English word at least this common."""
    return word.casefold() in common_english(min_zipf)
