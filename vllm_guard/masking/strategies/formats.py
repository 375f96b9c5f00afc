"""Whether a stand-in is well formed: the detector's own recognizer for the entity accepts it
whole (pattern and checksum), so the engine sees a value of the right shape."""

from __future__ import annotations

import functools
import re


@functools.cache
def _checks() -> dict[str, list[tuple[list[re.Pattern[str]], object]]]:
    # imported here, not at module level: recognizers load Presidio, and the config check
    # (strategies -> formats) must not (``vllm-guard serve`` runs it before exec'ing vLLM)
    from vllm_guard.masking.detection.recognizers import builtin_recognizers

    out: dict[str, list] = {}
    for rec in builtin_recognizers():
        pats = [re.compile(p.regex, re.DOTALL) for p in rec.patterns]
        out.setdefault(rec.supported_entities[0], []).append((pats, rec))
    return out


def well_formed(entity: str, text: str) -> bool:
    for pats, rec in _checks().get(entity, []):
        if any(p.fullmatch(text) for p in pats) and rec.validate_result(text) is not False:
            return True
    return False


def luhn_digit(body: str) -> str:
    """The check digit that makes ``body`` + digit pass Luhn."""
    total = 0
    for i, c in enumerate(reversed(body)):
        d = int(c)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str(-total % 10)


def cn_id_check(body17: str) -> str:
    from vllm_guard.masking.detection.recognizers import CN_ID_CHECK, CN_ID_WEIGHTS  # see _checks

    return CN_ID_CHECK[sum(int(c) * w for c, w in zip(body17, CN_ID_WEIGHTS, strict=True)) % 11]


def iban_check(country: str, bban: str) -> str:
    """ISO 13616 check digits for ``country`` + ``bban``."""
    digits = "".join(str(int(c, 36)) for c in (bban + country).upper()) + "00"
    return f"{98 - int(digits) % 97:02d}"


def with_digits(template: str, digits: str) -> str:
    """``template`` with its digits replaced, in order, by ``digits`` (separators kept)."""
    it = iter(digits)
    return "".join(next(it) if c.isdigit() else c for c in template)


def phone_prefix_digits(value: str) -> int:
    """How many leading digits say where a number is, not whose: an international or trunk
    prefix group ("+49", "001", "010"), or NANP's and CN mobiles' leading 1."""
    m = re.match(r"\+?(\d+)", value)
    if m is None:
        return 0
    if value.startswith(("+", "0")):
        return len(m.group(1))
    return 1 if value.startswith("1") else 0
