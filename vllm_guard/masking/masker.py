"""request -> fields -> detector pool -> vault -> masked request; response -> restorer.

Masking walks every string of the request (:mod:`vllm_guard.masking.fields`): prompt text is
rewritten, other strings must hold no sensitive value, the rest is refused. Restoration is exact:
``<TYPE_N>`` placeholders known to the session are replaced, longest first by construction
(one regex pass over complete tokens, so ``<PERSON_1>`` never touches ``<PERSON_10>``);
unknown ones are left as they are and counted.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from vllm_guard.asgi import RequestError
from vllm_guard.masking.detector import PLACEHOLDER
from vllm_guard.masking.fields import collect
from vllm_guard.masking.pool import DetectorPool
from vllm_guard.masking.vault import Vault, VaultFull
from vllm_guard.masking.worker import Analysis

METRICS: Counter[str] = Counter()  # masked_<ENTITY>, unknown_placeholders, vault_unavailable


def entity_of(placeholder_text: str) -> str:
    m = PLACEHOLDER.fullmatch(placeholder_text)
    return m.group(1) if m else ""


class TooManyValues(RequestError):
    def __init__(self, message: str, code: str):
        super().__init__(413, message, code)


@dataclass
class Masker:
    """Orchestrates one request: fields -> detector pool -> vault -> rewritten body."""

    pool: DetectorPool
    vault: Vault
    max_per_request: int = 1_000

    async def mask_request(self, namespace: str, route: str, body: dict) -> dict[str, str]:
        """Mask ``body`` in place; return the session's placeholder -> value map.

        Raises :class:`RequestError` (4xx) for what cannot be masked, for a sensitive value in
        a field that cannot be rewritten, and when the caps on placeholders are reached."""
        slots = collect(route, body)
        known = await self.vault.mapping(namespace)
        pairs = [(v, entity_of(p)) for p, v in known.items()]
        results = await self.pool.analyse([s.holder[s.key] for s in slots],
                                          [s.mask for s in slots], pairs)
        wanted: dict[tuple[str, str], None] = {}
        for slot, res in zip(slots, results, strict=True):
            if res.spans and not slot.mask:
                raise RequestError(400, f"'{slot.path}' contains a sensitive value "
                                   f"({res.spans[0].entity}) and cannot be masked there",
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
        table = dict(zip(wanted, placeholders, strict=True))
        for slot, res in zip(slots, results, strict=True):
            if slot.mask:
                slot.holder[slot.key] = _apply(res, table)
        for (entity, value), ph in table.items():
            METRICS[f"masked_{entity}"] += 1
            known[ph] = value
        return known


def _apply(res: Analysis, table: dict[tuple[str, str], str]) -> str:
    """One pass: the text with each span replaced by its placeholder."""
    out, pos = [], 0
    for sp in res.spans:
        out.append(res.text[pos:sp.start])
        out.append(table[(sp.entity, res.text[sp.start:sp.end])])
        pos = sp.end
    out.append(res.text[pos:])
    return "".join(out)


def restore(text: str, mapping: dict[str, str]) -> str:
    def sub(match: re.Match) -> str:
        value = mapping.get(match.group(0))
        if value is None:
            METRICS["unknown_placeholders"] += 1
            return match.group(0)
        return value

    return PLACEHOLDER.sub(sub, text)


def restore_response(body: dict, mapping: dict[str, str]) -> None:
    """Non-streamed: every choice's message content, text and tool-call arguments."""
    for choice in body.get("choices") or []:
        if isinstance(choice.get("text"), str):
            choice["text"] = restore(choice["text"], mapping)
        msg = choice.get("message")
        if isinstance(msg, dict):
            _restore_message(msg, mapping)


def _restore_message(msg: dict, mapping: dict[str, str]) -> None:
    if isinstance(msg.get("content"), str):
        msg["content"] = restore(msg["content"], mapping)
    for call in msg.get("tool_calls") or []:
        fn = call.get("function") or {}
        if isinstance(fn.get("arguments"), str):
            fn["arguments"] = restore(fn["arguments"], mapping)


@dataclass
class StreamRestorer:
    """Incremental restoration: holds back only a trailing fragment that could still become one
    of this session's placeholders; everything else is released at once (so output such as
    ``<ABC...`` that can never be restored does not stall the stream until the end)."""

    mapping: dict[str, str]
    held: dict[tuple[int, str], str] = field(default_factory=dict)  # (choice, field) -> text

    def feed(self, key: tuple[int, str], text: str) -> str:
        buf = self.held.pop(key, "") + text
        cut = buf.rfind("<")
        if cut >= 0 and self._could_become_placeholder(buf[cut:]):
            self.held[key] = buf[cut:]
            buf = buf[:cut]
        return restore(buf, self.mapping)

    def _could_become_placeholder(self, fragment: str) -> bool:
        return any(p.startswith(fragment) and p != fragment for p in self.mapping)

    def flush(self, key: tuple[int, str]) -> str:
        return restore(self.held.pop(key, ""), self.mapping)

    def restore_chunk(self, chunk: dict) -> None:
        """Rewrite one SSE ``data:`` object (chat or completion chunk) in place."""
        for choice in chunk.get("choices") or []:
            idx = choice.get("index", 0)
            done = choice.get("finish_reason") is not None
            if isinstance(choice.get("text"), str):
                choice["text"] = self._field(idx, "text", choice["text"], done)
            delta = choice.get("delta")
            if isinstance(delta, dict):
                if isinstance(delta.get("content"), str) or (done and (idx, "content") in
                                                            self.held):
                    delta["content"] = self._field(idx, "content", delta.get("content") or "",
                                                   done)
                for call in delta.get("tool_calls") or []:
                    fn = call.get("function") or {}
                    if isinstance(fn.get("arguments"), str):
                        key = f"tool{call.get('index', 0)}"
                        fn["arguments"] = self._field(idx, key, fn["arguments"], done)

    def _field(self, idx: int, name: str, text: str, done: bool) -> str:
        out = self.feed((idx, name), text)
        return out + self.flush((idx, name)) if done else out

    def pending(self) -> str:
        return "".join(restore(v, self.mapping) for v in self.held.values())
