"""request -> fields -> detector pool -> vault -> masked request (the response side is
:mod:`vllm_guard.masking.restorer`).

Masking walks every string of the request (:mod:`vllm_guard.masking.fields`): prompt text is
rewritten, other strings must hold no sensitive value, the rest is refused.
"""

from __future__ import annotations

import itertools
import re
from bisect import bisect_left
from dataclasses import dataclass, field

from vllm_guard.asgi import RequestError
from vllm_guard.masking.fields import collect
from vllm_guard.masking.metrics import METRICS
from vllm_guard.masking.pool import DetectorPool
from vllm_guard.masking.restorer import StandInMap
from vllm_guard.masking.strategies import StandIns
from vllm_guard.masking.types import PLACEHOLDER, known_numbers, sensitive_number
from vllm_guard.masking.vault import Vault, VaultFull
from vllm_guard.masking.worker import Analysis, ValueLimit


def entity_of(placeholder_text: str) -> str:
    m = PLACEHOLDER.fullmatch(placeholder_text)
    return m.group(1) if m else ""


class TooManyValues(RequestError):
    def __init__(self, message: str, code: str):
        super().__init__(413, message, code)


@dataclass
class Masker:
    """Orchestrates one request: fields -> detector pool -> vault -> stand-ins -> rewritten
    body."""

    pool: DetectorPool
    vault: Vault
    max_per_request: int = 1_000
    stand_ins: StandIns = field(default_factory=lambda: StandIns({}))

    def _too_many(self, found: str) -> TooManyValues:
        return TooManyValues(f"request has {found} new sensitive values, more than the "
                             f"{self.max_per_request} allowed per request",
                             "too_many_sensitive_values")

    async def mask_request(self, namespace: str, route: str, body: dict,
                           server_set: frozenset[str] = frozenset()) -> StandInMap:
        """Mask ``body`` in place; return the session's stand-in -> value map (stand-ins are
        placeholders, or what each entity's strategy renders).

        ``server_set``: paths of control values the server wrote itself (never scanned).
        Raises :class:`RequestError` (4xx) for what cannot be masked, for a sensitive value in
        a field that cannot be rewritten, and when the caps on placeholders are reached."""
        slots = [s for s in collect(route, body) if s.mask or s.path not in server_set]
        known = await self.vault.mapping(namespace)
        pairs = [(v, entity_of(p)) for p, v in known.items()]
        try:  # the worker counts as it detects: past the cap, it stops and says so
            results = await self.pool.analyse([s.holder[s.key] for s in slots],
                                              [s.mask for s in slots], pairs,
                                              self.max_per_request)
        except ValueLimit as e:
            raise self._too_many(f"at least {e.found}") from None
        wanted: dict[tuple[str, str], None] = {}
        for slot, res in zip(slots, results, strict=True):
            if slot.mask:
                for sp in res.spans:
                    wanted[(sp.entity, res.text[sp.start:sp.end])] = None
        numbers: dict[str, str] | None = None
        for slot, res in zip(slots, results, strict=True):
            if slot.mask:
                continue
            entity = res.spans[0].entity if res.spans else None
            if slot.number:  # the one number rule: checksummed or known (this request too)
                if numbers is None:
                    numbers = known_numbers([(v, entity_of(p)) for p, v in known.items()]
                                            + [(v, e) for e, v in wanted])
                entity = sensitive_number(res.text, res.spans, numbers)
            if entity is not None:
                why = " (a JSON number cannot become a placeholder)" if slot.number else ""
                raise RequestError(400, f"'{slot.path}' contains a sensitive value "
                                   f"({entity}) and cannot be masked there{why}",
                                   "sensitive_value_in_control_field")
        by_value = {(entity_of(p), v): p for p, v in known.items()}
        new = [k for k in wanted if k not in by_value]
        if len(new) > self.max_per_request:
            raise self._too_many(str(len(new)))
        try:
            placeholders = await self.vault.assign_many(namespace, list(wanted))
        except VaultFull as e:
            raise TooManyValues(str(e), "session_full") from None
        for (entity, value), ph in zip(wanted, placeholders, strict=True):
            METRICS[f"masked_{entity}"] += 1
            known[ph] = value
        shown = self.stand_ins.table(namespace, known)
        table = {k: shown[ph] for k, ph in zip(wanted, placeholders, strict=True)}
        names = dict(zip(wanted, placeholders, strict=True))
        # every placeholder of the session restores (a glued value is shown as its
        # placeholder), then the literal stand-ins
        mapping = StandInMap({**known, **{shown[ph]: value for ph, value in known.items()}})
        typed = _bracketed([s.holder[s.key] for s in slots if s.mask])
        for slot, res in zip(slots, results, strict=True):
            if slot.mask:
                raw = slot.holder[slot.key]
                slot.holder[slot.key] = apply_placeholders(res, table, names)
                if "<" in raw:
                    mapping.update(typed_look_alikes(raw, res, table, names, typed))
        return mapping


