"""Known multi-word names of places and companies that read like people: Vietnamese streets
named after historical figures ("Nguyễn Trãi", "Lê Văn Sỹ"), Polish towns ("Jelenia Góra"),
Turkish companies ("Çelik Enerji"). A PERSON match inside one is not a person (the operator's
always-sensitive list still wins).

Source: the fixed country, city, street and company lists of every Faker locale,
lower-cased, matched between word boundaries with one Aho-Corasick pass over the text.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

# fixed lists of whole names (not formats or parts): cities, streets, companies
_ATTRS = ("countries", "cities", "city_names", "real_city_names", "metropolitan_cities", "streets",
          "street_names", "historic_people_street_names", "frequent_street_names",
          "companies", "large_companies", "company_names")


def _lower(text: str) -> str:
    """Lower case of the same length (so offsets hold): "İ" would grow by one."""
    low = text.lower()
    return low if len(low) == len(text) else "".join(
        c.lower() if len(c.lower()) == 1 else c for c in text)


@functools.cache
def _faker_names() -> tuple[str, ...]:
    names: set[str] = set()
    for kind in ("address", "company"):
        try:
            package = importlib.import_module(f"faker.providers.{kind}")
        except ImportError:
            return ()
        for mod in pkgutil.iter_modules(package.__path__):
            provider = importlib.import_module(f"{package.__name__}.{mod.name}").Provider
            for attr in _ATTRS:
                values = getattr(provider, attr, ())
                if isinstance(values, dict):
                    values = list(values)
                names.update(_lower(v) for v in values if isinstance(v, str) and " " in v)
    return tuple(sorted(names))


@functools.cache
def _automaton():  # noqa: ANN202 - ahocorasick.Automaton | None
    names = _faker_names()
    if not names:
        return None
    import ahocorasick

    auto = ahocorasick.Automaton()
    for name in names:
        auto.add_word(name, len(name))
    auto.make_automaton()
    return auto


def place_spans(text: str) -> list[tuple[int, int]]:
    """Where known place and company names occur in ``text`` (whole words)."""
    auto = _automaton()
    if auto is None:
        return []
    low = _lower(text)
    out = []
    for end, length in auto.iter(low):
        start, stop = end - length + 1, end + 1
        if (start == 0 or not low[start - 1].isalnum()) and (
                stop == len(low) or not low[stop].isalnum()):
            out.append((start, stop))
    return out


def inside_place(places: list[tuple[int, int]], start: int, end: int) -> bool:
    return any(a <= start and end <= b for a, b in places)
