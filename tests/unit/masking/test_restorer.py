"""ResponseRestorer in process: recorded ASGI messages through a fake ``send`` (no server).

Streams: per choice and field, per tool call, Responses parts; held text flushed whenever the
stream ends; minimal holding. Non-streamed: every generated or echoed text field, nothing else.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from vllm_guard.masking.metrics import METRICS
from vllm_guard.masking.restorer import ResponseRestorer

CHAT, COMPLETIONS, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/responses"
MAPPING = {"<EMAIL_ADDRESS_1>": "jane.roe@example.com", "<PHONE_NUMBER_1>": "13812345678",
           "<PERSON_1>": "Li Lei", "<PERSON_10>": "韩梅梅"}
SSE_START = {"type": "http.response.start", "status": 200,
             "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]}


def run(route: str, messages: list[dict], mapping: dict[str, str] = MAPPING) -> list[dict]:
    """Every message the client would receive."""
    out: list[dict] = []

    async def send(message: dict) -> None:
        out.append(message)

    async def go() -> None:
        restorer = ResponseRestorer(send, mapping, route)
        for m in messages:
            await restorer(m)

    asyncio.run(go())
    return out


def body(data: bytes, more: bool = True) -> dict:
    return {"type": "http.response.body", "body": data, "more_body": more}


def stream(route: str, events: list[bytes], end: str = "done", frame: int = 0) -> list[dict]:
    """``events`` as one body message each (or ``frame``-byte slices); the stream ends with
    ``[DONE]`` then an empty last message (``done``), with the last event in the last message
    (``last``), or with an empty last message and no ``[DONE]`` (``empty``)."""
    raw = list(events) + ([b"data: [DONE]\n\n"] if end == "done" else [])
    if frame:
        joined = b"".join(raw)
        raw = [joined[i:i + frame] for i in range(0, len(joined), frame)]
    msgs = [SSE_START] + [body(r) for r in raw]
    if end == "last":
        msgs[-1] = body(raw[-1], more=False)
    else:
        msgs.append(body(b"", more=False))
    return run(route, msgs)


def received(out: list[dict]) -> bytes:
    assert out[0]["type"] == "http.response.start"
    assert all(m["type"] == "http.response.body" for m in out[1:])
    assert out[-1].get("more_body", False) is False
    return b"".join(m.get("body", b"") for m in out[1:])


def events_of(raw: bytes) -> list[tuple[str | None, Any]]:
    """(event name, parsed data or '[DONE]') of each SSE event."""
    evs = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        name, data = None, None
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                payload = line[5:].strip()
                data = payload if payload == "[DONE]" else json.loads(payload)
        evs.append((name, data))
    return evs


def chunk(idx: int, finish: str | None = None, text: str | None = None,
          tool: tuple[int, str] | None = None, **delta: str) -> bytes:
    """One chat chunk (``text`` given: a completion chunk) with one choice."""
    choice: dict[str, Any] = {"index": idx, "logprobs": None, "finish_reason": finish}
    if text is not None:
        choice["text"] = text
        obj = "text_completion"
    else:
        d: dict[str, Any] = dict(delta)
        if tool is not None:
            d["tool_calls"] = [{"index": tool[0], "function": {"arguments": tool[1]}}]
        choice["delta"] = d
        obj = "chat.completion.chunk"
    doc = {"id": "c1", "object": obj, "created": 1, "model": "m", "choices": [choice]}
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def texts(raw: bytes) -> dict[tuple, str]:
    """Concatenated text per (choice, field); tool calls per (choice, 'tool', call index)."""
    got: dict[tuple, str] = {}

    def add(key: tuple, s: str | None) -> None:
        if s:
            got[key] = got.get(key, "") + s

    for _, data in events_of(raw):
        if not isinstance(data, dict):
            continue
        for ch in data.get("choices", []):
            i = ch["index"]
            add((i, "text"), ch.get("text"))
            d = ch.get("delta") or {}
            for name in ("content", "reasoning", "reasoning_content", "refusal"):
                add((i, name), d.get(name))
            for call in d.get("tool_calls") or []:
                add((i, "tool", call["index"]), call["function"].get("arguments"))
    return got


def restored(text: str) -> str:
    """The reference: each complete known placeholder replaced, nothing else."""
    for ph in sorted(MAPPING, key=len, reverse=True):
        text = text.replace(ph, MAPPING[ph])
    return text


# --- chat / completions streams ------------------------------------------------------------


@pytest.mark.parametrize("ending", ["finish_reason", "done_only", "no_done"])
@pytest.mark.parametrize("route", [CHAT, COMPLETIONS])
def test_n2_held_tails_go_out_in_their_own_choice(route, ending):
    def ck(idx: int, s: str, finish: str | None = None) -> bytes:
        return chunk(idx, finish, text=s) if route == COMPLETIONS else chunk(idx, finish,
                                                                             content=s)

    field = "text" if route == COMPLETIONS else "content"
    events = [ck(0, "mail <EMAIL_"), ck(1, "call <PHONE_NU"), ck(0, "ADDRESS_1> or <PHO"),
              ck(1, "MBER_1> or <EMAIL_ADD")]  # both choices end inside a placeholder
    if ending == "finish_reason":
        events += [ck(0, "", "length"), ck(1, "", "length")]
    out = stream(route, events, "empty" if ending == "no_done" else "done")
    raw = received(out)
    assert texts(raw) == {(0, field): "mail jane.roe@example.com or <PHO",
                          (1, field): "call 13812345678 or <EMAIL_ADD"}
    if ending != "no_done":
        assert raw.endswith(b"data: [DONE]\n\n")
    for _, data in events_of(raw):  # every synthetic chunk has the shape of its route
        if isinstance(data, dict):
            for ch in data["choices"]:
                assert ("text" in ch) == (route == COMPLETIONS)
                assert ("delta" in ch) == (route == CHAT)


@pytest.mark.parametrize("ending", ["finish_reason", "finish_with_args", "done_only",
                                    "no_done"])
def test_tool_call_arguments_held_over_the_final_chunk_stay_arguments(ending):
    first = {"index": 0, "id": "call_0", "type": "function",
             "function": {"name": "send", "arguments": ""}}
    opening = b"data: " + json.dumps({"id": "c1", "choices": [
        {"index": 0, "delta": {"role": "assistant", "tool_calls": [first]},
         "finish_reason": None}]}).encode() + b"\n\n"
    events = [opening,
              chunk(0, tool=(0, '{"to": "<EMAIL_')),
              chunk(0, tool=(0, 'ADDRESS_1>", "who": "<PERSON_1')),  # <PERSON_1> or _10>?
              chunk(0, tool=(1, '{"n": "<PHONE_NUMBER_')),
              chunk(0, tool=(0, '0>"}')),
              chunk(0, tool=(1, "1>"))]
    events += [chunk(0, tool=(1, '", "x": "<PERSON_'))]  # cut off by max_tokens
    if ending == "finish_reason":
        events.append(chunk(0, "length"))
    elif ending == "finish_with_args":  # the last chunk carries the same call's (empty) args
        events.append(chunk(0, "length", tool=(1, "")))
    raw = received(stream(CHAT, events, "empty" if ending == "no_done" else "done"))
    assert texts(raw) == {(0, "tool", 0): '{"to": "jane.roe@example.com", "who": "韩梅梅"}',
                          (0, "tool", 1): '{"n": "13812345678", "x": "<PERSON_'}
    assert b'"content"' not in raw


@pytest.mark.parametrize("end", ["last", "empty"])
def test_stream_ending_without_done_flushes_held_text(end):
    events = [chunk(0, content="hi <PERSON_"), chunk(0, content="1> and <PERSON_1")]
    raw = received(stream(CHAT, events, end))
    assert texts(raw) == {(0, "content"): "hi Li Lei and <PERSON_1"}


def test_reasoning_and_refusal_deltas_restored_per_field():
    events = [chunk(0, reasoning="think <PERSON_1"), chunk(0, content="say <PERSON_1"),
              chunk(0, reasoning="0>", reasoning_content="rc <EMAIL_ADDRESS_1>"),
              chunk(0, content="> ok", refusal="no <PHONE_NUMBER_1"),
              chunk(0, "stop", refusal=">")]
    raw = received(stream(CHAT, events))
    assert texts(raw) == {(0, "reasoning"): "think 韩梅梅", (0, "content"): "say Li Lei ok",
                          (0, "reasoning_content"): "rc jane.roe@example.com",
                          (0, "refusal"): "no 13812345678"}


def expected_release(text: str) -> str:
    """What may be out after ``text``: all of it but a trailing proper prefix of a session
    placeholder (minimal holding), restored."""
    cut = text.rfind("<")
    if cut >= 0 and any(p.startswith(text[cut:]) and p != text[cut:] for p in MAPPING):
        text = text[:cut]
    return restored(text)


ANSWER = "Hi <PERSON_1>, <PERSON_10><EMAIL_ADDRESS_1> <PERSON_2> a<b <PHONE_NUMBER_1>!<PERSON_1"


def test_chat_stream_split_at_every_position_restores_exactly_and_holds_minimally():
    want = restored(ANSWER)
    assert want == "Hi Li Lei, 韩梅梅jane.roe@example.com <PERSON_2> a<b 13812345678!<PERSON_1"
    n = len(ANSWER)
    for i in range(n + 1):
        for j in range(i, n + 1, 3):
            pieces = [ANSWER[:i], ANSWER[i:j], ANSWER[j:]]
            out = stream(CHAT, [chunk(0, content=p) for p in pieces]
                         + [chunk(1, content=ANSWER), chunk(0, "stop"), chunk(1, "stop")])
            got = texts(received(out))
            assert got == {(0, "content"): want, (1, "content"): want}, (i, j)
            # message k answers event k: what is out after each piece is all but the minimum
            so_far = ""
            for k, end in enumerate((i, j)):
                so_far += texts(out[k + 1]["body"]).get((0, "content"), "")
                assert so_far == expected_release(ANSWER[:end]), (i, j, k)


def test_chat_stream_split_at_every_byte_of_the_stream():
    events = [chunk(0, content=ANSWER[k:k + 4]) for k in range(0, len(ANSWER), 4)]
    events.append(chunk(0, "stop"))
    want = {(0, "content"): restored(ANSWER)}
    for frame in (1, 2, 3, 7, 64):
        raw = received(stream(CHAT, events, frame=frame))
        assert texts(raw) == want, frame
        assert raw.endswith(b"data: [DONE]\n\n")


def test_unknown_placeholders_untouched_and_counted():
    before = METRICS["unknown_placeholders"]
    raw = received(stream(CHAT, [chunk(0, content="<PERSON_99> and <PERSON_1> <PERSON_1"),
                                 chunk(0, "stop")]))
    assert texts(raw) == {(0, "content"): "<PERSON_99> and Li Lei <PERSON_1"}
    assert METRICS["unknown_placeholders"] == before + 1


# --- Responses API streams -----------------------------------------------------------------


def rsp_event(seq: int, kind: str, **fields: Any) -> bytes:
    doc = {"type": kind, "sequence_number": seq, **fields}
    return f"event: {kind}\ndata: ".encode() + json.dumps(doc).encode() + b"\n\n"


def responses_stream(pieces: list[str], full: str) -> list[bytes]:
    """vLLM's event sequence for one message whose text arrives as ``pieces``."""
    part = {"type": "output_text", "text": full, "annotations": [], "logprobs": None}
    item = {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
            "content": [part]}
    resp = {"id": "resp_1", "object": "response", "status": "in_progress", "output": [],
            "instructions": "Greet <PERSON_1>", "model": "m", "tools": []}
    ev = [rsp_event(0, "response.created", response=resp),
          rsp_event(1, "response.output_item.added", output_index=0,
                    item={**item, "status": "in_progress", "content": []}),
          rsp_event(2, "response.content_part.added", output_index=0, content_index=0,
                    item_id="msg_1", part={**part, "text": ""})]
    for p in pieces:
        ev.append(rsp_event(len(ev), "response.output_text.delta", output_index=0,
                            content_index=0, item_id="msg_1", delta=p, logprobs=[]))
    ev += [rsp_event(len(ev), "response.output_text.done", output_index=0, content_index=0,
                     item_id="msg_1", text=full, logprobs=[]),
           rsp_event(len(ev) + 1, "response.content_part.done", output_index=0,
                     content_index=0, item_id="msg_1", part=part),
           rsp_event(len(ev) + 2, "response.output_item.done", output_index=0, item=item),
           rsp_event(len(ev) + 3, "response.completed",
                     response={**resp, "status": "completed", "output": [item]})]
    return ev


