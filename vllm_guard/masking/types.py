"""What detection and the request path share: entity names, the placeholder pattern, a detected
:class:`Span`, the :class:`Detector` base, :class:`Intervals` and the number rule
(:func:`render_number`, :func:`sensitive_number`). A leaf: it imports nothing else from
vllm_guard, so any masking module may import it."""

from __future__ import annotations

import bisect
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

STRUCTURED = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS",
              "CN_RESIDENT_ID", "US_SSN")
NER_ENTITIES = ("PERSON", "LOCATION")
ENTITIES = (*STRUCTURED, *NER_ENTITIES, "SENSITIVE_TERM")

# a vault placeholder as the engine and the client see it: <PERSON_1>
PLACEHOLDER = re.compile(r"<([A-Z][A-Z0-9_]*)_(\d+)>")


# entities whose recognizers validate a checksum (Luhn, ISO 7064, mod-97): the only detector
# verdicts that make a JSON number sensitive (see :func:`sensitive_number`)
CHECKSUMMED = frozenset({"CREDIT_CARD", "CN_RESIDENT_ID", "IBAN_CODE"})
_DIGITS = re.compile(r"\d+")
_NUMERIC = re.compile(r"[\d\s().+/-]+")  # a value written as digits and separators
MIN_KNOWN_DIGITS = 6


def render_number(value: int | float) -> str:
    """A JSON number as the text the detectors scan: ``json.dumps`` (how a body is forwarded
    and how ``tojson`` renders it in a chat template), then each run of digits in it on its
    own (``4012888888881881.5`` and ``0.4012888888881881`` carry a card's 16 digits into the
    prompt, which the detectors do not read next to a decimal point) and, for an integral
    float (also sent as ``4.012888888881881e15``), the integer. "; " between them: no
    pattern reads across it."""
    text = json.dumps(value)
    parts = [text, *_DIGITS.findall(text)]
    if isinstance(value, float) and value.is_integer():
        parts.append(str(int(value)))
    return "; ".join(parts)


def number_keys(value: str) -> list[str]:
    """The forms under which a known value is matched in a JSON number: the value, and its
    digits where it is written with digits and separators only (``+86 138-0013-8000``)."""
    keys = [value]
    if _NUMERIC.fullmatch(value):
        digits = "".join(_DIGITS.findall(value))
        if len(digits) >= MIN_KNOWN_DIGITS:
            keys.append(digits)
    return keys


def _issued(card: str) -> bool:
    """A Luhn-valid run of digits that a card issuer could have given out: the major industry
    identifier (first digit) of payment cards is 2-6, or 1 for 15-digit UATP cards. A
    millisecond timestamp (13 digits from 1) passes Luhn one time in ten; it is not a card."""
    digits = "".join(_DIGITS.findall(card))
    return digits[:1] in ("2", "3", "4", "5", "6") or (digits[:1] == "1" and len(digits) == 15)


def known_numbers(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """(value, entity) pairs -> {form: entity} for :func:`sensitive_number`."""
    return {k: entity for value, entity in pairs for k in number_keys(value)}


def sensitive_number(text: str, spans: Iterable[Span], known: Mapping[str, str]) -> str | None:
    """The one rule for a JSON number (the masker's and the scrubber's): the entity that
    makes it sensitive, or None. ``text`` is :func:`render_number`'s, ``spans`` what the
    detectors (and the known-value automaton) found in it, ``known`` :func:`known_numbers` of
    the values already found in this request or session. A number is sensitive only when
    it holds a checksummed identifier (:data:`CHECKSUMMED`; a card number also needs an
    issuer's first digit) or equals a known value: the phone-number patterns alone read 44%
    of random uint32 seeds and the int32 bounds (2147483647) as phone numbers, so they never
    refuse a number by themselves."""
    for sp in spans:
        value = text[sp.start:sp.end]
        if any(k in known for k in number_keys(value)):
            return sp.entity
        if sp.entity in CHECKSUMMED and (sp.entity != "CREDIT_CARD" or _issued(value)):
            return sp.entity
    for run in _DIGITS.findall(text):
        if run in known:
            return known[run]
    return None


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    entity: str
    score: float


class Detector(ABC):
    @abstractmethod
    def detect(self, text: str) -> list[Span]: ...


class Intervals:
    """Disjoint half-open intervals, sorted: overlap queries in O(log n) (many spans in a
    large body made the pairwise check quadratic)."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def overlapping(self, start: int, end: int) -> list[tuple[int, int]]:
        i = bisect.bisect_left(self.ends, start + 1)  # first interval ending after start
        out = []
        while i < len(self.starts) and self.starts[i] < end:
            out.append((self.starts[i], self.ends[i]))
            i += 1
        return out

    def add(self, start: int, end: int) -> None:
        i = bisect.bisect_left(self.starts, start)
        self.starts.insert(i, start)
        self.ends.insert(i, end)
