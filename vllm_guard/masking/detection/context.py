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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from vllm_guard.masking.detection.common_words import is_common
from vllm_guard.masking.detection.name_gazetteer import (
    common_surnames,
    faker_names,
    fold,
    gazetteer,
)
from vllm_guard.masking.detection.place_names import inside_place, place_spans

_WORD = re.compile(r"[^\W\d_][\w'’.-]*")  # a word, with "St." and "O'Neil"
_PARTICLES_AT_END = re.compile(r"(?:\s+(?:de|del|da|do|dos|das|di|della|la|le|des|du))+$")
# the lowercase word right after, past up to two capitalised ones ("Alfa Romeo Giulia reviews")
_NEXT_LOWER = re.compile(r"(?:[ \t][A-Z][\w-]*){0,2}[ \t]([a-z]+)\b(?!['’])")
_THE_BEFORE = re.compile(r"\b[Tt]he[ \t]+$")
_FOLLOWING = 4  # capitalised words after a match that may still carry the context word


@dataclass(frozen=True)
class ContextRule:
    after: tuple[str, ...] = ()  # e.g. "Airport": "X Airport", "X Washington Airport"
    before: tuple[str, ...] = ()  # e.g. "Mount": "Mount X" (matched as written)
    # as written, right after the match or from its last word on: "X e Filhos", "X - ME",
    # "X San. ve Tic." (an abbreviation only before a lowercase word or a comma)
    phrases: tuple[str, ...] = ()
    # first or last word of a match whose first word is no listed first name, even when the
    # word is a name too: "Andrade Grande", "Baria Nagar", "Evans Field" (not "Ariana Grande")
    unnamed_ends: tuple[str, ...] = ()
    # lowercase nouns right after the match (no possessive between) that make it a firm or a
    # product used as a modifier: "Morgan Stanley report", "Ford Mustang sales" (a plural
    # "s" is matched too); also any lowercase word after "the X": "the Calvin Klein campaign"
    nouns_after: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("after", "before", "phrases", "unnamed_ends", "nouns_after"):
            bad = [w for w in getattr(self, name) if not any(c.isalpha() for c in w)]
            if bad:  # "" would exempt every match
                raise ValueError(f"context rule '{name}' holds {bad[0]!r}: every entry needs "
                                 "a letter")


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
# towns and their parts: "Carson City", "Camden Town", "Roquetas de Mar", "Jastrzębie
# Zdrój", "Altstadt Nord"
ENGLISH_TOWN_WORDS = ("City", "Town", "Township", "County", "District", "Borough", "Village")
# (these lose any listed name: "Monte", "Serra", "Lubelski" are surnames too)
TOWN_WORDS = ("Mar", "Frontera", "Norte", "Sur", "Nord", "Süd", "Feld", "Zdrój", "Górny", "Górne",
              "Górna", "Dolny", "Dolne", "Dolna", "Wielki", "Wielkie", "Wielka", "Północ",
              "Południe", "Río", "Monte", "Alta", "Alto", "Baja", "Bajo", "Altas", "Bajas",
              # Polish towns take their region's adjective: "Tomaszów Lubelski"
              "Podlaski", "Lubelski", "Opolskie", "Opolski", "Warmiński", "Łódzki",
              "Mazowiecki", "Śląskie", "Śląska", "Pomorski", "Pomorskie", "Kujawski",
              "Świętokrzyski", "Wielkopolski", "Małopolski")
ORGANISATION_WORDS = ("Airport", "University", "College", "School", "Academy", "Institute",
                      "Foundation", "Hospital", "Center", "Centre", "Library", "Museum",
                      "Stadium", "Arena", "Hall", "Building", "Tower", "Memorial", "Prize",
                      "Award", "Trust", "Fund", "Corporation", "Company", "Inc", "Inc.", "Ltd",
                      "Ltd.", "LLC", "GmbH", "AG", "SA", "S.A.", "Group", "Holdings", "Motors",
                      "Controls", "Club", "Times", "Review", "Bank", "Cross", "Bros", "Bros.",
                      "Brothers",
                      "Công", "Tập")  # Vietnamese "Công ty" (company), "Tập đoàn" (group)
# organisation words that are no name part, matched anywhere after a span's first word
_ANYWHERE = frozenset({"công", "tập"})
NO_PLACES = ("en_MS",)  # Malaysian streets end in people's names ("Tun Razak")
COMPANY_PREFIX_LISTS = ("company_prefixes", "company_preffixes", "company_types")
# Indian place words: road, town, district, square, market
INDIAN_PLACE_WORDS = ("Marg", "Nagar", "Zila", "Chowk", "Ganj", "Bazaar", "Bazar", "Mandi")