def _word_char(c: str) -> bool:
    return c.isascii() and c.isalnum()


def apply_placeholders(res: Analysis, table: dict[tuple[str, str], str],
                       names: dict[tuple[str, str], str] | None = None,
                       start: int = 0, end: int | None = None) -> str:
    """One pass: ``res.text[start:end]`` with each span replaced by its stand-in. A literal
    stand-in that would touch a letter or digit ("4968 4034 8450 1448ri") is shown as its
    placeholder instead (``names``): glued, it could not be told from a longer word, so it
    would come back unrestored."""
    end = len(res.text) if end is None else end
    spans = res.spans
    if start or end < len(res.text):  # spans are sorted and disjoint
        spans = spans[bisect_left([sp.start for sp in spans], start):]
        spans = list(itertools.takewhile(lambda sp: sp.end <= end, spans))
    shown = [table[(sp.entity, res.text[sp.start:sp.end])] for sp in spans]
    out, pos = [], start
    for i, sp in enumerate(spans):
        out.append(res.text[pos:sp.start])
        text = shown[i]
        if names is not None:
            before = res.text[sp.start - 1:sp.start] if sp.start > pos or not i else out[-2]
            after = (shown[i + 1] if i + 1 < len(spans) and spans[i + 1].start == sp.end
                     else res.text[sp.end:sp.end + 1])
            if ((_word_char(text[0]) and _word_char(before[-1:]))
                    or (_word_char(text[-1]) and _word_char(after[:1]))):
                text = names[(sp.entity, res.text[sp.start:sp.end])]
        out.append(text)
        pos = sp.end
    out.append(res.text[pos:end])
    return "".join(out)


_NEUTRAL = re.compile(r"\u2039[^\u2039\u203a]{0,200}\u203a")


def _bracketed(texts: list[str]) -> set[str]:
    """``‹...›`` the client typed itself (rare: only searched where '‹' occurs)."""
    return {m.group() for t in texts if "\u2039" in t for m in _NEUTRAL.finditer(t)}


def typed_look_alikes(raw: str, res: Analysis, table: dict[tuple[str, str], str],
                      names: dict[tuple[str, str], str], typed: set[str]) -> dict[str, str]:
    """Masked neutral form -> the look-alike as the client typed it (``<PERSON_1>``, shown
    to the engine as ``‹PERSON 1›``), so an echo comes back as typed. Neutralising keeps
    lengths, so the typed form's offsets hold in ``res.text``. Skipped (it stays neutral)
    where the client also typed a neutral form itself (``typed``) or a value crosses its
    edge: the restore must never guess."""
    out: dict[str, str] = {}
    starts = [sp.start for sp in res.spans]
    for m in PLACEHOLDER.finditer(raw):
        a, b = m.span()
        i = bisect_left(starts, a)
        crosses = bool(i) and res.spans[i - 1].end > a
        while not crosses and i < len(res.spans) and res.spans[i].start < b:
            crosses = res.spans[i].end > b
            i += 1
        if crosses:
            continue
        masked = apply_placeholders(res, table, names, a, b)
        if res.text[a:b] not in typed and masked not in typed:
            out[masked] = m.group()
    return out
