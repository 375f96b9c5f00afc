"""What detection and the request path share: entity names, the placeholder pattern, a detected
:class:`Span`, the :class:`Detector` base, :class:`Intervals` and :func:`render_number`. A
leaf: it imports nothing else from vllm_guard, so any masking module may import it."""

from __future__ import annotations

import bisect
import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

STRUCTURED = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS",
              "CN_RESIDENT_ID", "US_SSN")
NER_ENTITIES = ("PERSON", "LOCATION")
ENTITIES = (*STRUCTURED, *NER_ENTITIES, "SENSITIVE_TERM")

# a vault placeholder as the engine and the client see it: <PERSON_1>
PLACEHOLDER = re.compile(r"<([A-Z][A-Z0-9_]*)_(\d+)>")


def render_number(value: int | float) -> str:
    """A JSON number as the text the detectors scan: ``json.dumps`` (how a body is forwarded
    and how ``tojson`` renders it in a chat template); an integral float
    (``4012888888881881.0``, also when sent as ``4.012888888881881e15``) is also given as the
    integer, which the detectors read (a card number followed by ``.0`` is not)."""
    text = json.dumps(value)
    if isinstance(value, float) and value.is_integer():
        text += f" {int(value)}"
    return text


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