# lowercase Faker street types that are also street words in English text; the other common
# English words among them ("put", "rang", "ring", "tie", "route") are ordinary words there
STREET_WORDS_IN_ENGLISH = frozenset({"avenue", "boulevard", "rue"})


def _before_forms(word: str) -> set[str]:
    """How a ``before`` word is matched: as written, and capitalised when written in lower
    case ("rue", "Rue"); never a lowercase common English word that is no street word in
    English, or "Please put Ana Smith on the list" would hide her. Abbreviations stay
    ("ul.")."""
    w = word.rstrip(".")
    if (w[:1].islower() and not word.endswith(".") and w not in STREET_WORDS_IN_ENGLISH
            and is_common(w)):
        return set()
    return {w, w[:1].upper() + w[1:]}


def fold_word(word: str) -> str:
    return fold(word.rstrip("."))


def _first_name(word: str) -> bool:
    return fold(word) in gazetteer().first


def _faker_lists(kind: str, wanted: Callable[[str], bool],
                 skip: tuple[str, ...] = ()) -> Iterator[list[str]]:
    """The string lists of every Faker locale's ``kind`` provider ("address", "company")
    whose attribute name passes ``wanted``, but for the locales in ``skip``; nothing without
    Faker."""
    try:
        package = importlib.import_module(f"faker.providers.{kind}")
    except ImportError:
        return
    for mod in pkgutil.iter_modules(package.__path__):
        if mod.name in skip:
            continue
        provider = importlib.import_module(f"{package.__name__}.{mod.name}").Provider
        for attr in dir(provider):
            values = getattr(provider, attr)
            if wanted(attr) and isinstance(values, tuple | list | dict):  # dict: weighted
                yield [v for v in values if isinstance(v, str)]


def _single_words(lists: Iterator[list[str]]) -> set[str]:
    return {w for values in lists for w in values
            if " " not in w and len(w) > 2 and w[0].isupper() and w.isalpha()}


@functools.cache
def street_types() -> tuple[str, ...]:
    """Street-type words of every Faker locale ("Calle", "rue", "Rambla", "Viale", "ulica"):
    a name right after one names a street ("Calle Julia Montserrat")."""
    lists = _faker_lists("address", lambda a: a.startswith("street_")
                         and ("prefix" in a or "suffix" in a))
    return tuple(sorted({w for values in lists for w in values
                         if " " not in w and len(w) > 2 and w[0].isalpha()}))


@functools.cache
def place_suffixes() -> tuple[str, ...]:
    """Last words of the town and street suffixes of every Faker locale ("Ville", "Paulista",
    "Trafficway", "Burgs"), less names ("Green", "Grande", "Serra"): "Stacey Run" is a
    place, "Ariana Grande" a person."""
    # rare US surnames ("Mill", "Row", "Union") stay place words; Faker's names, first names
    # and common surnames ("Grande", "Cliff", "Wells") do not
    names = faker_names() | gazetteer().first | common_surnames(5000)
    words: set[str] = set()
    for values in _faker_lists("address", lambda a: a.startswith(("street_suffix",
                                                                  "city_suffix")), NO_PLACES):
        for value in values:
            last = value.split()[-1] if value.split() else ""
            if len(last) > 2 and last[0].isupper() and last.isalpha() and fold(last) not in names:
                words.add(last)
    return tuple(sorted(words))