def check_responses_stream(raw: bytes, want: str) -> list[tuple[str | None, Any]]:
    evs = events_of(raw)
    for name, data in evs:  # SSE framing kept: each event named, as vLLM does
        assert name == data["type"]
    seqs = [d["sequence_number"] for _, d in evs]
    assert seqs == list(range(len(evs)))  # still strictly increasing with no duplicates
    by = {}
    for _, d in evs:
        by.setdefault(d["type"], []).append(d)
    assert "".join(d["delta"] for d in by["response.output_text.delta"]) == want
    assert by["response.output_text.done"][0]["text"] == want
    assert by["response.content_part.done"][0]["part"]["text"] == want
    assert by["response.output_item.done"][0]["item"]["content"][0]["text"] == want
    completed = by["response.completed"][0]["response"]
    assert completed["output"][0]["content"][0]["text"] == want
    assert completed["instructions"] == by["response.created"][0]["response"]["instructions"]
    assert completed["instructions"] == "Greet Li Lei"
    # the held fragment went out before the part was declared done
    done_at = [d["type"] for _, d in evs].index("response.output_text.done")
    assert all(d["type"] != "response.output_text.delta" for _, d in evs[done_at:])
    return evs


def test_responses_stream_placeholder_split_across_three_delta_events():
    full = "Mail <EMAIL_ADDRESS_1> now."
    pieces = ["Mail <EMA", "IL_ADDR", "ESS_1> now."]
    for frame in (0, 5):
        raw = received(stream(RESPONSES, responses_stream(pieces, full), "empty", frame))
        evs = check_responses_stream(raw, "Mail jane.roe@example.com now.")
        assert [d["delta"] for _, d in evs if d["type"].endswith(".delta")] == \
               ["Mail ", "", "jane.roe@example.com now."]


