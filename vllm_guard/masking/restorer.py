"""response -> restorer -> client: this session's placeholders back to their values.

Exact: only ``<TYPE_N>`` placeholders in the session's mapping are replaced, in one regex pass
over complete tokens (``<PERSON_1>`` never touches ``<PERSON_10>``); unknown ones stay and
are counted. Non-streamed bodies are restored everywhere. Streams (SSE) are restored per
choice and field, per tool call, and per Responses output part: only a trailing fragment
that is still the start of one of the session's placeholders is held back, and whatever is
held goes out in its own field when that part finishes or the stream ends, for any reason.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass, field
from typing import Any

from vllm_guard.asgi import Message, Send
from vllm_guard.masking.detector import PLACEHOLDER
from vllm_guard.masking.masker import METRICS

Key = tuple  # (choice index, field name) or (event family, output index, part index)
CHOICE_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")


def restore(text: str, mapping: dict[str, str]) -> str:
    def sub(match) -> str:
        value = mapping.get(match.group(0))
        if value is None:
            METRICS["unknown_placeholders"] += 1
            return match.group(0)
        return value

    return PLACEHOLDER.sub(sub, text)


def restore_all(doc: Any, mapping: dict[str, str]) -> Any:
    """Every string in a JSON document (a complete response: nothing is held back)."""
    if isinstance(doc, str):
        return restore(doc, mapping)
    if isinstance(doc, list):
        return [restore_all(v, mapping) for v in doc]
    if isinstance(doc, dict):
        return {k: restore_all(v, mapping) for k, v in doc.items()}
    return doc


@dataclass
class StreamRestorer:
    """Incremental restoration, one held fragment per key."""

    mapping: dict[str, str]
    held: dict[Key, str] = field(default_factory=dict)

    def feed(self, key: Key, text: str) -> str:
        buf = self.held.pop(key, "") + text
        cut = buf.rfind("<")
        if cut >= 0 and self._could_become_placeholder(buf[cut:]):
            self.held[key] = buf[cut:]
            buf = buf[:cut]
        return restore(buf, self.mapping)

    def _could_become_placeholder(self, fragment: str) -> bool:
        return any(p.startswith(fragment) and p != fragment for p in self.mapping)

    def flush(self, key: Key) -> str:
        return restore(self.held.pop(key, ""), self.mapping)


class ResponseRestorer:
    """An ASGI ``send`` wrapper for one response of ``route``."""

    def __init__(self, send: Send, mapping: dict[str, str], route: str):
        self.send_downstream, self.mapping, self.route = send, mapping, route
        self.responses = route.rstrip("/").endswith("/responses")
        self.stream = StreamRestorer(mapping)
        self.start: Message | None = None
        self.streaming = self.ok = False
        self.pending = b""
        self.body: list[bytes] = []
        self.last: dict | None = None  # last chunk (chat/completions) for synthetic chunks
        self.last_delta: dict[Key, tuple[bytes, dict]] = {}  # Responses: last delta event
        self.ended = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            ctype = dict(message.get("headers", [])).get(b"content-type", b"")
            self.streaming = ctype.startswith(b"text/event-stream")
            self.ok = message.get("status", 200) == 200
            if self.streaming or not self.ok:
                await self.send_downstream(message)
            else:
                self.start = message  # sent with the restored body's length
            return
        if message["type"] != "http.response.body" or not self.ok:
            return await self.send_downstream(message)
        if self.streaming:
            return await self._stream(message)
        self.body.append(message.get("body", b""))
        if message.get("more_body"):
            return
        raw = b"".join(self.body)
        with contextlib.suppress(ValueError):  # not JSON: passes through as it is
            raw = json.dumps(restore_all(json.loads(raw), self.mapping)).encode()
        assert self.start is not None
        headers = [(k, v) for k, v in self.start.get("headers", []) if k != b"content-length"]
        headers.append((b"content-length", str(len(raw)).encode()))
        await self.send_downstream({**self.start, "headers": headers})
        await self.send_downstream({"type": "http.response.body", "body": raw})

    # --- streams --------------------------------------------------------------------------

    async def _stream(self, message: Message) -> None:
        data = self.pending + message.get("body", b"")
        events = data.split(b"\n\n")
        self.pending = events.pop()
        out = [self._event(e) for e in events]
        more = message.get("more_body", False)
        if not more:  # the stream ends here, [DONE] or not: nothing may stay held
            if self.pending.strip():
                out.append(self._event(self.pending))
            self.pending = b""
            if not self.ended:
                out.append(self._tail())
        await self.send_downstream({"type": "http.response.body", "body": b"".join(out),
                                    "more_body": more})

    def _event(self, event: bytes) -> bytes:
        lines = event.strip(b"\r\n").split(b"\n")
        data_i = next((i for i, ln in enumerate(lines) if ln.startswith(b"data:")), None)
        if data_i is None:
            return event + b"\n\n"
        payload = lines[data_i][5:].strip()
        if payload == b"[DONE]":
            self.ended = True
            return self._tail() + event + b"\n\n"
        try:
            doc = json.loads(payload)
        except ValueError:
            return event + b"\n\n"
        prefix = b"\n".join(lines[:data_i])
        if self.responses:
            return self._responses_event(prefix, doc)
        self._chunk(doc)
        self.last = doc
        return _frame(prefix, doc)

    def _chunk(self, chunk: dict) -> None:
        """Chat or completion chunk, in place."""
        for choice in chunk.get("choices") or []:
            idx = choice.get("index", 0)
            done = choice.get("finish_reason") is not None
            if isinstance(choice.get("text"), str) or (done and (idx, "text") in
                                                       self.stream.held):
                choice["text"] = self._field((idx, "text"), choice.get("text") or "", done)
            delta = choice.get("delta")
            if isinstance(delta, dict):
                for name in CHOICE_FIELDS:
                    if isinstance(delta.get(name), str) or (done and (idx, name) in
                                                            self.stream.held):
                        delta[name] = self._field((idx, name), delta.get(name) or "", done)
                for call in delta.get("tool_calls") or []:
                    fn = call.get("function") or {}
                    if isinstance(fn.get("arguments"), str):
                        key = (idx, "tool", call.get("index", 0))
                        fn["arguments"] = self._field(key, fn["arguments"], done)
                if done:  # tool arguments still held go out as arguments of their call
                    for key in [k for k in self.stream.held if k[:2] == (idx, "tool")]:
                        delta.setdefault("tool_calls", []).append(
                            {"index": key[2], "function": {"arguments": self.stream.flush(key)}})
            for k, v in choice.items():
                if k not in ("text", "delta"):
                    choice[k] = restore_all(v, self.mapping)

    def _field(self, key: Key, text: str, done: bool) -> str:
        out = self.stream.feed(key, text)
        return out + self.stream.flush(key) if done else out

    def _tail(self) -> bytes:
        """Synthetic events carrying every held fragment in its own field and choice."""
        if not self.stream.held:
            return b""
        if self.responses:
            out = b""
            for key in list(self.stream.held):
                prefix, doc = self.last_delta[key]
                out += _frame(prefix, {**doc, "delta": self.stream.flush(key)})
            return out
        base = {k: v for k, v in (self.last or {}).items() if k != "choices"}
        out = b""
        for key in sorted(self.stream.held, key=str):
            idx, name = key[0], key[1]
            tail = self.stream.flush(key)
            if name == "text":
                choice = {"index": idx, "text": tail, "finish_reason": None}
            elif name == "tool":
                choice = {"index": idx, "delta": {"tool_calls": [
                    {"index": key[2], "function": {"arguments": tail}}]}, "finish_reason": None}
            else:
                choice = {"index": idx, "delta": {name: tail}, "finish_reason": None}
            out += _frame(b"", {**base, "choices": [choice]})
        return out

    def _responses_event(self, prefix: bytes, doc: dict) -> bytes:
        kind = doc.get("type", "")
        if kind.endswith(".delta") and isinstance(doc.get("delta"), str):
            key = (kind[:-len(".delta")], doc.get("output_index", 0),
                   doc.get("content_index", doc.get("summary_index", 0)))
            self.last_delta[key] = (prefix, copy.deepcopy(doc))
            doc["delta"] = self.stream.feed(key, doc["delta"])
            return _frame(prefix, doc)
        head = b""
        if kind.endswith(".done"):  # the part is complete: its held fragment goes first
            key = (kind[:-len(".done")], doc.get("output_index", 0),
                   doc.get("content_index", doc.get("summary_index", 0)))
            if key in self.stream.held:
                last_prefix, last = self.last_delta[key]
                head = _frame(last_prefix, {**last, "delta": self.stream.flush(key)})
        return head + _frame(prefix, restore_all(doc, self.mapping))


def _frame(prefix: bytes, doc: dict) -> bytes:
    data = b"data: " + json.dumps(doc).encode() + b"\n\n"
    return prefix + b"\n" + data if prefix else data
