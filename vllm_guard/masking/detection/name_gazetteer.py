"""First and last names from many countries: the US census lists (PyPI ``names``) and the
name lists of every Faker locale (86: European, South and East Asian, African, Arabic,
Cyrillic), lower-cased, with an accent-free twin of each ("müller" and "muller").

PyPI ``names-dataset`` was considered and left out: its 1.7 M names come from the 2021
Facebook leak, not a source a privacy tool should ship.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import unicodedata
from dataclasses import dataclass
from importlib import resources

# locales whose names are written family name first ("Nguyen Van An", "Tanaka Hiroshi")
FAMILY_FIRST = ("ja_JP", "zh_CN", "zh_TW", "ko_KR", "vi_VN")


@dataclass(frozen=True, eq=False)
class Gazetteer:
    first: frozenset[str]
    last: frozenset[str]
    family_first: frozenset[str]  # last names of FAMILY_FIRST locales
    given_after: frozenset[str]  # their first and middle names

    @functools.cached_property
    def known(self) -> frozenset[str]:
        return self.first | self.last


def fold(word: str) -> str:
    """Lower-case letters only, accents kept."""
    return "".join(c for c in word.casefold() if c.isalpha())


def _ascii(word: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", word) if not unicodedata.combining(c))


def _add(target: set[str], words) -> None:  # noqa: ANN001 - any iterable of names
    for w in words:
        if isinstance(w, str):
            for part in w.replace("-", " ").split():
                key = fold(part)
                if len(key) > 1:
                    target.add(key)
                    target.add(_ascii(key))


def _census() -> tuple[list[str], list[str]]:
    try:
        root = resources.files("names")
    except ModuleNotFoundError:
        return [], []

    def read(*files: str) -> list[str]:
        return [line.split(maxsplit=1)[0] for f in files
                for line in (root / f).read_text().splitlines() if line.strip()]

    return read("dist.male.first", "dist.female.first"), read("dist.all.last")


@functools.cache
def common_surnames(n: int = 2000) -> frozenset[str]:
    """The ``n`` commonest US surnames (the census list is in frequency order): "Green",
    "Hill", "Brooks" are people as often as places."""
    return frozenset(fold(w) for w in _census()[1][:n])


@functools.cache
def _faker_names() -> tuple[frozenset[str], ...]:
    """First, last, family-first and given names of every Faker locale."""
    first: set[str] = set()
    last: set[str] = set()
    fam: set[str] = set()
    given: set[str] = set()
    package = importlib.import_module("faker.providers.person")
    for mod in pkgutil.iter_modules(package.__path__):
        provider = importlib.import_module(f"{package.__name__}.{mod.name}").Provider
        for attr in dir(provider):
            values = getattr(provider, attr)
            if attr.startswith("_") or not isinstance(values, tuple | list | dict):
                continue
            # "first_names_female", "male_last_names", "last_romanized_names", ...
            is_first = any(k in attr for k in ("first_name", "first_romanized", "middle_name"))
            is_last = any(k in attr for k in ("last_name", "last_romanized"))
            if is_first:
                _add(first, values)
                if mod.name in FAMILY_FIRST:
                    _add(given, values)
            elif is_last:
                _add(last, values)
                if mod.name in FAMILY_FIRST:
                    _add(fam, values)
    return frozenset(first), frozenset(last), frozenset(fam), frozenset(given)


def faker_names() -> frozenset[str]:
    """Every first and last name of Faker's locales (not the census lists)."""
    first, last, _, _ = _faker_names()
    return first | last


@functools.cache
def gazetteer(faker_locales: bool = True) -> Gazetteer:
    first: set[str] = set()
    last: set[str] = set()
    census_first, census_last = _census()
    _add(first, census_first)
    _add(last, census_last)
    fam: frozenset[str] = frozenset()
    given: frozenset[str] = frozenset()
    if faker_locales:
        f_first, f_last, fam, given = _faker_names()
        first |= f_first
        last |= f_last
    return Gazetteer(frozenset(first), frozenset(last), fam, given)