def test_responses_stream_text_ending_inside_a_placeholder_is_flushed_before_done():
    full = "Call <PHONE_NUMBER_1> or <PERSON_1"  # cut off: <PERSON_1> or <PERSON_10>
    raw = received(stream(RESPONSES, responses_stream(["Call <PHONE_", "NUMBER_1> or <PER",
                                                       "SON_1"], full), "empty"))
    check_responses_stream(raw, "Call 13812345678 or <PERSON_1")


def test_responses_stream_other_delta_families_restored_per_part():
    ev = [rsp_event(0, "response.reasoning_text.delta", output_index=0, content_index=0,
                    item_id="rs_1", delta="user <PERSON_"),
          rsp_event(1, "response.reasoning_text.delta", output_index=0, content_index=0,
                    item_id="rs_1", delta="10> said"),
          rsp_event(2, "response.reasoning_text.done", output_index=0, content_index=0,
                    item_id="rs_1", text="user <PERSON_10> said"),
          rsp_event(3, "response.function_call_arguments.delta", output_index=1,
                    item_id="fc_1", delta='{"to": "<EMAIL_ADDRESS'),
          rsp_event(4, "response.function_call_arguments.delta", output_index=1,
                    item_id="fc_1", delta='_1>"}'),
          rsp_event(5, "response.function_call_arguments.done", output_index=1,
                    item_id="fc_1", name="send", arguments='{"to": "<EMAIL_ADDRESS_1>"}'),
          rsp_event(6, "response.output_item.done", output_index=1,
                    item={"type": "function_call", "id": "fc_1", "call_id": "call_1",
                          "name": "send", "arguments": '{"to": "<EMAIL_ADDRESS_1>"}'})]
    evs = [d for _, d in events_of(received(stream(RESPONSES, ev, "empty")))]
    assert [d.get("delta") for d in evs] == ["user ", "韩梅梅 said", None,
                                            '{"to": "', 'jane.roe@example.com"}', None, None]
    assert evs[2]["text"] == "user 韩梅梅 said"
    assert evs[5]["arguments"] == evs[6]["item"]["arguments"] == '{"to": "jane.roe@example.com"}'


