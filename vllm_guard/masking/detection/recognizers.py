"""Presidio recognizers with checksums, written for mixed English/Chinese text.

Word boundaries (``\\b``) never fire next to CJK characters (they count as word characters),
so every pattern uses explicit digit/letter look-arounds instead.
"""

from __future__ import annotations

import ipaddress

from presidio_analyzer import Pattern, PatternRecognizer

CN_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
CN_ID_CHECK = "10X98765432"


def cn_resident_id_valid(text: str) -> bool:
    """ISO 7064 MOD 11-2 check digit of an 18-character Chinese resident ID."""
    s = text.upper()
    if len(s) != 18 or not s[:17].isdigit():
        return False
    total = sum(int(c) * w for c, w in zip(s, CN_ID_WEIGHTS, strict=False))
    return CN_ID_CHECK[total % 11] == s[17]


def luhn_valid(text: str) -> bool:
    digits = [int(c) for c in text if c.isdigit()]
    if not 12 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


class _Checked(PatternRecognizer):
    """A single-entity pattern recognizer whose matches must pass ``check``.

    Class names carry a Guard prefix: Presidio looks its predefined recognizers up by class
    name among all subclasses, and would pick ours up under its own names.
    """

    entity = ""
    patterns_: tuple[tuple[str, str, float], ...] = ()

    def __init__(self) -> None:
        super().__init__(supported_entity=self.entity, name=type(self).__name__,
                         supported_language="en",
                         patterns=[Pattern(n, r, s) for n, r, s in self.patterns_])

    def check(self, text: str) -> bool | None:
        return None

    def validate_result(self, pattern_text: str) -> bool | None:
        return self.check(pattern_text)


class GuardCnResidentIdRecognizer(_Checked):
    entity = "CN_RESIDENT_ID"
    patterns_ = (("cn id", r"(?<![0-9A-Za-z])[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])"
                  r"(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?![0-9A-Za-z])", 0.5),)

    def check(self, text: str) -> bool:
        return cn_resident_id_valid(text)


class GuardCreditCardRecognizer(_Checked):
    """12-19 digits in groups, Luhn-checked: covers Mastercard 2-series, Visa 19, Maestro."""

    entity = "CREDIT_CARD"
    patterns_ = (
        ("card plain", r"(?<![\d+])(?<!\d[.-])\d{12,19}(?!\d|[.-]\d)", 0.3),
        ("card grouped", r"(?<![\d+])(?<!\d[.-])\d{4}(?:[ -]\d{4}){2,3}(?:[ -]\d{1,3})?"
                         r"(?!\d|[.-]\d)", 0.3),
        ("amex grouped", r"(?<![\d+])(?<!\d[.-])\d{4}[ -]\d{6}[ -]\d{4,5}(?!\d|[.-]\d)", 0.3),
    )

    def check(self, text: str) -> bool:
        return luhn_valid(text)


class GuardEmailRecognizer(_Checked):
    """ASCII e-mail addresses; no tldextract (it would try to download the suffix list)."""

    entity = "EMAIL_ADDRESS"
    patterns_ = (("email", r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+"
                  r"(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}(?![A-Za-z0-9-])", 0.9),)


class GuardPhoneRecognizer(_Checked):
    """CN mobiles (1[3-9]x, optional +86) and NANP/international formats Faker produces."""

    entity = "PHONE_NUMBER"
    patterns_ = (
        ("cn mobile", r"(?<!\d)(?<!\d\.)(?:\+?86[ -]?)?1[3-9]\d[ -]?\d{4}[ -]?\d{4}"
                      r"(?!\d|\.\d)", 0.8),
        ("nanp", r"(?<![\w.+-])(?:\+?1[ .-]?|001[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}"
                 r"[ .-]\d{4}(?:\s?(?:x|ext\.?)\s?\d{1,6})?(?!\d|\.\d)", 0.7),
        ("intl", r"(?<![\w.+])\+\d{1,3}[ .-]\d{1,4}(?:[ .-]\d{2,4}){2,4}(?!\d|\.\d)", 0.6),
        ("nanp plain", r"(?<![\d+])(?<!\d[.-])[2-9]\d{2}[2-9]\d{6}(?!\d|[.-]\d)", 0.5),
        ("cn landline", r"(?<!\d)(?<!\d[.-])0\d{2,3}-\d{7,8}(?!\d|[.-]\d)", 0.6),
    )


def ipv6_valid(text: str) -> bool:
    """A real IPv6 address (compressed, embedded IPv4, /prefix, %zone), by the stdlib."""
    addr, _, prefix = text.partition("/")
    if prefix and not (prefix.isdigit() and int(prefix) <= 128):
        return False
    try:
        ipaddress.IPv6Address(addr)
    except ValueError:
        return False
    return True


class GuardIpAddressRecognizer(_Checked):
    """IPv4, and IPv6 in every textual form; a candidate IPv6 must parse with ``ipaddress``
    (so times like 12:30:45, MAC addresses and C++'s ``std::`` are not addresses)."""

    entity = "IP_ADDRESS"
    patterns_ = (
        ("ipv4", r"(?<!\d)(?<!\d\.)(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
                 r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?:/\d{1,2})?(?!\d|\.\d)", 0.8),
        ("ipv6", r"(?<![\w:.%])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|:|"
                 r"\d{1,3}(?:\.\d{1,3}){3})(?:%[0-9A-Za-z]+)?(?:/\d{1,3})?(?![\w:%]|\.\w)",
         0.8),
    )

    def check(self, text: str) -> bool | None:
        return ipv6_valid(text) if ":" in text else None


class GuardUsSsnRecognizer(_Checked):
    entity = "US_SSN"
    patterns_ = (("ssn", r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])",
                  0.8),)


def builtin_recognizers() -> list[PatternRecognizer]:
    """Ours, plus Presidio's IBAN recognizer (mod-97 checked)."""
    from presidio_analyzer.predefined_recognizers import IbanRecognizer

    return [GuardCnResidentIdRecognizer(), GuardCreditCardRecognizer(), GuardEmailRecognizer(),
            GuardPhoneRecognizer(), GuardIpAddressRecognizer(), GuardUsSsnRecognizer(),
            IbanRecognizer()]
