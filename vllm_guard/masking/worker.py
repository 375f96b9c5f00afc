"""Detection off the API server's event loop: text -> (neutralised text, spans).

:func:`analyse` is the whole per-request detection step: placeholder look-alikes typed by the
user are neutralised (never restored to a vault value; digits inside them still detected),
then the detectors run and every occurrence of a value already in the session is found in one
Aho-Corasick pass. ``python -m vllm_guard.masking.worker CONFIG`` runs it in a process of its
own (see :mod:`vllm_guard.masking.pool`): length-prefixed JSON frames on stdin/stdout.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import dataclass

from vllm_guard.masking.types import PLACEHOLDER, Detector, Intervals, Span

FRAME = struct.Struct("!Q")
WINDOW, OVERLAP = 32_768, 512  # characters; no value we detect is longer than OVERLAP


class ValueLimit(Exception):  # noqa: N818 - a verdict, not a fault
    """More new values than the request may hold: found early, before detection ends."""

    def __init__(self, found: int):
        super().__init__(found)
        self.found = found


def neutralise(text: str) -> str:
    """``<PERSON_1>`` typed by a client becomes ``‹PERSON 1›``: not a placeholder, and the
    digits are a word of their own (so ``<CARD_4111111111111111>`` is still a card). The
    length is kept, so offsets in the typed text hold (the masker maps it back for echoes)."""
    return PLACEHOLDER.sub(lambda m: f"\u2039{m.group(1)} {m.group(2)}\u203a", text)


@dataclass(frozen=True)
class Analysis:
    text: str  # the text detection ran on (look-alikes neutralised)
    spans: list[Span]  # non-overlapping, sorted


def known_spans(text: str, automaton) -> list[Span]:
    if automaton is None:
        return []
    return [Span(end + 1 - len(value), end + 1, entity, 1.0)
            for end, (value, entity) in automaton.iter(text)]


def _automaton(known: list[tuple[str, str]]):
    if not known:
        return None
    import ahocorasick

    auto = ahocorasick.Automaton()
    for value, entity in known:
        if value:
            auto.add_word(value, (value, entity))
    auto.make_automaton()
    return auto


def _merge(spans: list[Span]) -> list[Span]:
    """Longest first, then earliest; drop anything overlapping a span already taken."""
    taken = Intervals()
    out: list[Span] = []
    for s in sorted(spans, key=lambda s: (-(s.end - s.start), s.start)):
        if not taken.overlapping(s.start, s.end):
            out.append(s)
            taken.add(s.start, s.end)
    return sorted(out, key=lambda s: s.start)


def analyse(detector: Detector, texts: list[str], rewrite: list[bool],
            known: list[tuple[str, str]], automata: list | None = None,
            limit: int | None = None) -> list[Analysis]:
    """``rewrite[i]``: text i will be rewritten (prompt text), so look-alikes are neutralised;
    ``known``: the session's (value, entity) pairs, found wherever they occur (or, for a
    caller that keeps them across calls, ``automata`` built by :func:`known_automaton`).
    ``limit``: the most new values the request may hold. Cheap checks come first: a pattern-
    only count (:meth:`count_values` of the detector, if it has one), then a running count
    per detection window; either past the limit raises :class:`ValueLimit` at once, so a
    body of 50,000 values is refused without running the slow detectors over all of it."""
    texts = [neutralise(t) if rw else t for t, rw in zip(texts, rewrite, strict=True)]
    seen: set[tuple[str, str]] | None = None
    if limit is not None:
        count = getattr(detector, "count_values", None)
        if count is not None:
            found = count(texts, {v for v, _ in known}, limit)
            if found > limit:
                raise ValueLimit(found)
        seen = set()
    known_set = set(known)
    automata = [_automaton(known)] if automata is None else automata
    out = []
    for text in texts:

        def tally(spans: list[Span], upto: int, text: str = text) -> None:
            """New values among the spans ending before ``upto`` (whole in this window)."""
            if seen is None or limit is None:
                return
            for sp in spans:
                value = text[sp.start:sp.end]
                if sp.end <= upto and (value, sp.entity) not in known_set:
                    seen.add((sp.entity, value))
            if len(seen) > limit:
                raise ValueLimit(len(seen))

        spans = detect_windows(detector, text, tally)
        for automaton in automata:
            spans += known_spans(text, automaton)
        out.append(Analysis(text, _merge(spans)))
    return out


def known_automaton(known: list[tuple[str, str]]):
    """One Aho-Corasick automaton over (value, entity) pairs (None when there are none)."""
    return _automaton(known)


def detect_windows(detector: Detector, text: str, tally=None) -> list[Span]:
    """Large texts in overlapping windows: bounded work per detector call (spaCy refuses
    texts over 1M characters); a value cut at a window's end is whole in the next one and
    wins the merge by length. ``tally(spans, upto)`` sees each window's spans as they come
    (``upto``: where a value can no longer be cut by the window's end)."""
    if len(text) <= WINDOW + OVERLAP:
        spans = detector.detect(text)
        if tally is not None:
            tally(spans, len(text))
        return spans
    spans = []
    for off in range(0, len(text), WINDOW):
        got = [Span(s.start + off, s.end + off, s.entity, s.score)
               for s in detector.detect(text[off:off + WINDOW + OVERLAP])]
        if tally is not None:
            last = off + WINDOW + OVERLAP >= len(text)
            tally(got, len(text) if last else off + WINDOW)
        spans += got
    return spans


def encode(doc: object) -> bytes:
    data = json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return FRAME.pack(len(data)) + data


def read_frame(stream) -> object | None:
    head = stream.read(FRAME.size)
    if len(head) < FRAME.size:
        return None
    (size,) = FRAME.unpack(head)
    return json.loads(stream.read(size).decode("utf-8", "surrogatepass"))


def main(config_path: str) -> None:
    # the protocol owns the original stdout; anything a library prints goes to stderr
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    proto_in = sys.stdin.buffer
    os.nice(10)  # the API server and the engine come first on a busy machine
    # Presidio, spaCy and Faker are imported only now, after the redirect: a library that
    # prints while loading cannot corrupt the protocol
    from vllm_guard.masking.config import MaskingConfig
    from vllm_guard.masking.detection.detector import build_detector

    try:
        detector = build_detector(MaskingConfig.load(config_path))
        proto_out.write(encode({"ready": True}))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which refuses requests
        proto_out.write(encode({"error": f"{type(e).__name__}: {e}"}))
        proto_out.flush()
        return
    proto_out.flush()
    while (req := read_frame(proto_in)) is not None:
        try:
            res = analyse(detector, req["texts"], req["rewrite"],
                          [tuple(k) for k in req["known"]], limit=req.get("limit"))
            doc = {"results": [{"text": a.text, "spans": [[s.start, s.end, s.entity]
                                                          for s in a.spans]} for a in res]}
        except ValueLimit as e:
            doc = {"too_many": e.found}
        except Exception as e:  # noqa: BLE001 - one bad request must not kill the worker
            doc = {"error": f"{type(e).__name__}"}
        proto_out.write(encode(doc))
        proto_out.flush()


if __name__ == "__main__":
    main(sys.argv[1])
