"""Context rules: words around a match that make it non-sensitive, and the operator's list of
values that are always sensitive (it wins over the rules and over the allow list).

"Ronald Regan" in a user's message is a person; in "Ronald Reagan Airport" it names a place.
A rule holds words that may follow the match (within the run of capitalised words right
after it: "Ronald Reagan Washington National Airport") or directly precede it ("Mount").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_WORD = re.compile(r"[^\W\d_][\w'’.-]*")  # a word, with "St." and "O'Neil"
_FOLLOWING = 4  # capitalised words after a match that may still carry the context word


@dataclass(frozen=True)
class ContextRule:
    after: tuple[str, ...] = ()  # e.g. "Airport": "X Airport", "X Washington Airport"
    before: tuple[str, ...] = ()  # e.g. "Mount": "Mount X"


def default_context() -> dict[str, ContextRule]:
    person = ContextRule(
        after=("Airport", "Street", "St.", "Avenue", "Ave.", "Road", "Boulevard", "Lane",
               "Drive", "Square", "Bridge", "Park", "Station", "Tunnel", "Highway", "University",
               "College", "School", "Academy", "Institute", "Foundation", "Hospital", "Center",
               "Centre", "Library", "Museum", "Stadium", "Arena", "Hall", "Building", "Tower",
               "Memorial", "Prize", "Award", "Trust", "Fund", "Corporation", "Company", "Inc",
               "Inc.", "Ltd", "Ltd.", "LLC", "Group", "Holdings", "Motors", "Controls"),
        before=("Mount", "Lake", "Fort", "Cape", "Port"))
    return {"PERSON": person}


class ContextFilter:
    """Decides, for one text, which detected spans the rules exempt."""

    def __init__(self, rules: Mapping[str, ContextRule],
                 always: Mapping[str, tuple[str, ...]]):
        self.after = {e: {w.lower().rstrip(".") for w in r.after} for e, r in rules.items()}
        self.before = {e: {w.lower().rstrip(".") for w in r.before} for e, r in rules.items()}
        self.always = {t.lower() for terms in always.values() for t in terms}

    def is_always(self, value: str) -> bool:
        return value.lower() in self.always

    def exempt(self, text: str, start: int, end: int, entity: str) -> bool:
        """True if a context word of ``entity`` follows or precedes ``text[start:end]``."""
        after, before = self.after.get(entity), self.before.get(entity)
        if after:
            inside = _WORD.findall(text[start:end])  # NER may swallow it: "X Reagan St."
            if len(inside) > 1 and inside[-1].lower().rstrip(".") in after:
                return True
            pos = end
            for _ in range(_FOLLOWING):
                m = _WORD.match(text, pos + len(text[pos:]) - len(text[pos:].lstrip(" \t")))
                if m is None or not m.group()[0].isupper():
                    break
                if m.group().lower().rstrip(".") in after:
                    return True
                pos = m.end()
        if before:
            head = text[:start].rstrip(" \t")
            words = _WORD.findall(head[-40:])
            if words and head.endswith(words[-1]) and words[-1].lower().rstrip(".") in before:
                return True
        return False
