"""Streamed restoration in process: per choice, per tool call, Responses parts, and a flush
whenever the stream ends (recorded ASGI messages, no server)."""

from __future__ import annotations

import asyncio
import json

from vllm_guard.masking.restorer import ResponseRestorer

MAPPING = {"<EMAIL_ADDRESS_1>": "a@b.co", "<US_SSN_1>": "078-05-1120"}


def run(route: str, events: list[bytes], done: bool = True,
        content_type: bytes = b"text/event-stream") -> bytes:
    out: list[dict] = []

    async def send(m):
        out.append(m)

    async def go():
        r = ResponseRestorer(send, MAPPING, route)
        await r({"type": "http.response.start", "status": 200,
                 "headers": [(b"content-type", content_type)]})
        body = b"".join(events) + (b"data: [DONE]\n\n" if done else b"")
        for i in range(0, len(body), 5):  # 5-byte frames: events split everywhere
            await r({"type": "http.response.body", "body": body[i:i + 5], "more_body": True})
        await r({"type": "http.response.body", "body": b"", "more_body": False})

    asyncio.run(go())
    return b"".join(m.get("body", b"") for m in out[1:])


def sse(doc: dict, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(doc).encode() + b"\n\n"


def chat_chunk(idx: int, content: str | None = None, finish: str | None = None,
               tool_args: str | None = None) -> bytes:
    delta: dict = {}
    if content is not None:
        delta["content"] = content
    if tool_args is not None:
        delta["tool_calls"] = [{"index": 0, "function": {"arguments": tool_args}}]
    return sse({"id": "c", "object": "chat.completion.chunk",
                "choices": [{"index": idx, "delta": delta, "finish_reason": finish}]})


def collect(raw: bytes) -> dict[tuple[int, str], str]:
    got: dict[tuple[int, str], str] = {}
    for ev in raw.decode().split("\n\n"):
        line = next((ln for ln in ev.split("\n") if ln.startswith("data: {")), None)
        if not line:
            continue
        for ch in json.loads(line[6:]).get("choices", []):
            d = ch.get("delta", {})
            for name in ("content",):
                if d.get(name):
                    got[(ch["index"], name)] = got.get((ch["index"], name), "") + d[name]
            for call in d.get("tool_calls") or []:
                args = call["function"]["arguments"]
                got[(ch["index"], "tool")] = got.get((ch["index"], "tool"), "") + args
            if ch.get("text"):
                got[(ch["index"], "text")] = got.get((ch["index"], "text"), "") + ch["text"]
    return got


def test_n2_held_fragments_stay_in_their_own_choice():
    events = [chat_chunk(0, "x <EMAIL_"), chat_chunk(1, "y <US_S"), chat_chunk(0, "ADDRESS_1"),
              chat_chunk(1, "SN_1")]  # both end held (not yet complete), no finish_reason
    for done in (True, False):
        got = collect(run("/v1/chat/completions", events, done))
        assert got == {(0, "content"): "x <EMAIL_ADDRESS_1", (1, "content"): "y <US_SSN_1"}
    events = [chat_chunk(0, "x <EMAIL_"), chat_chunk(1, "y <US_S"),
              chat_chunk(0, "ADDRESS_1>"), chat_chunk(1, "SN_1>"),
              chat_chunk(0, "", "stop"), chat_chunk(1, "", "stop")]
    got = collect(run("/v1/chat/completions", events))
    assert got == {(0, "content"): "x a@b.co", (1, "content"): "y 078-05-1120"}


def test_tool_arguments_held_over_the_final_chunk_stay_arguments():
    events = [chat_chunk(0, tool_args='{"to": "<EMAIL_'), chat_chunk(0, tool_args="ADDRESS_1"),
              chat_chunk(0, finish="tool_calls")]
    got = collect(run("/v1/chat/completions", events))
    assert got == {(0, "tool"): '{"to": "<EMAIL_ADDRESS_1'}
    events[1] = chat_chunk(0, tool_args='ADDRESS_1>"}')
    assert collect(run("/v1/chat/completions", events)) == {(0, "tool"): '{"to": "a@b.co"}'}


def test_stream_without_done_flushes_held_text():
    events = [sse({"id": "c", "choices": [{"index": 0, "text": "mail <EMAIL_ADD",
                                           "finish_reason": None}]})]
    raw = run("/v1/completions", events, done=False)
    assert collect(raw) == {(0, "text"): "mail <EMAIL_ADD"}
    events.append(sse({"id": "c", "choices": [{"index": 0, "text": "RESS_1> ok",
                                               "finish_reason": None}]}))
    assert collect(run("/v1/completions", events, done=False)) == {(0, "text"): "mail a@b.co ok"}


def test_responses_deltas_restored_across_events():
    def delta(text: str) -> bytes:
        return sse({"type": "response.output_text.delta", "output_index": 0,
                    "content_index": 0, "delta": text}, "response.output_text.delta")

    full = "send to <EMAIL_ADDRESS_1> now"
    events = [delta("send to <EM"), delta("AIL_ADDR"), delta("ESS_1> now"),
              sse({"type": "response.output_text.done", "output_index": 0, "content_index": 0,
                   "text": full}, "response.output_text.done"),
              sse({"type": "response.completed", "response": {"output": [{"content": [
                  {"type": "output_text", "text": full}]}]}}, "response.completed")]
    raw = run("/v1/responses", events, done=False).decode()
    deltas = "".join(json.loads(ln[6:])["delta"] for ln in raw.split("\n")
                     if ln.startswith("data: {") and '"response.output_text.delta"' in ln)
    assert deltas == "send to a@b.co now"
    assert "<EMAIL_ADDRESS_1>" not in raw and raw.count("send to a@b.co now") == 2
    assert "event: response.output_text.delta\ndata: " in raw  # SSE framing kept
    # held at a part's end: the fragment goes out as a delta before the done event
    events = [delta("x <EMAIL_ADD"), sse({"type": "response.output_text.done",
                                          "output_index": 0, "content_index": 0,
                                          "text": "x <EMAIL_ADD"}, "response.output_text.done")]
    raw = run("/v1/responses", events, done=False).decode()
    deltas = "".join(json.loads(ln[6:])["delta"] for ln in raw.split("\n")
                     if ln.startswith("data: {") and '.delta"' in ln)
    assert deltas == "x <EMAIL_ADD"


def test_non_streamed_documents_restored_everywhere():
    doc = {"output": [{"type": "message", "content": [{"type": "output_text",
                                                         "text": "hi <EMAIL_ADDRESS_1>"}]},
                      {"type": "function_call", "arguments": '{"s": "<US_SSN_1>"}'},
                      {"type": "reasoning", "summary": [{"text": "<PERSON_9>"}]}]}
    raw = run("/v1/responses", [json.dumps(doc).encode()], done=False,
              content_type=b"application/json")
    out = json.loads(raw)
    assert out["output"][0]["content"][0]["text"] == "hi a@b.co"
    assert out["output"][1]["arguments"] == '{"s": "078-05-1120"}'
    assert out["output"][2]["summary"][0]["text"] == "<PERSON_9>"  # unknown: untouched
