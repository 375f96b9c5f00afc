"""The detector engine: text -> sensitive spans. A few detectors, one composite.

- :class:`PresidioDetector`: Presidio ``AnalyzerEngine`` with our checksum recognizers and the
  name gazetteer. Never downloads anything.
- :class:`vllm_guard.masking.detection.ner.SpacyNerDetector`: spaCy NER (PERSON, LOCATION) on
  text in scripts the English model reads, when a pipeline is installed.
- :class:`vllm_guard.masking.detection.chinese_names.ChineseNameDetector`: Chinese names
  beside a cue.
- :class:`TermListDetector`: the operator's sensitive-term list; matches inside unspaced CJK.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
from presidio_analyzer.context_aware_enhancers import ContextAwareEnhancer
from presidio_analyzer.nlp_engine import NoOpNlpEngine

from vllm_guard.errors import GuardError
from vllm_guard.log import get_logger
from vllm_guard.masking.detection.chinese_names import ChineseNameDetector
from vllm_guard.masking.detection.common_words import common_english
from vllm_guard.masking.detection.context import ContextFilter
from vllm_guard.masking.detection.name_gazetteer import gazetteer
from vllm_guard.masking.detection.ner import NOT_PERSON, SpacyNerDetector, load_pipeline
from vllm_guard.masking.detection.person_names import GuardPersonNameRecognizer
from vllm_guard.masking.detection.place_names import place_spans
from vllm_guard.masking.detection.recognizers import _Checked, builtin_recognizers
from vllm_guard.masking.detection.sentence_names import SCORE as SENTENCE_SCORE
from vllm_guard.masking.detection.sentence_names import SentenceNameDetector
from vllm_guard.masking.types import NER_ENTITIES, Detector, Intervals, Span

if TYPE_CHECKING:
    from vllm_guard.masking.config import MaskingConfig

logger = get_logger(__name__)
MIN_VALUE_CHARS = 6  # the shortest value a pattern finds ("a@b.co", "1.1.1.1" is 7)
FAST_CHUNK, FAST_OVERLAP = 65_536, 512  # no pattern value, with its context, is longer


def _offline_tldextract() -> None:
    """Presidio's stock email recognizer fetches the public-suffix list on first use; we do not
    use it, but make any tldextract use in this process bundled-snapshot-only."""
    try:
        import tldextract

        tldextract.tldextract.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=(),
                                                                     cache_dir=None)
    except ImportError:
        pass


class _NoContextEnhancer(ContextAwareEnhancer):
    """Presidio's default enhancer deep-copies every result (~18% of English detection) to
    look for context words among the NLP engine's tokens. The no-op engine has none, so it
    never changes a score: skip it."""

    def __init__(self) -> None:
        super().__init__(context_similarity_factor=0.0, min_score_with_context_similarity=0.0,
                         context_prefix_count=0, context_suffix_count=0)

    def enhance_using_context(self, text, raw_results, nlp_artifacts, recognizers,
                              context=None) -> list:
        return raw_results


class PresidioDetector(Detector):
    """Presidio's ``AnalyzerEngine`` with our checksum recognizers and the name gazetteer; no
    NLP engine (NER is :class:`vllm_guard.masking.detection.ner.SpacyNerDetector`)."""

    def __init__(self, config: MaskingConfig,
                 names: GuardPersonNameRecognizer | None = None):
        _offline_tldextract()
        for name in ("presidio-analyzer", "presidio-anonymizer"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self.thresholds = config.enabled()
        registry = RecognizerRegistry(supported_languages=["en"])
        for rec in builtin_recognizers():
            registry.add_recognizer(rec)
        if config.name_lists:
            registry.add_recognizer(names or GuardPersonNameRecognizer(gazetteer()))
        self.entities = [e for e in self.thresholds if e not in NER_ENTITIES
                         or (e == "PERSON" and config.name_lists)]
        self.entities = [e for e in self.entities if e != "SENSITIVE_TERM"]
        # our own pattern recognizers, compiled once with the stdlib (no IGNORECASE, no
        # Presidio per-match objects): :meth:`CompositeDetector.count_values`' cheap pass
        self.fast = [(re.compile(p.regex, re.DOTALL | re.MULTILINE), p.score, rec)
                     for rec in builtin_recognizers() if isinstance(rec, _Checked)
                     and rec.supported_entities[0] in self.entities for p in rec.patterns]
        engine = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "no_op"}])
        self.analyzer = AnalyzerEngine(nlp_engine=engine, registry=registry,
                                       supported_languages=["en"],
                                       context_aware_enhancer=_NoContextEnhancer())

    def detect(self, text: str) -> list[Span]:
        if not text or not self.entities:
            return []
        results = self.analyzer.analyze(text, language="en", entities=self.entities)
        return [Span(r.start, r.end, r.entity_type, r.score) for r in results
                if r.score >= self.thresholds.get(r.entity_type, 1.1)]


class TermListDetector(Detector):
    """Exact terms from a file, re-read when it changes. ASCII terms need non-alphanumeric
    neighbours; CJK terms match anywhere (Presidio's deny-list ``\\W`` boundaries cannot)."""

    def __init__(self, path: str | None, entity: str = "SENSITIVE_TERM"):
        self.path = Path(path) if path else None
        self.entity = entity
        self._mtime = -1.0
        self._pattern: re.Pattern | None = None
        self._entities: dict[str, str] = {}

    def _reload(self) -> None:
        if self.path is None:
            return
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            if self._mtime != -2.0:  # keep masking the last list: never fall open
                logger.error("vllm-guard masking: terms file %s unreadable; still masking the "
                             "last %d terms", self.path, len(self._entities))
                self._mtime = -2.0
            return
        if mtime == self._mtime:
            return
        terms: dict[str, str] = {}
        for line in self.path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            entity, sep, term = line.partition("\t")
            terms[(term if sep else entity).strip()] = entity.strip() if sep else self.entity
        self._set_terms(terms)
        self._mtime = mtime

    def _set_terms(self, terms: dict[str, str]) -> None:
        parts = []
        for term in sorted(terms, key=len, reverse=True):  # longest first
            esc = re.escape(term)
            parts.append(f"(?<![A-Za-z0-9]){esc}(?![A-Za-z0-9])" if term.isascii() else esc)
        self._pattern = re.compile("|".join(parts), re.IGNORECASE) if parts else None
        self._entities = {t.lower(): e for t, e in terms.items()}

    @classmethod
    def of_terms(cls, terms: dict[str, str]) -> TermListDetector:
        """Fixed terms (term -> entity) from the config, not a file."""
        det = cls(None)
        det._set_terms(terms)
        return det

    def detect(self, text: str) -> list[Span]:
        self._reload()
        if self._pattern is None:
            return []
        return [Span(m.start(), m.end(), self._entities.get(m.group().lower(), self.entity), 1.0)
                for m in self._pattern.finditer(text)]


class CompositeDetector(Detector):
    """All detectors, overlaps resolved (longest, then highest score), allow-list and context
    rules applied; the operator's always-sensitive values win over both.
    An NER span that runs into a pattern hit is trimmed, not dropped:
    spaCy's small model often swallows a neighbour ("Eric Gibson - 881-06-5657")."""

    def __init__(self, detectors: list[Detector], allow_list: tuple[str, ...] = (),
                 context: ContextFilter | None = None):
        self.detectors = detectors
        self.allow = {a.lower() for a in allow_list}
        self.context = context or ContextFilter({}, {})

    def detect(self, text: str) -> list[Span]:
        spans = [s for d in self.detectors for s in d.detect(text)]
        # the model's ORG/PRODUCT spans: a PERSON that one continues past its end is part of
        # a firm's or a product's name ("Martha Stewart Living", "Alfa Romeo Giulia"). Not
        # on the same words alone (the small model calls many real names ORG), nor a word
        # before ("Meet Thirunavukkarasu Ilangovan" was ORG)
        vetoes = [s for s in spans if s.entity == NOT_PERSON]
        if vetoes:
            spans = [s for s in spans if s.entity != NOT_PERSON and not (
                s.entity == "PERSON" and any(v.start <= s.start and s.end < v.end
                                             for v in vetoes))]
        # no placeholder is exempt: callers neutralise look-alikes before detecting
        taken = Intervals()
        out: list[Span] = []
        always = self.context.is_always
        # always-sensitive values first, then pattern/checksum hits over NER guesses, then
        # longer spans, PERSON, then higher scores
        # (a name the lists know beats the model's LOCATION on the same words)
        order = sorted(spans, key=lambda s: (not always(text[s.start:s.end]),
                                             s.entity in NER_ENTITIES, -(s.end - s.start),
                                             s.entity != "PERSON", -s.score, s.start))
        for s in order:
            value = text[s.start:s.end]
            if not always(value) and (value.lower() in self.allow or self.context.exempt(
                    text, s.start, s.end, s.entity)):
                continue
            hits = taken.overlapping(s.start, s.end)
            if hits:
                s = _trimmed(text, s, hits) if s.entity in NER_ENTITIES else None
                if s is None:
                    continue
            out.append(s)
            taken.add(s.start, s.end)
        return sorted(out, key=lambda s: s.start)


    def count_values(self, texts: list[str], known: set[str], limit: int) -> int:
        """Distinct values, not in ``known``, that our pattern recognizers find (checksums,
        thresholds, the allow-list and context rules applied); counting stops past
        ``limit``. The full detection finds at least these (pattern hits win its overlaps),
        so a count past the limit refuses a request before the slow detectors run. Regex and
        checksum only, chunk by chunk, so a body dense with values stops in its first chunk."""
        presidio = next((d for d in self.detectors if isinstance(d, PresidioDetector)), None)
        # a value takes at least MIN_VALUE_CHARS: texts this short cannot pass the limit
        if presidio is None or not presidio.fast or sum(map(len, texts)) <= (
                limit + 1) * MIN_VALUE_CHARS:
            return 0
        found: set[str] = set()
        for text in texts:
            cursors, taken = [0] * len(presidio.fast), Intervals()
            for b in range(FAST_CHUNK, len(text) + FAST_CHUNK, FAST_CHUNK):
                chunk_end = min(b, len(text))
                endpos = min(len(text), chunk_end + FAST_OVERLAP)
                hits: list[tuple[int, int, str]] = []
                for i, (pat, score, rec) in enumerate(presidio.fast):
                    cursors[i] = self._scan(text, pat, score, rec, presidio.thresholds,
                                            cursors[i], chunk_end, endpos, known, hits)
                # as the detector resolves overlaps: longest first, then earliest
                for start, end, entity in sorted(hits, key=lambda h: (h[0] - h[1], h[0])):
                    if (not taken.overlapping(start, end)
                            and not self.context.exempt(text, start, end, entity)):
                        taken.add(start, end)
                        found.add(text[start:end])
                if len(found) > limit:
                    return len(found)
        return len(found)

    def _scan(self, text: str, pat: re.Pattern[str], score: float, rec, thresholds,
              pos: int, chunk_end: int, endpos: int, known: set[str],
              hits: list[tuple[int, int, str]]) -> int:
        """Adds to ``hits`` the matches of ``pat`` starting in [pos, chunk_end), as a scan of
        the whole text finds them (a match too near ``endpos`` to have its look-ahead is
        left to the next chunk); returns where the next chunk's scan resumes."""
        entity = rec.supported_entities[0]
        while pos < chunk_end:
            m = pat.search(text, pos, endpos)
            if m is None or m.start() >= chunk_end:
                return chunk_end
            if endpos < len(text) and m.end() + 8 > endpos:
                return m.start()  # its context is cut: the next chunk sees it whole
            pos = max(m.end(), m.start() + 1)
            value = m.group()
            if value in known or value.lower() in self.allow:
                continue
            ok = rec.validate_result(value)
            if ok is False or (ok is None and score < thresholds.get(entity, 1.1)):
                continue
            hits.append((m.start(), m.end(), entity))
        return pos


def _trimmed(text: str, span: Span, taken: list[tuple[int, int]]) -> Span | None:
    """The longest part of ``span`` outside ``taken``, without edge punctuation/space."""
    cuts = sorted((max(b, span.start), min(e, span.end)) for b, e in taken
                  if b < span.end and span.start < e)
    free, pos = [], span.start
    for b, e in cuts:
        free.append((pos, b))
        pos = max(pos, e)
    free.append((pos, span.end))
    start, end = max(free, key=lambda f: f[1] - f[0])
    while start < end and not text[start].isalnum():
        start += 1
    while end > start and not text[end - 1].isalnum():
        end -= 1
    return Span(start, end, span.entity, span.score) if end - start >= 2 else None


def build_detector(config: MaskingConfig) -> CompositeDetector:
    names = GuardPersonNameRecognizer(gazetteer()) if config.name_lists else None
    detectors: list[Detector] = [PresidioDetector(config, names)]
    ner = {e: t for e, t in config.enabled().items() if e in NER_ENTITIES}
    nlp = load_pipeline(config.ner) if ner else None
    if nlp is not None:
        pipelines = {"en": nlp}
        for lang, package in config.ner_languages.items():
            other = load_pipeline(package)
            if other is None:
                raise GuardError(f"masking config: ner_languages.{lang}: spaCy pipeline "
                                 f"{package!r} is not installed (pip install {package})")
            pipelines[lang] = other
        detectors.append(SpacyNerDetector(pipelines, ner, gazetteer(),
                                          lists_detect=config.name_lists
                                          and "PERSON" in config.enabled(), lists=names))
    elif ner and config.ner != "off":
        logger.info("vllm-guard masking: no spaCy NER pipeline; LOCATION, and names outside "
                    "the name lists, not detected (install the 'ner' extra)")
    if config.terms_file:
        detectors.append(TermListDetector(config.terms_file))
    if "PERSON" in config.enabled():
        common_english()  # load the lazy tables now, not in the first request (~0.5 s)
        place_spans("")

        detectors.append(ChineseNameDetector(max(config.enabled()["PERSON"], 0.85)))
        if config.name_lists and config.enabled()["PERSON"] <= SENTENCE_SCORE:
            detectors.append(SentenceNameDetector(gazetteer()))
    if config.always_sensitive:
        detectors.append(TermListDetector.of_terms(
            {t: e for e, terms in config.always_sensitive.items() for t in terms}))
    return CompositeDetector(detectors, config.allow_list,
                             ContextFilter(config.context, config.always_sensitive,
                                           config.known_places))
