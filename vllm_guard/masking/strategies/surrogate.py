"""Realistic stand-ins: a name for a name (from the value's locale where the name lists know
it), a well-formed number for a number, addresses from documentation ranges and reserved
domains. Drawn from a keyed seed, so a session's stand-ins are stable and unpredictable."""

from __future__ import annotations

import functools
import ipaddress
import random
import re
from datetime import date, timedelta

from vllm_guard.masking.strategies.base import Item, Strategy, session_seed
from vllm_guard.masking.strategies.formats import (
    cn_id_check,
    iban_check,
    luhn_digit,
    phone_prefix_digits,
    well_formed,
    with_digits,
)

# locales whose name lists decide a PERSON's locale; the first wins ties
LOCALES = ("en_US", "en_GB", "en_IN", "de_DE", "fr_FR", "es_ES", "it_IT", "pt_BR", "pl_PL",
           "tr_TR", "ja_JP", "vi_VN", "zh_CN")
_CJK = re.compile(r"[\u3400-\u9fff]")
# IPv4 documentation ranges (RFC 5737) and example domains (RFC 2606): never anyone's
TEST_NETS = ("192.0.2", "198.51.100", "203.0.113")
EXAMPLE_DOMAINS = ("example.com", "example.org", "example.net")


@functools.cache
def _faker(locale: str):  # noqa: ANN202 - faker.Faker, imported lazily
    from faker import Faker

    return Faker(locale)


@functools.cache
def _name_locales() -> dict[str, tuple[str, ...]]:
    """Name token -> the locales whose first- or last-name lists hold it."""
    import importlib

    index: dict[str, list[str]] = {}
    for loc in LOCALES:
        provider = importlib.import_module(f"faker.providers.person.{loc}").Provider
        tokens: set[str] = set()
        for attr in dir(provider):
            if attr.endswith(("first_names", "last_names")) or "romanized_names" in attr:
                tokens.update(t for t in getattr(provider, attr) if isinstance(t, str))
        for t in tokens:
            index.setdefault(t, []).append(loc)
    return {t: tuple(v) for t, v in index.items()}


def person_locale(value: str) -> str:
    if _CJK.search(value):
        return "zh_CN"
    index, votes = _name_locales(), dict.fromkeys(LOCALES, 0)
    for token in value.split():
        for loc in index.get(token.strip(".,"), ()):
            votes[loc] += 1
    return max(LOCALES, key=lambda loc: votes[loc])  # first of the best: en_US on no vote


def _person(value: str, rng: random.Random) -> str:
    locale = person_locale(value)
    fake = _faker(locale)
    fake.seed_instance(rng.getrandbits(64))
    if locale == "zh_CN":
        return fake.last_name() + fake.first_name()
    if locale == "ja_JP":
        first, last = fake.first_romanized_name(), fake.last_romanized_name()
    else:
        first, last = fake.first_name(), fake.last_name()
    return first if len(value.split()) == 1 else f"{first} {last}"


def _location(value: str, rng: random.Random) -> str:
    fake = _faker("zh_CN" if _CJK.search(value) else "en_US")
    fake.seed_instance(rng.getrandbits(64))
    return fake.city()


def _email(value: str, rng: random.Random) -> str:
    fake = _faker("en_US")
    fake.seed_instance(rng.getrandbits(64))
    user = f"{fake.first_name()}.{fake.last_name()}{rng.randrange(10, 100)}".lower()
    return f"{re.sub(r'[^a-z0-9.]', '', user)}@{rng.choice(EXAMPLE_DOMAINS)}"


def _phone(value: str, rng: random.Random) -> str:
    digits = [c for c in value if c.isdigit()]
    keep = phone_prefix_digits(value)
    new = digits[:keep] + [str(rng.randrange(10)) for _ in digits[keep:]]
    return with_digits(value, "".join(new))


def _card(value: str, rng: random.Random) -> str:
    digits = [c for c in value if c.isdigit()]
    body = digits[0] + "".join(str(rng.randrange(10)) for _ in digits[1:-1])
    return with_digits(value, body + luhn_digit(body))


def _iban(value: str, rng: random.Random) -> str:
    compact = value.replace(" ", "")
    country = compact[:2].upper()
    bban = "".join(str(rng.randrange(10)) if c.isdigit() else chr(65 + rng.randrange(26))
                   for c in compact[4:])
    new = country + iban_check(country, bban) + bban
    it = iter(new)
    return "".join(c if c == " " else next(it) for c in value)  # the value's grouping


def _ip(value: str, rng: random.Random) -> str:
    addr, slash, prefix = value.partition("/")
    if ":" in addr:
        net = ipaddress.IPv6Network("2001:db8::/32")  # RFC 3849 documentation prefix
        new = str(net[rng.randrange(1, net.num_addresses)])
    else:
        new = f"{rng.choice(TEST_NETS)}.{rng.randrange(1, 255)}"
    return new + slash + prefix


def _ssn(value: str, rng: random.Random) -> str:
    area = rng.choice([a for a in range(1, 900) if a != 666])
    return f"{area:03d}-{rng.randrange(1, 100):02d}-{rng.randrange(1, 10000):04d}"


def _cn_id(value: str, rng: random.Random) -> str:
    born = date(1950, 1, 1) + timedelta(days=rng.randrange(20_000))
    body = (f"{rng.randrange(110000, 660000)}{born:%Y%m%d}{rng.randrange(1000):03d}")
    return body + cn_id_check(body)


GENERATORS = {"PERSON": _person, "LOCATION": _location, "EMAIL_ADDRESS": _email,
              "PHONE_NUMBER": _phone, "CREDIT_CARD": _card, "IBAN_CODE": _iban,
              "IP_ADDRESS": _ip, "US_SSN": _ssn, "CN_RESIDENT_ID": _cn_id}
NEEDS_FORMAT_CHECK = frozenset({"PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS",
                                "US_SSN", "CN_RESIDENT_ID", "EMAIL_ADDRESS"})
MAX_DRAWS = 32  # per attempt, for formats a random draw can miss (a NANP area code)


class SurrogateStrategy(Strategy):
    name = "surrogate"
    entities = tuple(GENERATORS)

    def render(self, item: Item, session: bytes, attempt: int) -> str | None:
        rng = random.Random(session_seed(session, "surrogate", item.entity, item.number,
                                         attempt))
        make = GENERATORS[item.entity]
        for _ in range(MAX_DRAWS):
            out = make(item.value, rng)
            if item.entity not in NEEDS_FORMAT_CHECK or well_formed(item.entity, out):
                return out
        return None