@functools.cache
def company_words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Company prefixes ("Grupa", "Transportes", "Hermanos") and the first words of company
    suffixes ("Sp.", "S.L.", "San.", "KG") of every Faker locale: (before, after)."""
    def heads(lists: Iterator[list[str]]) -> set[str]:
        out = set()
        for value in (v for values in lists for v in values):
            parts = value.split()
            # not the head of a lowercase phrase: "Doanh nghiệp" (enterprise), Doanh a name
            if (parts and len(parts[0]) > 1 and parts[0][0].isupper()
                    and not (len(parts) > 1 and parts[1][0].islower())):
                out.add(parts[0])
        return out

    before = heads(_faker_lists("company", lambda a: a in COMPANY_PREFIX_LISTS))
    after = heads(_faker_lists("company", lambda a: a == "company_suffixes"))
    # after-words are matched in any case: short acronyms would hit given names ("BA" and
    # "Ba", "Ky"); "S.L." and "GmbH" stay
    after = {w for w in after if "." in w or len(w) > 3 or w in ("AG", "KG", "SA", "SPA")}
    return _not_names(before), _not_names(after)


@functools.cache
def company_phrases() -> tuple[str, ...]:
    """Company suffixes of every Faker locale that a single word cannot carry: several words,
    a head that is no capital (lowercase or uncased: "e Filhos", "- ME", Thai words), or an
    abbreviation ("San.", "Ltda.", "Şti.")."""
    out = {v.strip() for values in _faker_lists("company", lambda a: a == "company_suffixes")
           for v in values if len(v) > 2
           and (" " in v.strip() or v.endswith(".") or not v[0].isupper())}
    return tuple(sorted(out, key=len, reverse=True))


@functools.cache
def unnamed_place_ends() -> tuple[str, ...]:
    """Street, town and company words of every Faker locale and ours, names included
    ("Grande", "Field", "Nagar", "Grupa"): they end (or start) a match only when its first
    word is no listed first name."""
    address = _faker_lists("address", lambda a: a.startswith(
        ("street_suffix", "city_suffix", "street_prefix", "city_prefix")), NO_PLACES)
    company = _faker_lists("company", lambda a: a in ("company_prefixes", "company_preffixes"))
    return tuple(sorted({*PLACE_WORDS, *TOWN_WORDS, *INDIAN_PLACE_WORDS, *ENGLISH_TOWN_WORDS,
                         *_single_words(address), *_single_words(company)}))


def _not_names(words) -> tuple[str, ...]:  # noqa: ANN001 - any iterable of words
    """``words`` less any listed first or last name: context words must never hide a
    person ("Ariana Grande", "Abdul Rahman", "Joan Serra")."""
    known = gazetteer().known
    return tuple(sorted({w for w in words if fold(w) not in known}))


# what follows a company, brand or product name used as a modifier; a person's name takes a
# possessive there ("Mary Smith's report"), a firm's does not ("Morgan Stanley report")
FIRM_NOUNS = ("report", "sales", "share", "stock", "earning", "revenue", "profit", "loss",
              "analyst", "advisor", "adviser", "broker", "fund", "index", "store", "outlet",
              "boutique", "dealership", "dealer", "campaign", "brand", "product", "model",
              "price", "customer", "client", "employee", "executive", "subsidiary",
              "headquarters", "factory", "plant", "delivery", "recall", "owner", "lineup",
              "jacket", "suit", "handbag", "bag", "shoe", "watch", "motorcycle", "car",
              "truck", "tractor", "engine", "whiskey", "beer", "wine", "cosmetic", "perfume",
              "magazine", "paint", "review", "phone", "laptop", "printer", "app", "software",
              "account", "card", "bond", "deal", "merger", "acquisition", "ipo", "ceo",
              "spokesperson", "spokesman", "spokeswoman", "logo", "ad", "advert", "commercial",
              "collection", "line", "range", "shop", "branch", "office", "staff", "bank",
              "shareholder", "investor", "dividend", "valuation", "market", "retail")


def default_context() -> dict[str, ContextRule]:
    prefixes, suffixes = company_words()
    person = ContextRule(
        after=("Street", "St.", "Avenue", "Ave.", "Road", "Drive", "Lane", "Square", "Bridge",
               "Park", "Station", "Tunnel", "Highway", "Port", "Walks", *PLACE_WORDS,
               *ORGANISATION_WORDS, *ENGLISH_TOWN_WORDS,
               *_not_names((*TOWN_WORDS, *INDIAN_PLACE_WORDS)), *suffixes, *place_suffixes()),
        before=("Mount", "Lake", "Fort", "Cape", "Port", "C.", "Av.", "Avda.", "Pza.",
                *street_types(), *prefixes),
        phrases=company_phrases(), unnamed_ends=unnamed_place_ends(), nouns_after=FIRM_NOUNS)
    return {"PERSON": person}


class ContextFilter:
    """Decides, for one text, which detected spans the rules exempt."""

    def __init__(self, rules: Mapping[str, ContextRule],
                 always: Mapping[str, tuple[str, ...]], known_places: bool = False):
        self.after = {e: {w.lower().rstrip(".") for w in r.after} for e, r in rules.items()}
        # as written ("Via" the street type, not "via" the preposition), and a lowercase word
        # capitalised too ("rue", "Rue")
        self.before = {e: {v for w in r.before for v in _before_forms(w)}
                       for e, r in rules.items()}
        # one alternation per entity, longest first (so "S.L.U." wins over "S.L.")
        self.phrases = {e: re.compile("|".join(map(re.escape, sorted(r.phrases, key=len,
                                                                     reverse=True))))
                        for e, r in rules.items() if r.phrases}
        self.unnamed_ends = {e: {fold_word(w) for w in r.unnamed_ends} for e, r in rules.items()}
        self.nouns_after = {e: {w.lower() for w in r.nouns_after} for e, r in rules.items()
                            if r.nouns_after}
        self.always = {t.lower() for terms in always.values() for t in terms}
        self.known_places = known_places
        self._places: tuple[str, list[tuple[int, int]]] = ("", [])  # the last text's

    def _in_known_place(self, text: str, start: int, end: int) -> bool:
        cached = self._places  # one read: threads may share the filter
        if cached[0] is not text:
            cached = (text, place_spans(text))
            self._places = cached
        return inside_place(cached[1], start, end)

    def is_always(self, value: str) -> bool:
        return value.lower() in self.always

    def exempt(self, text: str, start: int, end: int, entity: str) -> bool:
        """True if a context word of ``entity`` follows or precedes ``text[start:end]``."""
        if entity == "PERSON" and self.known_places and self._in_known_place(text, start, end):
            return True
        after, before = self.after.get(entity), self.before.get(entity)
        if self._modifier(text, start, end, self.nouns_after.get(entity)):
            return True
        if self._firm_phrase(text, start, end, self.phrases.get(entity)):
            return True
        ends = self.unnamed_ends.get(entity)
        if ends:
            inside = _WORD.findall(text[start:end])
            first = inside[0] if inside else ""
            # an initial ("J. Grande", "W.C. Fields") is no evidence either way: a person
            if (len(inside) > 1 and "." not in first and len(first) > 2
                    and not _first_name(first)
                    and (fold_word(inside[-1]) in ends or fold_word(first) in ends)):
                return True
        if after:
            # the last word inside too: NER may swallow it ("X Reagan St."); a hand-written
            # organisation word anywhere after the first ("Dương Tập Đoàn")
            inside = [w.lower().rstrip(".") for w in _WORD.findall(text[start:end])]
            if len(inside) > 1 and (inside[-1] in after or any(
                    w in after and w in _ANYWHERE for w in inside[1:])):
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
            # two words only when the first is no first name ("Grupa Katana", not "Glen Smith")
            if inside and inside[0].rstrip(".") in before and (
                    len(inside) > 2 or (len(inside) == 2 and not _first_name(inside[0]))):
                return True
            # the word before, past particles and first names: "Plaza de Josefa Salinas",
            # "C. de Modesta", "Travessa Ana Lívia Teixeira"
            head = _PARTICLES_AT_END.sub("", text[:start].rstrip(" \t"))
            words = _WORD.findall(head[-60:])
            for _ in range(3):
                if not words or not head.endswith(words[-1]):
                    break
                if words[-1].rstrip(".") in before:
                    return True
                if not _first_name(words[-1]):
                    break
                head = head[:-len(words[-1])].rstrip(" \t")
                words.pop()
        return False

    @staticmethod
    def _modifier(text: str, start: int, end: int, nouns: set[str] | None) -> bool:
        """A name used as a modifier of a lowercase noun: a firm or a product."""
        if not nouns:
            return False
        m = _NEXT_LOWER.match(text, end)
        if m is None:
            return False
        word = m.group(1)
        if word in nouns or (word.endswith("s") and word[:-1] in nouns):
            return True
        # "the Calvin Klein campaign": a determiner before, a lowercase word after
        return _THE_BEFORE.search(text, max(0, start - 5), start) is not None

    @staticmethod
    def _firm_phrase(text: str, start: int, end: int, phrases: re.Pattern | None) -> bool:
        """A company suffix right after the match, or from its last word on."""
        if phrases is None:
            return False
        last = _WORD.findall(text[start:end])
        tails = [text[end:].lstrip(" \t")]
        if len(last) > 1:
            tails.append(text[end - len(last[-1]):])
        for tail in tails:
            m = phrases.match(tail)
            if m is None:
                continue
            rest = tail[m.end():]
            if m.group().endswith("."):  # an abbreviation, not a sentence's end
                after, nxt = rest[:1], rest.lstrip(" \t")[:1]
                if (after and after in ",;)") or (after in (" ", "\t") and nxt.islower()):
                    return True
            elif not rest[:1].isalnum():
                return True
        return False
