"""De-identify JSONL training data: the masker's detection and strategies (placeholders,
surrogates, fpe), one file at a time, streamed line by line (``vllm-guard scrub``).

The whole file is one session: a value gets the same stand-in on every line, and a value
found once is masked wherever it occurs later. A stand-in is never a value seen before it;
a value first seen later that equals an earlier stand-in gets a stand-in of its own (lines
already written stay as they are). The stand-in -> value mapping can be kept,
sealed with AES-256-GCM, to restore the file (or a model's outputs) later. Raw values never
reach the report, the progress output or an error message.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vllm_guard.aead import seal, unseal
from vllm_guard.errors import GuardError
from vllm_guard.masking.masker import apply_placeholders
from vllm_guard.masking.restorer import StandInMap, restore
from vllm_guard.masking.strategies import StandIns
from vllm_guard.masking.strategies.base import Item
from vllm_guard.masking.types import Detector
from vllm_guard.masking.vault import placeholder
from vllm_guard.masking.worker import analyse, known_automaton

DEFAULT_FIELDS = ("prompt", "answer", "text")
MAPPING_FORMAT = "vllm-guard-scrub-mapping"
_AAD = b"vllm-guard scrub mapping v1"
REBUILD = 1024


class ScrubError(GuardError):
    """A line cannot be scrubbed (not JSON, a named field that is not text)."""


@dataclass
class ScrubReport:
    lines: int = 0
    fields: int = 0
    bytes: int = 0
    seconds: float = 0.0
    distinct: int = 0  # distinct values masked
    masked: Counter[str] = field(default_factory=Counter)  # entity -> occurrences

    def to_json(self) -> dict:
        return {"lines": self.lines, "fields_scanned": self.fields, "bytes": self.bytes,
                "seconds": round(self.seconds, 3),
                "mb_per_s": round(self.bytes / self.seconds / 1e6, 3) if self.seconds else 0,
                "masked": dict(sorted(self.masked.items())), "distinct_values": self.distinct}


class Scrubber:
    """One file's session: (entity, value) -> stand-in (a placeholder numbered per entity,
    or what the entity's strategy renders from it)."""

    def __init__(self, detector: Detector, fields: Iterable[str] = DEFAULT_FIELDS,
                 stand_ins: StandIns | None = None):
        self.detector = detector
        self.fields = tuple(fields)
        self.stand_ins = stand_ins or StandIns({})
        self._secret = os.urandom(32)  # this run's surrogates and fpe tweaks
        self._used: set[str] = set()  # values seen and stand-ins given
        self.table: dict[tuple[str, str], str] = {}
        self.counters: Counter[str] = Counter()
        self.report = ScrubReport()
        # Known values in two automata: a large one rebuilt every REBUILD new values and a
        # small one over the values since (rebuilt when it grows): amortised O(1) per value.
        self._values: list[tuple[str, str]] = []
        self._big, self._big_n = None, 0
        self._small, self._small_n = None, 0

    @property
    def mapping(self) -> dict[str, str]:
        return {ph: value for (_, value), ph in self.table.items()}

    def scrub_line(self, line: str, lineno: int) -> str:
        doc = _parse(line, lineno)
        slots = list(_text_slots(doc, self.fields, lineno))
        if slots:
            results = analyse(self.detector, [h[k] for h, k in slots], [True] * len(slots),
                              [], self._automata())
            for (holder, key), res in zip(slots, results, strict=True):
                table = {}
                for sp in res.spans:
                    value = res.text[sp.start:sp.end]
                    table[(sp.entity, value)] = self._placeholder(sp.entity, value)
                    self.report.masked[sp.entity] += 1
                holder[key] = apply_placeholders(res, table)
        self.report.lines += 1
        self.report.fields += len(slots)
        return json.dumps(doc, ensure_ascii=False)

    def _placeholder(self, entity: str, value: str) -> str:
        shown = self.table.get((entity, value))
        if shown is None:
            self.counters[entity] += 1
            n = self.counters[entity]
            self._used.add(value)
            item = Item(entity, value, n, placeholder(entity, n))
            shown = self.table[(entity, value)] = self.stand_ins.pick(item, self._secret,
                                                                       self._used)
            self._values.append((value, entity))
        return shown

    def _automata(self) -> list:
        n = len(self._values)
        if n - self._big_n >= REBUILD:
            self._big, self._big_n = known_automaton(self._values), n
        if self._small_n != n:
            self._small, self._small_n = known_automaton(self._values[self._big_n:]), n
        return [self._big, self._small]


