"""De-identify JSONL training data: the masker's detection and strategies (placeholders,
surrogates, fpe), one file at a time, streamed line by line (``vllm-guard scrub``).

Every string leaf of a named field is scrubbed, at any depth (chat messages, ShareGPT
``conversations``, content parts, tool-call arguments, ...). Everything else is copied only
when it holds nothing sensitive (fail closed): fields not named, object keys and JSON
numbers (none of which can become a stand-in) are scanned, and a sensitive value in one of them
stops the run with the line and the path. A number is sensitive under the masker's rule
(:func:`~vllm_guard.masking.types.sensitive_number`: a checksummed identifier or a value
already found in the file), so ids and timestamps the phone patterns read are copied.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vllm_guard.aead import seal, unseal
from vllm_guard.errors import GuardError
from vllm_guard.masking.masker import apply_placeholders
from vllm_guard.masking.restorer import StandInMap, restore
from vllm_guard.masking.strategies import StandIns
from vllm_guard.masking.strategies.base import Item
from vllm_guard.masking.types import Detector, Span, known_numbers, render_number, sensitive_number
from vllm_guard.masking.vault import placeholder
from vllm_guard.masking.worker import analyse, detect_windows, known_automaton, known_spans

# prompt/completion, chat messages and ShareGPT records are scrubbed as they are
DEFAULT_FIELDS = ("prompt", "completion", "answer", "text", "messages", "conversations")
MAPPING_FORMAT = "vllm-guard-scrub-mapping"
_AAD = b"vllm-guard scrub mapping v1"
REBUILD = 1024
CHECK_CACHE, CHECK_CACHE_LEN = 65_536, 64  # detector verdicts on short checked strings


class ScrubError(GuardError):
    """A line cannot be scrubbed (not JSON, a named field that is not text, a sensitive value
    where no stand-in can go)."""


@dataclass(frozen=True)
class _Check:
    """A value copied as it is, so it must hold nothing sensitive: a string outside the named
    fields, an object key or a JSON number (as rendered)."""

    text: str
    path: str
    kind: str  # "unnamed", "key" or "number"
    named: bool = False  # inside a field of --fields (a number there)

    def refusal(self, lineno: int, entity: str) -> ScrubError:
        top = self.path.split(".")[0].split("[")[0]
        if self.kind == "key":
            why = "an object key is never rewritten"
        elif self.kind == "number" and self.named:
            why = "a JSON number cannot become a stand-in; write it as a string to scrub it"
        elif self.kind == "number":
            why = (f"a JSON number cannot become a stand-in; write it as a string and add "
                   f"{top!r} to --fields to scrub it")
        else:
            why = f"it is not in --fields (add {top!r} to scrub it)"
        where = f"a key of '{self.path}'" if self.kind == "key" and self.path else (
            "a top-level key" if self.kind == "key" else f"'{self.path}'")
        return ScrubError(f"line {lineno}: {where} holds a sensitive value ({entity}) and "
                          f"cannot be copied: {why}")


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
        self._numbers: dict[str, str] = {}  # the values as JSON numbers match them
        self._big, self._big_n = None, 0
        self._small, self._small_n = None, 0
        self._verdicts: dict[str, list[Span]] = {}  # keys and labels repeat on every line

    @property
    def mapping(self) -> dict[str, str]:
        return {ph: value for (_, value), ph in self.table.items()}

    def scrub_line(self, line: str, lineno: int) -> str:
        doc = _parse(line, lineno)
        slots, checks = _walk_record(doc, self.fields, lineno)
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
        # after the scrub, so values this line revealed are known to the checks too
        automata = self._automata()
        for check in checks:
            spans = self._detect(check.text) + [
                sp for a in automata for sp in known_spans(check.text, a)]
            entity = spans[0].entity if spans else None
            if check.kind == "number":
                entity = sensitive_number(check.text, spans, self._numbers)
            if entity is not None:
                raise check.refusal(lineno, entity)
        self.report.lines += 1
        self.report.fields += len(slots)
        return json.dumps(doc, ensure_ascii=False)

    def _detect(self, text: str) -> list[Span]:
        """The detectors' verdict, remembered for short strings (keys and labels such as
        ``"role"`` or ``"human"`` come back on every line)."""
        if len(text) > CHECK_CACHE_LEN:
            return detect_windows(self.detector, text)
        spans = self._verdicts.get(text)
        if spans is None:
            if len(self._verdicts) >= CHECK_CACHE:
                self._verdicts.clear()
            spans = self._verdicts[text] = detect_windows(self.detector, text)
        return spans

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
            self._numbers.update(known_numbers([(value, entity)]))
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
    for holder, key in _walk_record(doc, tuple(fields), lineno)[0]:
        holder[key] = restore(holder[key], mapping, count=False)
    return json.dumps(doc, ensure_ascii=False)


def _parse(line: str, lineno: int) -> dict:
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):
        raise ScrubError(f"line {lineno}: not valid JSON") from None
    if not isinstance(doc, dict):
        raise ScrubError(f"line {lineno}: not a JSON object")
    return doc


def _walk_record(doc: dict, fields: tuple[str, ...],
                 lineno: int) -> tuple[list[tuple[Any, Any]], list[_Check]]:
    """(holder, key) of every string leaf of the named fields, and what must be checked:
    every other string, every object key and every number, wherever they are."""
    slots: list[tuple[Any, Any]] = []
    checks: list[_Check] = []
    try:
        for name in doc:
            checks.append(_Check(name, "", "key"))
            value = doc[name]
            named = name in fields and value is not None
            if named and not isinstance(value, str | list | dict):
                raise ScrubError(f"line {lineno}: field {name!r} is not text (a string, or a "
                                 "list or object of them)")
            _walk(doc, name, name, named, slots, checks)
    except RecursionError:
        raise ScrubError(f"line {lineno}: nested too deeply") from None
    return slots, checks


def _walk(holder: Any, key: Any, path: str, named: bool, slots: list[tuple[Any, Any]],
          checks: list[_Check]) -> None:
    value = holder[key]
    if isinstance(value, str):
        if named:
            slots.append((holder, key))
        else:
            checks.append(_Check(value, path, "unnamed"))
    elif isinstance(value, bool) or value is None:
        return  # carries nothing
    elif isinstance(value, int | float):
        checks.append(_Check(render_number(value), path, "number", named))
    elif isinstance(value, dict):
        for k in value:
            checks.append(_Check(k, path, "key"))
            _walk(value, k, f"{path}.{k}", named, slots, checks)
    elif isinstance(value, list):
        for i in range(len(value)):
            _walk(value, i, f"{path}[{i}]", named, slots, checks)


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
