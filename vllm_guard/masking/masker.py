"""request -> detector -> vault -> masked request; response -> restorer -> response.

Masking walks the OpenAI request fields the model reads (chat message contents and text
parts, tool-call arguments in the history, completion prompts). Restoration is exact:
``<TYPE_N>`` placeholders known to the session are replaced, longest first by construction
(one regex pass over complete tokens, so ``<PERSON_1>`` never touches ``<PERSON_10>``);
unknown ones are left as they are and counted.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from vllm_guard.masking.detector import PLACEHOLDER, Detector
from vllm_guard.masking.vault import Vault

METRICS: Counter[str] = Counter()  # masked_<ENTITY>, unknown_placeholders, vault_unavailable


@dataclass
class Masker:
    detector: Detector
    vault: Vault

    async def mask_text(self, session: str, text: str, known: dict[str, str]) -> str:
        spans = self.detector.detect(text)
        # values already seen in the session are masked even where detection misses them
        seen = {v: p for p, v in known.items() if v and v in text}
        out, pos = [], 0
        for s in spans:
            value = text[s.start:s.end]
            ph = await self.vault.assign(session, s.entity, value)
            known[ph] = value
            METRICS[f"masked_{s.entity}"] += 1
            out.append(self._mask_seen(text[pos:s.start], seen))
            out.append(ph)
            pos = s.end
        out.append(self._mask_seen(text[pos:], seen))
        return "".join(out)

    @staticmethod
    def _mask_seen(text: str, seen: dict[str, str]) -> str:
        for value in sorted(seen, key=len, reverse=True):
            text = text.replace(value, seen[value])
        return text

    async def mask_request(self, session: str, body: dict) -> dict[str, str]:
        """Mask ``body`` in place; return the session's placeholder -> value map."""
        known = await self.vault.mapping(session)

        async def m(text: object) -> object:
            return await self.mask_text(session, text, known) if isinstance(text, str) else text

        for msg in body.get("messages") or []:
            if not isinstance(msg, dict):
                continue
            content = msg.get("content")
            if isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and part.get("type") == "text":
                        part["text"] = await m(part.get("text"))
            else:
                msg["content"] = await m(content)
            for call in msg.get("tool_calls") or []:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    fn["arguments"] = await m(fn.get("arguments"))
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            body["prompt"] = [await m(p) for p in prompt]
        elif prompt is not None:
            body["prompt"] = await m(prompt)
        return known


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
