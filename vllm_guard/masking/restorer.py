"""response -> restorer -> client: this session's placeholders back to their values.

Exact: only ``<TYPE_N>`` placeholders in the session's mapping are replaced, in one regex pass
over complete tokens (``<PERSON_1>`` never touches ``<PERSON_10>``); unknown ones stay as they
are and are counted (``METRICS["unknown_placeholders"]``). Literal stand-ins (surrogates, fpe)
restore as whole words; one glued to a letter or digit is left and counted
(``METRICS["unrestored_stand_ins"]``, the ``x-vllm-guard-unrestored`` header of a whole body,
an SSE comment at the end of a stream). Typed look-alikes come back as typed (the masker maps
their neutral form back).

Non-streamed bodies: every text the model produced or the response echoes (choices' text and
messages, Responses output items, ``output_text``, ``instructions``, ``input``, ``tools``);
never ids, enums or token lists (logprobs). Streams (SSE) are restored incrementally, per
choice and field, per tool call, and per Responses output part: only a trailing fragment that
is still a proper prefix of one of the session's placeholders is held back, and what is held
goes out in its own choice and field (tool-call arguments as arguments of the same call) when
that choice or part finishes, at ``[DONE]``, or at the last body message, whatever ends the
stream. Non-200 responses and bodies that are not a JSON object pass through unchanged.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from vllm_guard.asgi import Message, Send
from vllm_guard.masking.fields import RESPONSES, ROUTES
from vllm_guard.masking.metrics import METRICS
from vllm_guard.masking.types import PLACEHOLDER

# fields of a streamed chat delta that carry text, each restored on its own
CHAT_DELTA_FIELDS = ("content", "reasoning", "reasoning_content", "refusal")
# subtrees that are token lists (logprobs): tokens are pieces, never restored
TOKEN_KEYS = frozenset({"logprobs", "top_logprobs", "prompt_logprobs", "tokens", "token_ids",
                        "prompt_token_ids", "text_offset", "token_logprobs"})
# strings that name or classify things; never text the model wrote
ID_KEYS = frozenset({"id", "call_id", "item_id", "type", "object", "role", "status", "model",
                     "finish_reason", "stop_reason", "encrypted_content"})
# Responses: the top-level fields that are generated or echo the (masked) request
RESPONSE_TEXT_KEYS = ("output", "output_text", "instructions", "input", "tools",
                      "input_messages", "output_messages")
# Responses stream events: what names the part a delta belongs to
PART_INDEXES = ("output_index", "content_index", "summary_index")
# Responses stream events after which nothing of the response follows
TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed",
                             "error"})
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
UNRESTORED = "unrestored_stand_ins"  # the metric, and the response header below
UNRESTORED_HEADER = b"x-vllm-guard-unrestored"


class StandInMap(dict):
    """stand-in -> value for one request. Stand-ins are ``<TYPE_N>`` placeholders or literal
    text (surrogates, fpe values); the regex over the literals is compiled once, on first use.
    A literal that begins or ends with an ASCII letter or digit only matches as a whole word
    there ("Anna Berg" is not restored inside "Anna Bergmann"); such a literal glued to a
    letter or digit stays as it is and is counted (``METRICS["unrestored_stand_ins"]``: the
    masker never glues one, so only the model's own writing does)."""

    _pattern: re.Pattern[str] | None = None
    _glued: re.Pattern[str] | None = None
    _literals: list[str] | None = None

    def _compile(self) -> None:
        lits = [k for k in self if not PLACEHOLDER.fullmatch(k)]
        self._literals = sorted(lits)
        by_len = sorted(lits, key=len, reverse=True)  # longest first
        alts = [PLACEHOLDER.pattern] + [
            ("(?<![A-Za-z0-9])" if _ascii_alnum(k[0]) else "") + re.escape(k)
            + ("(?![A-Za-z0-9])" if _ascii_alnum(k[-1]) else "")
            for k in by_len]
        self._pattern = re.compile("|".join(alts)) if lits else PLACEHOLDER
        edged = [re.escape(k) for k in by_len if _ascii_alnum(k[0]) or _ascii_alnum(k[-1])]
        self._glued = re.compile("|".join(edged)) if edged else None

    @property
    def glued(self) -> re.Pattern[str] | None:
        """The literals with a letter or digit at an edge, without the whole-word rule."""
        if self._pattern is None:
            self._compile()
        return self._glued

    @property
    def pattern(self) -> re.Pattern[str]:
        if self._pattern is None:
            self._compile()
        assert self._pattern is not None
        return self._pattern

    @property
    def literals(self) -> list[str]:
        """The literal stand-ins, sorted (for prefix search)."""
        if self._literals is None:
            self._compile()
        assert self._literals is not None
        return self._literals


def _ascii_alnum(c: str) -> bool:
    return c.isascii() and c.isalnum()


def as_stand_ins(mapping: dict[str, str]) -> StandInMap:
    return mapping if isinstance(mapping, StandInMap) else StandInMap(mapping)


def restore(text: str, mapping: dict[str, str], *, count: bool = True,
            before: str = "") -> str:
    """``text`` with each stand-in of ``mapping`` replaced by its value; unknown placeholders
    stay (and are counted unless ``count`` is false: full texts re-sent after their
    deltas), so do literals glued to a letter or digit (counted too). ``before``: the text
    released just before ``text`` in a stream (its last character decides whether a
    literal at the start is a whole word, as in the whole text). Pass a
    :class:`StandInMap` on hot paths: a plain dict is compiled per call."""
    m = as_stand_ins(mapping)
    if "<" not in text and not m.literals:
        return text
    full, start = before[-1:] + text, len(before[-1:])
    out, pos = [], start
    restored: set[tuple[int, int]] = set()
    for match in m.pattern.finditer(full, start):  # look-behinds see ``before``
        value = m.get(match.group(0))
        if value is None:
            if count:
                METRICS["unknown_placeholders"] += 1
            continue
        out += (full[pos:match.start()], value)
        pos = match.end()
        restored.add(match.span())
    out.append(full[pos:])
    if count and m.glued is not None:  # a stand-in glued to a word: left, and counted
        left = sum(g.span() not in restored for g in m.glued.finditer(full, start))
        if left:
            METRICS[UNRESTORED] += left
    return "".join(out)


def restore_all(doc: Any, mapping: dict[str, str], *, count: bool = True) -> Any:
    """Every text string inside a JSON value, in place (the restored value is returned for a
    bare string); token lists and identifiers are left alone."""
    if isinstance(doc, str):
        return restore(doc, mapping, count=count)
    if isinstance(doc, list):
        for i, v in enumerate(doc):
            if isinstance(v, str | list | dict):
                doc[i] = restore_all(v, mapping, count=count)
    elif isinstance(doc, dict):
        for k, v in doc.items():
            if k in TOKEN_KEYS or (k in ID_KEYS and isinstance(v, str)):
                continue
            if isinstance(v, str | list | dict):
                doc[k] = restore_all(v, mapping, count=count)
    return doc


def restore_body(route: str, doc: dict, mapping: dict[str, str], *,
                 count: bool = True) -> None:
    """A complete response object of ``route`` (also the ``response`` of Responses stream
    events), in place."""
    if route == RESPONSES:
        for key in RESPONSE_TEXT_KEYS:
            if key in doc:
                doc[key] = restore_all(doc[key], mapping, count=count)
        return
    for choice in _list(doc.get("choices")):  # text, message: content, reasoning, tools
        restore_all(choice, mapping, count=count)
    if isinstance(doc.get("prompt_text"), str):  # the rendered prompt, echoed
        doc["prompt_text"] = restore(doc["prompt_text"], mapping, count=False)


@dataclass
class StreamRestorer:
    """Incremental restoration, one held fragment per key (choice and field, tool call,
    Responses part). Holds back only a trailing fragment that can still become one of this
    session's stand-ins (a complete literal that ends in a letter or digit included: the next
    character decides whether it is a whole word, restored, or glued, counted); everything
    else is released at once, so
    ``<ABC...`` that can never be restored does not stall the stream until the end."""

    mapping: StandInMap
    held: dict[Hashable, str] = field(default_factory=dict)
    # per key, the last character released (as the engine wrote it): the whole-word rule
    # at the start of the next piece looks at it, as it would in the whole text
    last: dict[Hashable, str] = field(default_factory=dict)
    _sorted: list[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.mapping = as_stand_ins(self.mapping)

    def feed(self, key: Hashable, text: str) -> str:
        buf = self.held.pop(key, "") + text
        cut = self._hold_from(buf)
        if cut < len(buf):
            self.held[key] = buf[cut:]
            buf = buf[:cut]
        return self._release(key, buf)

    def flush(self, key: Hashable) -> str:
        """What is held for ``key`` (restored as it stands: it never became a stand-in)."""
        return self._release(key, self.held.pop(key, ""))

    def _release(self, key: Hashable, buf: str) -> str:
        out = restore(buf, self.mapping, before=self.last.get(key, ""))
        if buf:
            self.last[key] = buf[-1]
        return out

    def _hold_from(self, buf: str) -> int:
        cut = len(buf)
        # a placeholder holds one '<', its first character: only the last '<' can start one
        lt = buf.rfind("<")
        if lt >= 0 and _prefix_of(self._placeholders(), buf[lt:], proper=True):
            cut = lt
        lits = self.mapping.literals
        if not lits:
            return cut
        longest = max(map(len, lits))
        for i in range(max(0, len(buf) - longest), cut):
            frag = buf[i:]
            # held even when glued to a word before it: a stand-in that comes out glued is
            # counted, so it must reach restore() whole, as in a whole body
            if _prefix_of(lits, frag, proper=not _ascii_alnum(frag[-1])):
                cut = i
                break
        # never split a stand-in that is complete before the cut: hold it whole
        for m in self.mapping.pattern.finditer(buf, max(0, cut - longest)):
            if m.start() < cut < m.end():
                return m.start()
        return cut

    def _placeholders(self) -> list[str]:
        if self._sorted is None:  # sorted once, only for streams that need it
            self._sorted = sorted(k for k in self.mapping if k.startswith("<"))
        return self._sorted


def _prefix_of(keys: list[str], fragment: str, proper: bool) -> bool:
    """Whether a sorted key starts with ``fragment`` (and is longer, if ``proper``)."""
    i = bisect_left(keys, fragment)  # the keys starting with fragment follow it
    if proper and i < len(keys) and keys[i] == fragment:
        i += 1
    return i < len(keys) and keys[i].startswith(fragment)


class _ChoiceStream:
    """``chat.completion.chunk`` / ``text_completion`` chunks: per choice, field, tool call."""

    def __init__(self, mapping: dict[str, str]):
        self.mapping = mapping
        self.text = StreamRestorer(mapping)
        self.base: dict[str, Any] = {}  # id, object, created, model of the stream's chunks

    def busy(self) -> bool:
        return bool(self.text.held)

    def data(self, doc: Any) -> list[Any]:
        if not isinstance(doc, dict):
            return [doc]
        self.base = {k: doc[k] for k in ("id", "object", "created", "model") if k in doc}
        for choice in _list(doc.get("choices")):
            if isinstance(choice, dict):
                self._choice(choice)
        if isinstance(doc.get("prompt_text"), str):  # echoed once, whole
            doc["prompt_text"] = restore(doc["prompt_text"], self.mapping, count=False)
        return [doc]

    def _choice(self, choice: dict) -> None:
        idx = choice.get("index", 0)
        if not isinstance(idx, int | str):  # not vLLM's: left as it is rather than fail
            return
        # by shape, not by route: a completion-shaped chunk on the chat route is restored too
        if isinstance(choice.get("text"), str):
            choice["text"] = self.text.feed((idx, "text"), choice["text"])
        if isinstance(choice.get("delta"), dict):
            delta = choice["delta"]
            for name in CHAT_DELTA_FIELDS:
                if isinstance(delta.get(name), str):
                    delta[name] = self.text.feed((idx, name), delta[name])
            for call in _list(delta.get("tool_calls")):
                fn = call.get("function") if isinstance(call, dict) else None
                if (isinstance(fn, dict) and isinstance(fn.get("arguments"), str)
                        and isinstance(call.get("index", 0), int | str)):
                    key = (idx, "tool", call.get("index", 0))
                    fn["arguments"] = self.text.feed(key, fn["arguments"])
        if choice.get("finish_reason") is not None:  # the choice is over: nothing may stay
            for key in [k for k in self.text.held if k[0] == idx]:
                self._put(choice, key, self.text.flush(key))

    def _put(self, choice: dict, key: Any, tail: str) -> None:
        """Append held text to its own field of ``choice``."""
        if key[1] == "text":
            choice["text"] = (choice.get("text") or "") + tail
            return
        if not isinstance(choice.get("delta"), dict):
            choice["delta"] = {}
        delta = choice["delta"]
        if key[1] != "tool":
            delta[key[1]] = (delta.get(key[1]) or "") + tail
            return
        if not isinstance(delta.get("tool_calls"), list):
            delta["tool_calls"] = []
        for call in reversed(delta["tool_calls"]):  # the call's own entry in this chunk
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and call.get("index", 0) == key[2]:
                fn["arguments"] = (fn.get("arguments") or "") + tail
                return
        delta["tool_calls"].append({"index": key[2], "function": {"arguments": tail}})

    def end(self) -> list[Any]:
        """One more chunk with what is still held, each in its own choice and field."""
        if not self.text.held:
            return []
        choices: dict[Any, dict] = {}
        for key in list(self.text.held):
            idx = key[0]
            if idx not in choices:  # _put adds "text" or "delta", as the held field was
                choices[idx] = {"index": idx, "logprobs": None, "finish_reason": None}
            self._put(choices[idx], key, self.text.flush(key))
        order = sorted(choices, key=lambda i: (0, i) if _is_int(i) else (1, 0))
        return [{**self.base, "choices": [choices[i] for i in order]}]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _list(v: Any) -> list:
    return v if isinstance(v, list) else []


def _index(doc: dict, name: str) -> int | None:
    v = doc.get(name)
    return v if _is_int(v) else None


class _EventStream:
    """Responses API events: ``*.delta`` restored per (event family, output_index,
    content_index, summary_index); whole texts (``*.done``, parts, items, the response)
    restored whole, after the held fragment of their part went out as one more delta."""

    def __init__(self, mapping: dict[str, str]):
        self.mapping = mapping
        self.text = StreamRestorer(mapping)
        self.last_delta: dict[Hashable, dict] = {}  # template for a synthetic delta event
        self.shift = 0  # synthetic events inserted so far: later sequence numbers move on
        self.last_seq: int | None = None

    def busy(self) -> bool:
        return bool(self.text.held) or self.shift > 0

    def data(self, doc: Any) -> list[Any]:
        if not isinstance(doc, dict):
            return [doc]
        kind = doc.get("type")
        kind = kind if isinstance(kind, str) else ""
        synth: list[dict] = []
        if kind.endswith(".delta") and isinstance(doc.get("delta"), str):
            key = (kind, *(_index(doc, name) for name in PART_INDEXES))
            self.last_delta[key] = {k: v for k, v in doc.items() if k != "delta"}
            doc["delta"] = self.text.feed(key, doc["delta"])
        else:
            if kind in TERMINAL_EVENTS:
                synth = self._flush(lambda key: True)
            elif kind.endswith(".done"):  # a part or item is complete: flush what is its
                where = {i: _index(doc, name) for i, name in enumerate(PART_INDEXES, 1)
                         if _index(doc, name) is not None}
                synth = self._flush(lambda key: all(key[i] == v for i, v in where.items()))
            # full texts repeat what the deltas carried: restored, but not counted again
            if isinstance(doc.get("response"), dict):
                restore_body(RESPONSES, doc["response"], self.mapping, count=False)
            else:
                restore_all(doc, self.mapping, count=False)
        self._number(synth, doc)
        return [*synth, doc]

    def _flush(self, match: Any) -> list[dict]:
        """Synthetic delta events (copies of each part's last delta) with the held text."""
        out = []
        for key in [k for k in self.text.held if match(k)]:
            ev = {**self.last_delta[key], "delta": self.text.flush(key)}
            if "logprobs" in ev:
                ev["logprobs"] = []  # belonged to the copied delta's tokens
            out.append(ev)
        return out

    def _number(self, synth: list[dict], doc: dict | None) -> None:
        """Synthetic events take the numbers after the last one sent and later events move
        on, so ``sequence_number`` stays unique and increasing."""
        seq = doc.get("sequence_number") if doc is not None else None
        if _is_int(seq):
            nxt = seq + self.shift
        elif self.last_seq is not None:
            nxt = self.last_seq + 1
        else:
            return
        for ev in synth:
            ev["sequence_number"] = self.last_seq = nxt
            nxt += 1
        self.shift += len(synth)
        if doc is not None and _is_int(seq):
            doc["sequence_number"] = self.last_seq = nxt

    def end(self) -> list[Any]:
        synth = self._flush(lambda key: True)
        self._number(synth, None)
        return synth


def _dumps(doc: Any) -> bytes:
    try:  # as vLLM writes it: compact, UTF-8
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:  # a lone surrogate from a \\ud8xx escape: keep it escaped
        return json.dumps(doc, separators=(",", ":")).encode()


def _maybe_placeholder(raw: bytes) -> bool:
    return b"<" in raw or b"\\u003c" in raw or b"\\u003C" in raw


def _maybe_stand_in(raw: bytes, mapping: StandInMap) -> bool:
    return bool(mapping.literals) or _maybe_placeholder(raw)


class ResponseRestorer:
    """An ASGI ``send`` wrapper: restores the response of one masked request on ``route``
    (``/v1/completions``, ``/v1/chat/completions`` or ``/v1/responses``) before it leaves
    the server. ``mapping`` is the session's placeholder -> value map."""

    def __init__(self, send: Send, mapping: dict[str, str], route: str):
        if route not in ROUTES:
            raise ValueError(f"no restorer for route {route!r}")
        mapping = as_stand_ins(mapping)
        self.send_downstream, self.mapping, self.route = send, mapping, route
        self.stream: _ChoiceStream | _EventStream = (
            _EventStream(mapping) if route == RESPONSES else _ChoiceStream(mapping))
        self.mode = ""  # "pass" | "stream" | "whole", set by http.response.start
        self.start: Message | None = None  # whole bodies: sent with the restored length
        self.body: list[bytes] = []
        self.pending = b""  # a stream's incomplete event
        self.named = route == RESPONSES  # whether events carry an ``event:`` line
        self.sep = b"\n\n"
        # stand-ins left unrestored in this response (glued to a word): a header on whole
        # bodies, an SSE comment at the end of streams. Counted as the METRICS delta over
        # synchronous stretches (no await between: no other request's restore in between).
        self.unrestored = 0
        self._seen = 0
        self.noted = False

    async def __call__(self, message: Message) -> None:
        kind = message.get("type")
        if kind == "http.response.start":
            return await self._start(message)
        if kind == "http.response.body" and self.mode == "stream":
            return await self._stream(message)
        if kind == "http.response.body" and self.mode == "whole":
            return await self._whole(message)
        if self.start is not None:  # not a body (a file, trailers): nothing to restore
            start, self.start, self.mode = self.start, None, "pass"
            await self.send_downstream(start)
            if self.body:
                await self.send_downstream({"type": "http.response.body",
                                            "body": b"".join(self.body), "more_body": True})
                self.body = []
        await self.send_downstream(message)

    async def _start(self, message: Message) -> None:
        headers = list(message.get("headers") or [])
        ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"").lower()
        if message.get("status", 200) != 200:
            self.mode = "pass"
        elif ctype.startswith(b"text/event-stream"):
            self.mode = "stream"  # restored event by event: the length changes
            message = {**message, "headers": [(k, v) for k, v in headers
                                              if k.lower() != b"content-length"]}
        else:
            self.mode, self.start = "whole", message
            return
        await self.send_downstream(message)

    async def _whole(self, message: Message) -> None:
        self.body.append(message.get("body", b""))
        if message.get("more_body"):
            return
        before = METRICS[UNRESTORED]
        raw = self._document(b"".join(self.body))
        left = METRICS[UNRESTORED] - before
        self.body = []
        assert self.start is not None
        start, self.start = self.start, None
        headers = [(k, v) for k, v in start.get("headers") or []
                   if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(raw)).encode()))
        if left:
            headers.append((UNRESTORED_HEADER, str(left).encode()))
        await self.send_downstream({**start, "headers": headers})
        await self.send_downstream({"type": "http.response.body", "body": raw,
                                    "more_body": False})

    def _document(self, raw: bytes) -> bytes:
        if not _maybe_stand_in(raw, self.mapping):
            return raw
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict):
                return raw  # not a response object: as it is
            restore_body(self.route, doc, self.mapping)
        except (ValueError, RecursionError):  # not JSON (or too deep to walk): as it is
            return raw
        return _dumps(doc)

    # --- streams --------------------------------------------------------------------------

    def _tally(self) -> None:
        now = METRICS[UNRESTORED]
        self.unrestored += now - self._seen
        self._seen = now

    def _note(self) -> bytes:
        """An SSE comment (clients skip it) with the count of unrestored stand-ins, once."""
        self._tally()
        if self.noted or not self.unrestored:
            return b""
        self.noted = True
        return b": " + UNRESTORED_HEADER + b" " + str(self.unrestored).encode() + self.sep

    async def _stream(self, message: Message) -> None:
        self._seen = METRICS[UNRESTORED]
        old = len(self.pending)
        data = self.pending + message.get("body", b"")
        more = bool(message.get("more_body", False))
        out, pos = [], 0
        # a separator the last message left incomplete starts at most 3 bytes before its end
        for m in _EVENT_END.finditer(data, max(0, old - 3)):
            out.append(self._event(data[pos:m.start()], m.group()))
            pos = m.end()
        self.pending = data[pos:]
        if not more:  # the stream ends here, [DONE] or not: nothing may stay held
            if self.pending.strip():
                out.append(self._event(self.pending, self.sep))
            self.pending = b""
            out.append(self._frames(self.stream.end()))
            out.append(self._note())
        self._tally()
        await self.send_downstream({"type": "http.response.body", "body": b"".join(out),
                                    "more_body": more})

    def _event(self, event: bytes, sep: bytes) -> bytes:
        self.sep = sep
        if not self.stream.busy() and not _maybe_stand_in(event, self.mapping):
            return event + sep  # nothing held, nothing to restore: as it is
        lines = event.split(b"\n")
        data_at = [i for i, ln in enumerate(lines) if ln.startswith(b"data:")]
        if not data_at:
            return event + sep
        payload = b"\n".join(_value(lines[i]) for i in data_at)
        if payload.strip() == b"[DONE]":
            tail = self._frames(self.stream.end())
            return tail + self._note() + event + sep
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):
            return event + sep
        self.named = any(ln.startswith(b"event:") for ln in lines)
        docs = self.stream.data(doc)
        kept = [ln for i, ln in enumerate(lines) if i not in data_at[1:]]
        kept[data_at[0]] = b"data: " + _dumps(docs[-1])
        return self._frames(docs[:-1]) + b"\n".join(kept) + sep

    def _frames(self, docs: list[Any]) -> bytes:
        out = []
        for doc in docs:
            kind = doc.get("type") if isinstance(doc, dict) else None
            head = f"event: {kind}\n".encode() if self.named and isinstance(kind, str) else b""
            out.append(head + b"data: " + _dumps(doc) + self.sep)
        return b"".join(out)


def _value(line: bytes) -> bytes:
    """An SSE field's value: after the colon, without one leading space; CR of CRLF off."""
    value = line[5:].rstrip(b"\r")
    return value[1:] if value.startswith(b" ") else value