# --- non-streamed --------------------------------------------------------------------------


def whole(route: str, doc: Any, status: int = 200, ctype: bytes = b"application/json",
          split: int = 0) -> tuple[dict, bytes]:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", ctype), (b"content-length", str(len(raw)).encode())]}
    parts = [raw[:split], raw[split:]] if split else [raw]
    out = run(route, [start] + [body(p, i < len(parts) - 1) for i, p in enumerate(parts)])
    assert [m["type"] for m in out][:1] == ["http.response.start"]
    sent = b"".join(m.get("body", b"") for m in out[1:])
    assert dict(out[0]["headers"])[b"content-length"] == str(len(sent)).encode()
    return out[0], sent


def test_responses_non_streamed_every_generated_and_echoed_text():
    doc = {"id": "resp_1", "object": "response", "status": "completed", "model": "m",
           "instructions": "You help <PERSON_1>", "input": [
               {"type": "message", "role": "user", "content": "mail <EMAIL_ADDRESS_1>"}],
           "output": [
               {"type": "reasoning", "id": "rs_1", "summary": [
                   {"type": "summary_text", "text": "asked about <PERSON_10>"}],
                "content": [{"type": "reasoning_text", "text": "<PERSON_1> wants"}]},
               {"type": "message", "id": "msg_1", "role": "assistant", "content": [
                   {"type": "output_text", "text": "Done, <PERSON_1>: <PHONE_NUMBER_1>.",
                    "annotations": [], "logprobs": [{"token": "<PERSON_1>", "logprob": -1.0,
                                                     "top_logprobs": []}]},
                   {"type": "refusal", "refusal": "not <EMAIL_ADDRESS_1>"}]},
               {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "send",
                "arguments": '{"to": "<EMAIL_ADDRESS_1>", "cc": "<PERSON_99>"}'}],
           "output_text": "Done, <PERSON_1>: <PHONE_NUMBER_1>."}
    _, raw = whole(RESPONSES, doc, split=40)
    got = json.loads(raw)
    assert got["instructions"] == "You help Li Lei"
    assert got["input"][0]["content"] == "mail jane.roe@example.com"
    reasoning, msg, call = got["output"]
    assert reasoning["summary"][0]["text"] == "asked about 韩梅梅"
    assert reasoning["content"][0]["text"] == "Li Lei wants"
    assert msg["content"][0]["text"] == got["output_text"] == "Done, Li Lei: 13812345678."
    assert msg["content"][0]["logprobs"][0]["token"] == "<PERSON_1>"  # token lists untouched
    assert msg["content"][1]["refusal"] == "not jane.roe@example.com"
    assert call["arguments"] == '{"to": "jane.roe@example.com", "cc": "<PERSON_99>"}'


