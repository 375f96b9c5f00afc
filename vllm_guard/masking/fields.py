"""Which strings of a request vLLM renders into the prompt, per route (fail closed).

Every string of a request body ends up in one of three places:
- a **text slot** (rendered into the prompt: message contents, tool-call arguments, tool
  descriptions, documents, ...): sensitive values in it are replaced by placeholders;
- a **control slot** (every other string: model name, stop strings, schemas, ids, ...):
  it cannot be rewritten without changing what it means, so a sensitive value in it refuses
  the request. Every JSON number that may reach the prompt (a schema's ``default`` or
  ``enum``, tool-call arguments given as an object, ``chat_template_kwargs``) is a control
  slot too: replacing it by a placeholder string would change the schema or the arguments'
  types, so a number that :func:`~vllm_guard.masking.types.sensitive_number` calls
  sensitive (a checksummed identifier or a known value) refuses the request. Numbers of the
  ``SCALARS`` (``seed``, ``max_tokens``, token ids, ...) are never rendered and not scanned;
  booleans and null carry nothing;
- refused outright: fields and shapes the masker cannot read (token-id prompts,
  ``prompt_embeds``, media parts, stored or templated context) and any field or part type
  not listed here. ``tests/unit/masking/test_fields.py`` compares these tables with vLLM's own
  request models, so a vLLM upgrade that adds a field fails the tests until it is handled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vllm_guard.asgi import TRANSFER_FIELDS, RequestError
from vllm_guard.masking.types import render_number

COMPLETIONS, CHAT, RESPONSES = "/v1/completions", "/v1/chat/completions", "/v1/responses"
ROUTES = (COMPLETIONS, CHAT, RESPONSES)

# chat content part type -> the key holding its text (vLLM's TEXT_PART_TYPES)
CHAT_TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text",
                   "refusal": "refusal", "thinking": "thinking"}
MESSAGE_TEXT_KEYS = ("content", "name", "reasoning", "reasoning_content", "task")
MESSAGE_CONTROL_KEYS = ("role", "tool_call_id")
# Responses API input content parts and items
RESPONSES_TEXT_PARTS = {"input_text": "text", "output_text": "text", "refusal": "refusal",
                        "summary_text": "text", "reasoning_text": "text"}


@dataclass
class Slot:
    """One string inside the body: ``holder[key]``; ``path`` names it in errors."""

    holder: Any
    key: Any
    path: str
    mask: bool  # True: replace sensitive values; False: refuse the request if any
    number: bool = False  # a JSON number, scanned in its rendered form (never rewritten)


class Unmaskable(RequestError):
    def __init__(self, path: str, why: str):
        super().__init__(400, f"'{path}': {why}; refused because masking is on (the masker "
                         "cannot read or rewrite it)", "unmaskable_field")


Walker = Callable[[Any, str, list[Slot]], None]


def _slot(holder: Any, key: Any, path: str, out: list[Slot], mask: bool) -> None:
    if isinstance(holder[key], str):
        out.append(Slot(holder, key, path, mask))
    else:
        control(holder[key], path, out)


def control(value: Any, path: str, out: list[Slot], numbers: bool = True) -> None:
    """Every string, number (unless ``numbers`` is False: never rendered) and object key
    anywhere inside: a control slot."""
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int | float):
        if numbers:
            out.append(Slot(_Ref(render_number(value)), 0, path, False, number=True))
    elif isinstance(value, dict):
        for k in list(value):
            out.append(Slot({k: k}, k, f"{path} (key)", False))
            control(value[k], f"{path}.{k}", out, numbers)
    elif isinstance(value, list):
        for i in range(len(value)):
            control(value[i], f"{path}[{i}]", out, numbers)
    elif isinstance(value, str):
        out.append(Slot(_Ref(value), 0, path, False))


def text_leaves(value: Any, path: str, out: list[Slot]) -> None:
    """Every string inside is prompt text (tool-call arguments given as an object)."""
    if isinstance(value, dict):
        for k in value:
            out.append(Slot({k: k}, k, f"{path} (key)", False))
            if isinstance(value[k], str):
                out.append(Slot(value, k, f"{path}.{k}", True))
            else:
                text_leaves(value[k], f"{path}.{k}", out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if isinstance(v, str):
                out.append(Slot(value, i, f"{path}[{i}]", True))
            else:
                text_leaves(v, f"{path}[{i}]", out)
    elif isinstance(value, bool | int | float) or value is None:
        control(value, path, out)  # a number: checked, never rewritten
    else:
        raise Unmaskable(path, "unexpected value")


def text(value: Any, path: str, out: list[Slot]) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise Unmaskable(path, "must be a string")
    out.append(Slot(_Ref(value), 0, path, True))


class _Ref(list):
    """Holds a string whose container the walker does not know (top-level fields: rebound to
    the body by :func:`collect`; control strings: never rewritten)."""

    def __init__(self, value: str):
        super().__init__([value])


def refused(why: str) -> Walker:
    def walk(value: Any, path: str, out: list[Slot]) -> None:
        if value not in (None, False, [], {}):
            raise Unmaskable(path, why)
    return walk


def _object(value: Any, path: str) -> dict:
    if not isinstance(value, dict):
        raise Unmaskable(path, "must be an object")
    return value


def _list(value: Any, path: str) -> list:
    if not isinstance(value, list):
        raise Unmaskable(path, "must be a list")
    return value


def _parts(parts: list, path: str, out: list[Slot], text_parts: dict[str, str]) -> None:
    for i, part in enumerate(parts):
        p = f"{path}[{i}]"
        if isinstance(part, str):
            out.append(Slot(parts, i, p, True))
            continue
        part = _object(part, p)
        kind = part.get("type")
        key = text_parts.get(kind) if isinstance(kind, str) else None
        if key is None:
            raise Unmaskable(p, f"content part type {kind!r} cannot be masked")
        extra = sorted(set(part) - {"type", key})
        if extra:
            raise Unmaskable(p, f"unexpected key {extra[0]!r} in a {kind!r} part")
        text_or_none(part, key, f"{p}.{key}", out)


def text_or_none(holder: dict, key: str, path: str, out: list[Slot]) -> None:
    value = holder.get(key)
    if value is None:
        return
    if not isinstance(value, str):
        raise Unmaskable(path, "must be a string")
    out.append(Slot(holder, key, path, True))


def _content(msg: dict, path: str, out: list[Slot], text_parts: dict[str, str]) -> None:
    content = msg.get("content")
    if isinstance(content, list):
        _parts(content, path, out, text_parts)
    else:
        text_or_none(msg, "content", path, out)


def _arguments(fn: dict, path: str, out: list[Slot]) -> None:
    args = fn.get("arguments")
    if isinstance(args, str):
        out.append(Slot(fn, "arguments", path, True))
    else:
        text_leaves(args, path, out)


def _tool_calls(calls: Any, path: str, out: list[Slot]) -> None:
    for i, call in enumerate(_list(calls, path)):
        p = f"{path}[{i}]"
        call = _object(call, p)
        for k, v in call.items():
            if k == "function":
                fn = _object(v, f"{p}.function")
                for fk in fn:
                    if fk == "arguments":
                        _arguments(fn, f"{p}.function.arguments", out)
                    else:
                        control(fn[fk], f"{p}.function.{fk}", out)
            else:
                control(v, f"{p}.{k}", out)


def messages(value: Any, path: str, out: list[Slot]) -> None:
    for i, msg in enumerate(_list(value, path)):
        p = f"{path}[{i}]"
        msg = _object(msg, p)
        for k in msg:
            if k == "content":
                _content(msg, f"{p}.content", out, CHAT_TEXT_PARTS)
            elif k in MESSAGE_TEXT_KEYS:
                text_or_none(msg, k, f"{p}.{k}", out)
            elif k == "tool_calls":
                if msg[k] is not None:
                    _tool_calls(msg[k], f"{p}.tool_calls", out)
            elif k == "tools":
                chat_tools(msg[k], f"{p}.tools", out)
            elif k in MESSAGE_CONTROL_KEYS:
                control(msg[k], f"{p}.{k}", out)
            else:
                raise Unmaskable(f"{p}.{k}", "message field not supported")


def _schema(value: Any, path: str, out: list[Slot]) -> None:
    """JSON schema of tool parameters: descriptions and titles are rendered as text."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k in ("description", "title") and isinstance(v, str):
                out.append(Slot(value, k, f"{path}.{k}", True))
            else:
                out.append(Slot({k: k}, k, f"{path} (key)", False))
                _schema(v, f"{path}.{k}", out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _schema(v, f"{path}[{i}]", out)
    else:
        control(value, path, out)


def _function(fn: dict, path: str, out: list[Slot]) -> None:
    for k in fn:
        if k == "description":
            text_or_none(fn, k, f"{path}.{k}", out)
        elif k == "parameters":
            _schema(fn[k], f"{path}.{k}", out)
        else:
            control(fn[k], f"{path}.{k}", out)


def chat_tools(value: Any, path: str, out: list[Slot]) -> None:
    if value is None:
        return
    for i, tool in enumerate(_list(value, path)):
        p = f"{path}[{i}]"
        tool = _object(tool, p)
        for k in tool:
            if k == "function":
                _function(_object(tool[k], f"{p}.function"), f"{p}.function", out)
            else:
                control(tool[k], f"{p}.{k}", out)


def documents(value: Any, path: str, out: list[Slot]) -> None:
    if value is None:
        return
    for i, doc in enumerate(_list(value, path)):
        doc = _object(doc, f"{path}[{i}]")
        for k in doc:
            out.append(Slot({k: k}, k, f"{path}[{i}] (key)", False))
            text_or_none(doc, k, f"{path}[{i}].{k}", out)


def structured_outputs(value: Any, path: str, out: list[Slot]) -> None:
    """``choice`` strings are what the model may answer: masked like prompt text (the
    restorer turns the chosen placeholder back); every other constraint is control."""
    if value is None:
        return
    value = _object(value, path)
    for k, v in value.items():
        if k == "choice" and v is not None:
            for i in range(len(_list(v, f"{path}.choice"))):
                _slot(v, i, f"{path}.choice[{i}]", out, True)
        else:
            control(v, f"{path}.{k}", out)


def prompt(value: Any, path: str, out: list[Slot]) -> None:
    if isinstance(value, str):
        out.append(Slot(_Ref(value), 0, path, True))
        return
    items = _list(value, path)
    if not all(isinstance(p, str) for p in items):
        raise Unmaskable(path, "token-id prompts cannot be masked; send text")
    for i in range(len(items)):
        out.append(Slot(items, i, f"{path}[{i}]", True))


def responses_input(value: Any, path: str, out: list[Slot]) -> None:
    if isinstance(value, str):
        out.append(Slot(_Ref(value), 0, path, True))
        return
    for i, item in enumerate(_list(value, path)):
        p = f"{path}[{i}]"
        item = _object(item, p)
        kind = item.get("type", "message")
        if kind == "message":
            for k in item:
                if k == "content":
                    _content(item, f"{p}.content", out, RESPONSES_TEXT_PARTS)
                elif k in ("role", "type", "id", "status"):
                    control(item[k], f"{p}.{k}", out)
                else:
                    raise Unmaskable(f"{p}.{k}", "message field not supported")
        elif kind == "function_call":
            for k in item:
                if k == "arguments":
                    _arguments(item, f"{p}.arguments", out)
                else:
                    control(item[k], f"{p}.{k}", out)
        elif kind == "function_call_output":
            for k in item:
                if k == "output":
                    if isinstance(item[k], list):
                        _parts(item[k], f"{p}.output", out, RESPONSES_TEXT_PARTS)
                    else:
                        text_or_none(item, k, f"{p}.output", out)
                else:
                    control(item[k], f"{p}.{k}", out)
        elif kind == "reasoning":
            for k in item:
                if k in ("summary", "content") and item[k] is not None:
                    _parts(_list(item[k], f"{p}.{k}"), f"{p}.{k}", out, RESPONSES_TEXT_PARTS)
                elif k == "encrypted_content" and item[k] is not None:
                    raise Unmaskable(f"{p}.{k}", "encrypted reasoning cannot be read")
                else:
                    control(item[k], f"{p}.{k}", out)
        else:
            raise Unmaskable(p, f"input item type {kind!r} cannot be masked")


def responses_tools(value: Any, path: str, out: list[Slot]) -> None:
    if value is None:
        return
    for i, tool in enumerate(_list(value, path)):
        p = f"{path}[{i}]"
        tool = _object(tool, p)
        if tool.get("type") != "function":
            raise Unmaskable(p, f"tool type {tool.get('type')!r} cannot be masked")
        _function(tool, p, out)


SCALARS = ("frequency_penalty", "presence_penalty", "logprobs", "top_logprobs", "max_tokens",
           "max_completion_tokens", "max_output_tokens", "max_tool_calls", "n", "seed",
           "stream", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
           "length_penalty", "use_beam_search", "watermarking", "stop_token_ids",
           "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens",
           "spaces_between_special_tokens", "truncate_prompt_tokens", "prompt_logprobs",
           "logprob_token_ids", "allowed_token_ids", "echo", "add_generation_prompt",
           "continue_final_message", "add_special_tokens", "priority", "return_tokens_as_token_ids",
           "return_token_ids", "routed_experts_prompt_start", "return_token_offsets",
           "return_prompt_text", "return_mm_kwargs", "include_reasoning",
           "parallel_tool_calls", "thinking_token_budget", "stream_interval",
           "enable_response_messages", "store",
           "return_weight_versions")  # vLLM 0.33: whether to return weight-version spans
# strings that steer decoding or name things, never rendered as prompt text
CONTROLS = ("model", "logit_bias", "response_format", "stop", "stream_options", "tool_choice",
            "reasoning_effort", "user", "truncation_side", "bad_words", "request_id",
            "session_id", "cache_salt", "vllm_xargs", "repetition_detection", "mm_payload",
            "include", "metadata", "reasoning", "service_tier", "text", "truncation",
            "prompt_cache_key", "safety_identifier", "prompt_cache_options",
            "prompt_cache_retention")  # the last three: echoed by vLLM 0.33, never rendered

REFUSED: dict[str, str] = {
    "prompt_embeds": "prompt embeddings cannot be read",
    "chat_template": "a request-supplied chat template is not allowed",
    "kv_transfer_params": "KV transfer is not allowed",
    "ec_transfer_params": "encoder-cache transfer is not allowed",
    "media_io_kwargs": "media inputs are not allowed",
    "mm_processor_kwargs": "media inputs are not allowed",
    "previous_response_id": "stored responses cannot be checked; send the conversation",
    "previous_input_messages": "stored messages cannot be checked; send the conversation",
    "background": "background responses cannot be restored",
}


def xargs(value: Any, path: str, out: list[Slot]) -> None:
    """Control values, but vLLM also reads KV and encoder-cache transfer from them."""
    if isinstance(value, dict):
        for field in TRANSFER_FIELDS:
            refused(REFUSED[field])(value.get(field), f"{path}.{field}", out)
    control(value, path, out)


TEXT: dict[str, dict[str, Walker]] = {
    COMPLETIONS: {"prompt": prompt, "suffix": text, "structured_outputs": structured_outputs},
    CHAT: {"messages": messages, "tools": chat_tools, "documents": documents,
           "structured_outputs": structured_outputs, "chat_template_kwargs": text_leaves},
    RESPONSES: {"input": responses_input, "instructions": text, "tools": responses_tools,
                "structured_outputs": structured_outputs, "chat_template_kwargs": text_leaves,
                "prompt": refused("prompt templates cannot be checked; send the text")},
}


def collect(route: str, body: dict) -> list[Slot]:
    """The slots of ``body`` for ``route``; raises :class:`Unmaskable` for anything the
    masker cannot read. Top-level string fields are rewritten through ``body`` itself."""
    out: list[Slot] = []
    text_fields = TEXT[route]
    for key in list(body):
        value = body[key]
        if key in text_fields:
            start = len(out)
            text_fields[key](value, key, out)
            for s in out[start:]:  # a top-level string: written back into the body
                if isinstance(s.holder, _Ref) and s.path == key and not s.number:
                    s.holder, s.key = body, key
        elif key in REFUSED:
            refused(REFUSED[key])(value, key, out)
        elif key == "vllm_xargs":  # a control (CONTROLS) that may also carry transfer fields
            xargs(value, key, out)
        elif key in SCALARS:  # their numbers never reach the prompt (strings still checked)
            control(value, key, out, numbers=False)
        elif key in CONTROLS:
            control(value, key, out)
        else:
            raise Unmaskable(key, "unknown field")
    return out
