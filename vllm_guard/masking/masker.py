"""request -> fields -> detector pool -> vault -> masked request (the response side is
:mod:`vllm_guard.masking.restorer`).

Masking walks every string of the request (:mod:`vllm_guard.masking.fields`): prompt text is
rewritten, other strings must hold no sensitive value, the rest is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm_guard.asgi import RequestError
from vllm_guard.masking.fields import collect
from vllm_guard.masking.metrics import METRICS
from vllm_guard.masking.pool import DetectorPool
from vllm_guard.masking.restorer import StandInMap
from vllm_guard.masking.strategies import StandIns
from vllm_guard.masking.types import PLACEHOLDER
from vllm_guard.masking.vault import Vault, VaultFull
from vllm_guard.masking.worker import Analysis


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
        results = await self.pool.analyse([s.holder[s.key] for s in slots],
                                          [s.mask for s in slots], pairs)
        wanted: dict[tuple[str, str], None] = {}
        for slot, res in zip(slots, results, strict=True):
            if res.spans and not slot.mask:
                why = " (a JSON number cannot become a placeholder)" if slot.number else ""
                raise RequestError(400, f"'{slot.path}' contains a sensitive value "
                                   f"({res.spans[0].entity}) and cannot be masked there{why}",
                                   "sensitive_value_in_control_field")
            for sp in res.spans:
                wanted[(sp.entity, res.text[sp.start:sp.end])] = None
        by_value = {(entity_of(p), v): p for p, v in known.items()}
        new = [k for k in wanted if k not in by_value]
        if len(new) > self.max_per_request:
            raise TooManyValues(f"request has {len(new)} new sensitive values, more than the "
                                f"{self.max_per_request} allowed per request",
                                "too_many_sensitive_values")
        try:
            placeholders = await self.vault.assign_many(namespace, list(wanted))
        except VaultFull as e:
            raise TooManyValues(str(e), "session_full") from None
        for (entity, value), ph in zip(wanted, placeholders, strict=True):
            METRICS[f"masked_{entity}"] += 1
            known[ph] = value
        shown = self.stand_ins.table(namespace, known)
        table = {k: shown[ph] for k, ph in zip(wanted, placeholders, strict=True)}
        for slot, res in zip(slots, results, strict=True):
            if slot.mask:
                slot.holder[slot.key] = apply_placeholders(res, table)
        return StandInMap({shown[ph]: value for ph, value in known.items()})


def apply_placeholders(res: Analysis, table: dict[tuple[str, str], str]) -> str:
    """One pass: the text with each span replaced by its stand-in."""
    out, pos = [], 0
    for sp in res.spans:
        out.append(res.text[pos:sp.start])
        out.append(table[(sp.entity, res.text[sp.start:sp.end])])
        pos = sp.end
    out.append(res.text[pos:])
    return "".join(out)