def test_chat_and_completions_non_streamed_fields():
    msg = {"role": "assistant", "content": "hi <PERSON_1>", "refusal": "no <PERSON_10>",
           "reasoning": "r <PHONE_NUMBER_1>", "reasoning_content": "rc <PERSON_1>",
           "tool_calls": [{"id": "call_1", "type": "function", "function": {
               "name": "send", "arguments": '{"to": "<EMAIL_ADDRESS_1>"}'}}]}
    doc = {"id": "c1", "object": "chat.completion", "choices": [
        {"index": 0, "message": msg, "finish_reason": "stop", "logprobs": {"content": [
            {"token": "<PERSON_1>", "logprob": -1.0, "top_logprobs": []}]}},
        {"index": 1, "message": {"role": "assistant", "content": "<EMAIL_ADDRESS_1>"},
         "finish_reason": "stop"}]}
    _, raw = whole(CHAT, doc)
    got = json.loads(raw)
    m0 = got["choices"][0]["message"]
    assert (m0["content"], m0["refusal"], m0["reasoning"], m0["reasoning_content"]) == \
           ("hi Li Lei", "no 韩梅梅", "r 13812345678", "rc Li Lei")
    assert m0["tool_calls"][0]["function"]["arguments"] == '{"to": "jane.roe@example.com"}'
    assert got["choices"][0]["logprobs"]["content"][0]["token"] == "<PERSON_1>"
    assert got["choices"][1]["message"]["content"] == "jane.roe@example.com"
    # completions with echo and logprobs: text restored, token lists left alone
    doc = {"id": "c2", "object": "text_completion", "choices": [
        {"index": 0, "text": "to <EMAIL_ADDRESS_1> from <PERSON_10>", "finish_reason": "stop",
         "logprobs": {"tokens": ["to", " <", "EMAIL_ADDRESS_1", ">"], "text_offset": [0, 2],
                      "token_logprobs": [None, -1.0],
                      "top_logprobs": [None, {"<PERSON_1>": -0.5}]}}]}
    _, raw = whole(COMPLETIONS, doc)
    got = json.loads(raw)
    assert got["choices"][0]["text"] == "to jane.roe@example.com from 韩梅梅"
    assert got["choices"][0]["logprobs"] == doc["choices"][0]["logprobs"]