def restore_line(line: str, lineno: int, mapping: dict[str, str], fields: Iterable[str]) -> str:
    doc = _parse(line, lineno)
    for holder, key in _text_slots(doc, tuple(fields), lineno):
        holder[key] = restore(holder[key], mapping, count=False)
    return json.dumps(doc, ensure_ascii=False)


def _parse(line: str, lineno: int) -> dict:
    try:
        doc = json.loads(line)
    except ValueError:
        raise ScrubError(f"line {lineno}: not valid JSON") from None
    if not isinstance(doc, dict):
        raise ScrubError(f"line {lineno}: not a JSON object")
    return doc


def _text_slots(doc: dict, fields: tuple[str, ...], lineno: int) -> Iterator[tuple[dict, str]]:
    """(holder, key) of every named text field; chat ``messages[*].content`` too."""
    for name in fields:
        if name not in doc or doc[name] is None:
            continue
        value = doc[name]
        if isinstance(value, str):
            yield doc, name
        elif isinstance(value, list) and all(isinstance(m, dict) for m in value):
            for i, m in enumerate(value):
                if not isinstance(m.get("content", ""), str):
                    raise ScrubError(f"line {lineno}: field {name!r}[{i}].content is not text")
                if "content" in m:
                    yield m, "content"
        else:
            raise ScrubError(f"line {lineno}: field {name!r} is not text (a string or a list "
                             "of messages)")


def scrub_file(src: Path, dst: Path, scrubber: Scrubber,
               progress: Callable[[int], None] = lambda n: None) -> ScrubReport:
    """Stream ``src`` to ``dst`` (written beside it and renamed: no partial output)."""
    import time

    start = time.perf_counter()
    _stream(src, dst, scrubber.scrub_line, progress, scrubber.report)
    scrubber.report.seconds = time.perf_counter() - start
    scrubber.report.distinct = len(scrubber.table)
    return scrubber.report


def restore_file(src: Path, dst: Path, mapping: dict[str, str], fields: Iterable[str],
                 progress: Callable[[int], None] = lambda n: None) -> ScrubReport:
    report = ScrubReport()
    fields, mapping = tuple(fields), StandInMap(mapping)  # the literal regex compiled once

    def one(line: str, lineno: int) -> str:
        report.lines += 1
        return restore_line(line, lineno, mapping, fields)

    _stream(src, dst, one, progress, report)
    return report


def _stream(src: Path, dst: Path, fn: Callable[[str, int], str],
            progress: Callable[[int], None], report: ScrubReport) -> None:
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    try:
        with open(src, encoding="utf-8") as fin, open(tmp, "w", encoding="utf-8") as fout:
            for lineno, line in enumerate(fin, 1):
                size = len(line.encode("utf-8"))
                report.bytes += size
                if line.strip():
                    fout.write(fn(line, lineno) + "\n")
                else:
                    fout.write(line)
                progress(size)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def save_mapping(path: Path, mapping: dict[str, str], key: bytes) -> None:
    """The mapping sealed (AES-256-GCM, random nonce) in a small JSON envelope."""
    import base64

    sealed = seal(AESGCM(key), json.dumps(mapping, ensure_ascii=False).encode(), _AAD)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(json.dumps({"format": MAPPING_FORMAT, "version": 1,
                               "sealed": base64.b64encode(sealed).decode()}))
    os.replace(tmp, path)


def load_mapping(path: Path, key: bytes) -> dict[str, str]:
    import base64

    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != MAPPING_FORMAT:
            raise ValueError
        sealed = base64.b64decode(doc["sealed"], validate=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ScrubError(f"{path} is not a vllm-guard scrub mapping file") from None
    try:
        return json.loads(unseal(AESGCM(key), sealed, _AAD))
    except (InvalidTag, ValueError):
        raise ScrubError(f"{path}: wrong key or tampered mapping file") from None
