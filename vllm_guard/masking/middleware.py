"""ASGI middleware (``--middleware vllm_guard.masking.middleware.MaskingMiddleware``).

request -> detector -> vault -> masked request -> vLLM -> restorer -> response.
Streamed (SSE) responses are restored event by event; non-streamed bodies are buffered
(they are complete JSON documents anyway). Vault outage: 503, nothing forwarded.
"""

from __future__ import annotations

import json
import os
import secrets

from vllm_guard.asgi import (
    ASGIApp,
    JsonRequestMiddleware,
    Message,
    RequestError,
    Scope,
    Send,
    header,
)
from vllm_guard.errors import GuardError
from vllm_guard.log import get_logger
from vllm_guard.masking.config import MaskingConfig
from vllm_guard.masking.detector import build_detector
from vllm_guard.masking.masker import (
    METRICS,
    Masker,
    StreamRestorer,
    restore_response,
)
from vllm_guard.masking.vault import (
    InMemoryVault,
    RedisVault,
    Vault,
    VaultUnavailable,
    load_vault_key,
)

MASKING_ENV = "VLLM_GUARD_MASKING"  # path of the masking config file
logger = get_logger(__name__)


def make_vault(config: MaskingConfig) -> Vault:
    if config.vault == "redis":
        return RedisVault(config.redis_url, load_vault_key(config.vault_key_env),
                          config.ttl_seconds)
    return InMemoryVault(config.ttl_seconds, config.max_sessions)


def check_shape(body: dict) -> None:
    """Reject shapes we could not mask (vLLM's validation errors would echo raw input)."""
    messages = body.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise RequestError(400, "'messages' must be a list of objects", "invalid_messages")
        for m in messages:
            if not isinstance(m.get("content"), str | list | type(None)):
                raise RequestError(400, "message 'content' must be a string or a list of parts",
                                   "invalid_content")
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str | list):
        raise RequestError(400, "'prompt' must be a string or a list", "invalid_prompt")


class _ResponseRestorer:
    """Wraps ``send``: restores placeholders in the response before it leaves the server."""

    def __init__(self, send: Send, mapping: dict[str, str]):
        self.send_downstream = send
        self.mapping = mapping
        self.start: Message | None = None
        self.streaming = False
        self.stream = StreamRestorer(mapping)
        self.pending = b""
        self.body = []
        self.last_chunk: dict | None = None

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
        try:
            doc = json.loads(raw)
            restore_response(doc, self.mapping)
            raw = json.dumps(doc).encode()
        except ValueError:
            pass
        headers = [(k, v) for k, v in self.start.get("headers", []) if k != b"content-length"]
        headers.append((b"content-length", str(len(raw)).encode()))
        await self.send_downstream({**self.start, "headers": headers})
        await self.send_downstream({"type": "http.response.body", "body": raw})

    async def _stream(self, message: Message) -> None:
        data = self.pending + message.get("body", b"")
        events = data.split(b"\n\n")
        self.pending = events.pop()
        out = [self._event(e) for e in events]
        if not message.get("more_body"):
            if self.pending:
                out.append(self._event(self.pending))
            self.pending = b""
        await self.send_downstream({"type": "http.response.body",
                                    "body": b"".join(out), "more_body": message.get("more_body",
                                                                                      False)})

    def _event(self, event: bytes) -> bytes:
        line = event.strip()
        if not line.startswith(b"data:"):
            return event + b"\n\n"
        payload = line[5:].strip()
        if payload == b"[DONE]":
            tail = self.stream.pending()
            prefix = b""
            if tail and self.last_chunk is not None:  # stream ended inside a held fragment
                chunk = {**self.last_chunk, "choices": [
                    {"index": 0, "delta": {"content": tail}, "text": tail,
                     "finish_reason": None}]}
                prefix = b"data: " + json.dumps(chunk).encode() + b"\n\n"
            return prefix + b"data: [DONE]\n\n"
        try:
            chunk = json.loads(payload)
        except ValueError:
            return event + b"\n\n"
        self.stream.restore_chunk(chunk)
        self.last_chunk = chunk
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"


class MaskingMiddleware(JsonRequestMiddleware):
    def __init__(self, app: ASGIApp, config_path: str | None = None):
        super().__init__(app)
        path = config_path or os.environ.get(MASKING_ENV)
        if not path:
            raise GuardError(f"MaskingMiddleware needs a config file: set {MASKING_ENV}")
        self.config = MaskingConfig.load(path)
        self.max_body_bytes = self.config.max_body_bytes
        self.masker = Masker(build_detector(self.config), make_vault(self.config))
        self.session_header = self.config.session_header.lower().encode()
        logger.info("vllm-guard masking on: vault=%s, entities=%s", self.config.vault,
                    sorted(self.config.enabled()))

    async def rewrite(self, scope: Scope, body: dict, send: Send) -> tuple[dict, Send]:
        check_shape(body)
        session = header(scope, self.session_header) or "req-" + secrets.token_hex(16)
        try:
            mapping = await self.masker.mask_request(session, body)
        except VaultUnavailable as e:
            METRICS["vault_unavailable"] += 1
            logger.error("vllm-guard masking: %s; request refused (fail closed)", e)
            raise RequestError(503, f"{e}; request not forwarded", "vault_unavailable") from None
        return body, _ResponseRestorer(send, mapping)