def test_non_200_and_non_json_pass_through_unchanged():
    err = json.dumps({"error": {"message": "bad <PERSON_1>"}}).encode()
    start, raw = whole(CHAT, err, status=400)
    assert raw == err and start["status"] == 400
    for text in (b"not json <PERSON_1>", b"\xff\xfe<PERSON_1>", b"[\"<PERSON_1>\"]"):
        _, raw = whole(CHAT, text, ctype=b"text/plain")
        assert raw == text
    # a non-200 stream passes through frame by frame
    events = [chunk(0, content="x <PERSON_"), chunk(0, content="1>")]
    out = run(CHAT, [{**SSE_START, "status": 500}] + [body(e) for e in events]
              + [body(b"", more=False)])
    assert received(out) == b"".join(events)


# --- stand-ins left unrestored (issue #32 item 4) --------------------------------------------

GLUED_MAP = {"Ryan Sexton": "Jon Cole", "4968 4034 8450 1448": "4111 1111 1111 1111"}


def test_a_stand_in_glued_to_a_word_is_counted_and_reported_in_a_header():
    doc = {"object": "text_completion",
           "choices": [{"index": 0, "text": "from Ryan Sextonri and Ryan Sexton, card "
                        "4968 4034 8450 14485", "finish_reason": "stop"}]}
    before = METRICS["unrestored_stand_ins"]
    out = run(COMPLETIONS, [{"type": "http.response.start", "status": 200,
                             "headers": [(b"content-type", b"application/json")]},
                            body(json.dumps(doc).encode(), more=False)], GLUED_MAP)
    text = json.loads(out[1]["body"])["choices"][0]["text"]
    assert text == "from Ryan Sextonri and Jon Cole, card 4968 4034 8450 14485"
    assert METRICS["unrestored_stand_ins"] == before + 2
    assert (b"x-vllm-guard-unrestored", b"2") in out[0]["headers"]


@pytest.mark.parametrize("ending", ["done", "empty"])
def test_a_stream_reports_glued_stand_ins_in_a_comment_at_its_end(ending):
    """Split anywhere, a glued stand-in is counted once (held until the next character
    decides), and the count goes out as an SSE comment, which clients skip."""
    full = "xRyan Sexton and Ryan Sextonri, Ryan Sexton."
    for cut in range(1, len(full)):
        out = run(CHAT, [SSE_START] + [body(chunk(0, content=p)) for p in (full[:cut],
                                                                         full[cut:])]
                  + [body(chunk(0, "stop"))]
                  + ([body(b"data: [DONE]\n\n")] if ending == "done" else [])
                  + [body(b"", more=False)], GLUED_MAP)
        raw = received(out)
        assert texts(raw) == {(0, "content"): "xRyan Sexton and Ryan Sextonri, Jon Cole."}
        assert raw.count(b": x-vllm-guard-unrestored 2\n\n") == 1, (cut, raw)
        if ending == "done":
            assert raw.index(b": x-vllm-guard") < raw.index(b"data: [DONE]")


def test_no_header_or_comment_when_everything_is_restored():
    out = stream(CHAT, [chunk(0, content="Li Lei"), chunk(0, "stop")])
    assert b"unrestored" not in received(out)
