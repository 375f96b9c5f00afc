"""Context rules: words around a match that make it non-sensitive, and the operator's list of
values that are always sensitive (it wins over the rules and over the allow list).

"Ronald Regan" in a user's message is a person; in "Ronald Reagan Airport" it names a place.
A rule holds words that may follow the match (within the run of capitalised words right
after it: "Ronald Reagan Washington National Airport") or directly precede it ("Mount").
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re
from collections.abc import Mapping
from dataclasses import dataclass

_WORD = re.compile(r"[^\W\d_][\w'’.-]*")  # a word, with "St." and "O'Neil"
_FOLLOWING = 4  # capitalised words after a match that may still carry the context word


@dataclass(frozen=True)
class ContextRule:
    after: tuple[str, ...] = ()  # e.g. "Airport": "X Airport", "X Washington Airport"
    before: tuple[str, ...] = ()  # e.g. "Mount": "Mount X" (matched as written)


# Street and place words (USPS suffixes and geography), less those that are common surnames
# (Green, Hill, Ford, Brooks, Wells, Mills, Fields, Park...): "X Meadows" is a place.
PLACE_WORDS = ("Alley", "Bay", "Beach", "Bluff", "Boulevard", "Branch", "Brook", "Burg",
               "Bypass", "Canyon", "Causeway", "Circle", "Cliffs", "Corner", "Corners", "Court",
               "Courts", "Cove", "Creek", "Crescent", "Crossing", "Dam", "Estates",
               "Expressway", "Falls", "Ferry", "Flats", "Forest", "Forge", "Freeway", "Garden",
               "Gardens", "Gateway", "Glen", "Glens", "Grove", "Harbor", "Harbour", "Haven",
               "Heights", "Hills", "Hollow", "Inlet", "Island", "Islands", "Isle", "Junction",
               "Key", "Keys", "Knoll", "Lakes", "Landing", "Light", "Lights", "Locks", "Lodge",
               "Loop", "Mall", "Manor", "Meadow", "Meadows", "Mews", "Mountain", "Mountains",
               "Ocean", "Orchard", "Parkway", "Parks", "Passage", "Pines", "Place", "Plains",
               "Plaza", "Point", "Points", "Ports", "Prairie", "Ranch", "Rapids", "Ridge",
               "Ridges", "River", "Roads", "Route", "Rue", "Sea", "Shoals", "Shore", "Shores",
               "Skyway", "Springs", "Squares", "Stream", "Streets", "Summit", "Terrace",
               "Trace", "Trail", "Turnpike", "Valley", "Valleys", "Via", "Viaduct", "View",
               "Views", "Village", "Villages", "Vista", "Walk", "Way", "Ways")
ORGANISATION_WORDS = ("Airport", "University", "College", "School", "Academy", "Institute",
                      "Foundation", "Hospital", "Center", "Centre", "Library", "Museum",
                      "Stadium", "Arena", "Hall", "Building", "Tower", "Memorial", "Prize",
                      "Award", "Trust", "Fund", "Corporation", "Company", "Inc", "Inc.", "Ltd",
                      "Ltd.", "LLC", "GmbH", "AG", "SA", "S.A.", "Group", "Holdings", "Motors",
                      "Controls", "Club", "Times", "Review", "Bank", "Cross",
                      "Công", "Tập")  # Vietnamese "Công ty" (company), "Tập đoàn" (group)


@functools.cache
def street_types() -> tuple[str, ...]:
    """Street-type words of every Faker locale ("Calle", "rue", "Rambla", "Viale", "ulica"):
    a name right after one names a street ("Calle Julia Montserrat")."""
    try:
        package = importlib.import_module("faker.providers.address")
    except ImportError:
        return ()
    words: set[str] = set()
    for mod in pkgutil.iter_modules(package.__path__):
        provider = importlib.import_module(f"{package.__name__}.{mod.name}").Provider
        for attr in dir(provider):
            values = getattr(provider, attr)
            if (attr.startswith("street_") and ("prefix" in attr or "suffix" in attr)
                    and isinstance(values, tuple | list)):
                words.update(w for w in values if isinstance(w, str) and " " not in w
                             and len(w) > 2 and w[0].isalpha())
    return tuple(sorted(words))


def default_context() -> dict[str, ContextRule]:
    person = ContextRule(
        after=("Street", "St.", "Avenue", "Ave.", "Road", "Drive", "Lane", "Square", "Bridge",
               "Park", "Station", "Tunnel", "Highway", *PLACE_WORDS, *ORGANISATION_WORDS),
        before=("Mount", "Lake", "Fort", "Cape", "Port", *street_types()))
    return {"PERSON": person}


class ContextFilter:
    """Decides, for one text, which detected spans the rules exempt."""

    def __init__(self, rules: Mapping[str, ContextRule],
                 always: Mapping[str, tuple[str, ...]]):
        self.after = {e: {w.lower().rstrip(".") for w in r.after} for e, r in rules.items()}
        # as written ("Via" the street type, not "via" the preposition), and a lowercase word
        # capitalised too ("rue", "Rue")
        self.before = {e: {v for w in r.before for v in (w.rstrip("."), w[:1].upper()
                                                           + w[1:].rstrip("."))}
                       for e, r in rules.items()}
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
            inside = _WORD.findall(text[start:end])  # "Ronda Olga Almansa": a street
            if len(inside) > 2 and inside[0].rstrip(".") in before:
                return True
            head = text[:start].rstrip(" \t")
            words = _WORD.findall(head[-40:])
            if words and head.endswith(words[-1]) and words[-1].rstrip(".") in before:
                return True
        return False
