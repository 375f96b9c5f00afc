"""Chinese word segmentation for the Chinese-name recognizer: jieba (MIT), its dictionary and
HMM for words no dictionary holds (most personal names are such words).

The dictionary loads once per process (1-2 s, ~60 MB), lazily: on the first text with CJK
characters a detector sees (in the detector worker, or the server with
``detector_workers: 0``, or ``vllm-guard scrub``), never at import, never per request, never
in a process that sees no Chinese. Its prefix cache is kept in
``$VLLM_GUARD_CACHE/jieba``, not the shared temp directory. Nothing is fetched over the
network: the dictionary ships inside the wheel (jieba's optional paddle mode, which would
pip-install, is never enabled).
Without jieba the recognizer keeps to cue words (``available()``).
"""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}
# dictionary words tagged as names (nr) are names when rare; frequent ones are everyday words
# the tagger got wrong (明白, 阳光, 叶子, 李子: all "nr" in jieba's dictionary)
RARE_NAME_FREQ = 200
RARE_PLACE_FREQ = 50


class Token(NamedTuple):
    word: str
    start: int
    end: int
    known: bool  # in the dictionary (False: a word the HMM joined, often a name)


class Segmenter:
    def __init__(self) -> None:
        with warnings.catch_warnings():  # jieba 0.42 imports the deprecated pkg_resources
            warnings.simplefilter("ignore", DeprecationWarning)
            import jieba

        # quiet: "Building prefix dict..." on stderr, and a traceback when the cache cannot
        # be written (read-only home): the dictionary is then built each time, 1 s slower
        jieba.setLogLevel(logging.CRITICAL)
        self.tokenizer = jieba.Tokenizer()
        self.tokenizer.tmp_dir = str(_private_cache_dir())
        self.tokenizer.initialize()
        self.freq = self.tokenizer.FREQ
        dict_path = Path(jieba.__file__).with_name("dict.txt")
        # rare words tagged as names, and very rare places (many are names too: 徐洋, 于洋)
        self.rare_names: frozenset[str] = frozenset(
            w for w, f, tag in (line.split() for line in
                                dict_path.read_text(encoding="utf-8").splitlines())
            if (tag in ("nr", "nrfg", "nrt") and int(f) < RARE_NAME_FREQ)
            or (tag == "ns" and int(f) < RARE_PLACE_FREQ))

    def tokens(self, text: str) -> list[Token]:
        return [Token(w, a, b, self.freq.get(w, 0) > 0)
                for w, a, b in self.tokenizer.tokenize(text)]


def _private_cache_dir() -> Path:
    """Where jieba keeps its prefix cache: ``$VLLM_GUARD_CACHE/jieba``, ours alone. Not the
    shared temp directory jieba uses by default: anyone could plant /tmp/jieba.cache there,
    and its word frequencies decide where names are found. A directory another user owns or
    may write is not used (a fresh private one is, without reuse)."""
    import os
    import tempfile

    from vllm_guard import envs

    path = envs.cache_dir() / "jieba"
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
        if st.st_uid == os.getuid() and not st.st_mode & 0o022:
            return path
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="vllm-guard-jieba-"))


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("jieba") is not None


def segmenter() -> Segmenter | None:
    """The process's segmenter, built on first call (thread-safe); None without jieba."""
    seg = _STATE.get("seg")
    if seg is None and "missing" not in _STATE:
        with _LOCK:
            if "seg" not in _STATE and "missing" not in _STATE:
                if available():
                    _STATE["seg"] = Segmenter()
                else:
                    _STATE["missing"] = True
            seg = _STATE.get("seg")
    return seg  # type: ignore[return-value]
