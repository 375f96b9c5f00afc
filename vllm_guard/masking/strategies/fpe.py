"""Format-preserving encryption (FF3-1) of digit-structured values under the operator's key.

The tweak is bound to the session, so the same value in two sessions encrypts differently.
Check digits are recomputed (Luhn, MOD 11-2) and other format rules are kept by cycle
walking (encrypt again until the recognizer accepts the result), which stays a bijection on
well-formed values, so :meth:`FpeStrategy.decrypt` inverts it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from datetime import date, timedelta

from vllm_guard.masking.strategies.base import Item, Strategy
from vllm_guard.masking.strategies.ff3_1 import FF3_1, TWEAK_BYTES
from vllm_guard.masking.strategies.formats import (
    cn_id_check,
    luhn_digit,
    phone_prefix_digits,
    well_formed,
    with_digits,
)

MAX_WALK = 1_000  # cycle-walking steps before a value falls back to its placeholder
_EPOCH = date(1800, 1, 1)
_DAYS = (date(2099, 12, 31) - _EPOCH).days + 1  # birth dates a CN ID's pattern allows


class _NoFpe(ValueError):
    """This value cannot be format-preserved (too short, not a real date): use a placeholder."""


class FpeStrategy(Strategy):
    name = "fpe"
    entities = ("PHONE_NUMBER", "CREDIT_CARD", "US_SSN", "CN_RESIDENT_ID")

    def __init__(self, key: bytes):
        self._ff3 = FF3_1(key)
        self._tweak_key = hmac.new(key, b"vllm-guard fpe tweak", hashlib.sha256).digest()

    def _tweak(self, session: bytes, entity: str, part: str) -> bytes:
        msg = session + f"\x00{entity}\x00{part}".encode()
        return hmac.new(self._tweak_key, msg, hashlib.sha256).digest()[:TWEAK_BYTES]

    def _walk(self, digits: str, tweak: bytes, ok: Callable[[str], bool], forward: bool) -> str:
        step = self._ff3.encrypt if forward else self._ff3.decrypt
        for _ in range(MAX_WALK):
            digits = step(digits, tweak)
            if ok(digits):
                return digits
        raise _NoFpe("cycle walk did not end")

    def render(self, item: Item, session: bytes, attempt: int) -> str | None:
        if attempt:
            return None  # deterministic: a collision falls back to the placeholder
        if not well_formed(item.entity, item.value):
            return None  # found by a term list or as a known value: no format to keep
        try:
            return self._apply(item.entity, item.value, session, forward=True)
        except _NoFpe:
            return None

    def decrypt(self, entity: str, text: str, session: bytes) -> str:
        return self._apply(entity, text, session, forward=False)

    def _apply(self, entity: str, value: str, session: bytes, forward: bool) -> str:
        digits = "".join(c for c in value if c.isdigit())

        def walk(part: str, name: str, ok: Callable[[str], bool]) -> str:
            if len(part) < self._ff3.min_len:
                raise _NoFpe(f"{len(part)} digits are too few for FF3-1")
            return self._walk(part, self._tweak(session, entity, name), ok, forward)

        if entity == "CREDIT_CARD":  # the network digit stays, the check digit is recomputed
            body = digits[0] + walk(digits[1:-1], "body", lambda d: True)
            return with_digits(value, body + luhn_digit(body))
        if entity == "CN_RESIDENT_ID":
            return self._cn_id(value, walk)
        if entity == "PHONE_NUMBER":
            head = digits[:phone_prefix_digits(value)]

            def ok(d: str) -> bool:  # the prefix rule must read the output as it read the input
                out = with_digits(value, head + d)
                return phone_prefix_digits(out) == len(head) and well_formed(entity, out)

            return with_digits(value, head + walk(digits[len(head):], "number", ok))
        if entity == "US_SSN":
            return with_digits(value, walk(digits, "ssn",
                                           lambda d: well_formed(entity, with_digits(value, d))))
        raise ValueError(f"fpe does not handle {entity}")

    @staticmethod
    def _cn_id(value: str, walk: Callable[[str, str, Callable[[str], bool]], str]) -> str:
        """Region code, and birth date + sequence (the date as a day number, so every output
        is a real date), each walked on its own; the MOD 11-2 check digit recomputed."""
        region, born, seq = value[:6], value[6:14], value[14:17]
        try:
            day = (date(int(born[:4]), int(born[4:6]), int(born[6:])) - _EPOCH).days
        except ValueError:
            raise _NoFpe("not a real birth date") from None
        if not 0 <= day < _DAYS:
            raise _NoFpe("birth date out of range")
        region = walk(region, "region", lambda d: d[0] != "0")
        day_seq = walk(f"{day:06d}{seq}", "born", lambda d: int(d[:6]) < _DAYS)
        born = f"{_EPOCH + timedelta(days=int(day_seq[:6])):%Y%m%d}"
        body = region + born + day_seq[6:]
        return body + cn_id_check(body)
