"""A client of a masking server: echo requests, the prompt the engine saw, stream text."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def echo(server, prompt: str, session: str | None = None, stream: bool = False,
         ids: bool = False, with_session: bool = False,
         headers: dict[str, str] | None = None) -> tuple:
    """echo=True returns the (restored) prompt; ids=True instead returns the prompt's token ids
    as the engine saw them (vLLM ignores echo when token ids are requested). with_session
    adds the session token the server issued."""
    body = {"model": "test", "prompt": prompt, "max_tokens": 1, "temperature": 0,
            **({"return_token_ids": True} if ids else {"echo": True})}
    headers = {"Content-Type": "application/json", **(headers or {}),
               **({"x-vllm-guard-session": session} if session else {})}
    req = urllib.request.Request(server.url + "/v1/completions",
                                 json.dumps({**body, "stream": stream}).encode(), headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, raw, token = r.status, r.read(), r.headers.get("x-vllm-guard-session")
    except urllib.error.HTTPError as e:
        status, raw, token = e.code, e.read(), None
    out = raw if stream else json.loads(raw or b"{}")
    return (status, out, token) if with_session else (status, out)


def engine_prompt(tokenizer, body: dict) -> str:
    """The prompt as the engine received it (token ids are not touched by the restorer)."""
    return tokenizer.decode(body["choices"][0]["prompt_token_ids"])


def sse_text(sse: bytes) -> str:
    """The text of a completions or chat stream, chunks joined."""
    text = ""
    for line in sse.decode().split("\n\n"):
        if line.startswith("data: {"):
            ch = json.loads(line[6:])["choices"][0]
            text += ch.get("text") or ch.get("delta", {}).get("content") or ""
    return text
