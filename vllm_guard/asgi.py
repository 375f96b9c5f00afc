"""Small pure-ASGI helpers shared by vllm-guard's middlewares.

No ``BaseHTTPMiddleware``: it buffers streamed responses. Only request bodies (small JSON)
are read whole; responses pass through frame by frame.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_BODY_BYTES = 8 << 20


OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions")
# Set by the grant middleware on the ASGI scope: the authenticated caller. Middlewares inside
# it (masking) key per-user state by it; absent means nobody was authenticated.
PRINCIPAL_KEY = "vllm_guard.principal"
# Set by the grant middleware: body paths whose values it wrote itself (the cache salt it
# derived, the verified grant). Not client data, so masking does not scan them: a hash that
# NER happens to read as a name must not refuse a request.
SERVER_SET_KEY = "vllm_guard.server_set"
# vLLM copies these (top level, or from vllm_xargs) into the request, where a KV or
# encoder-cache connector reads remote block ids and hosts from them: never a client's.
TRANSFER_FIELDS = ("kv_transfer_params", "ec_transfer_params")


class RequestError(Exception):
    """A client-side problem, answered with an OpenAI-shaped error and this status."""

    def __init__(self, status: int, message: str, code: str, err_type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.err_type = err_type or ("invalid_request_error" if status < 500 else "server_error")


def error_body(status: int, message: str, code: str, err_type: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": err_type, "param": None,
                                 "code": code}}).encode()


async def send_error(send: Send, err: RequestError, headers: list | None = None) -> None:
    body = error_body(err.status, err.message, err.code, err.err_type)
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


async def read_body(receive: Receive, limit: int = MAX_BODY_BYTES) -> bytes:
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise RequestError(400, "client disconnected before the body was sent", "disconnected")
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body larger than {limit} bytes", "body_too_large")
        chunks.append(chunk)
        if not msg.get("more_body"):
            return b"".join(chunks)


def parse_json_object(body: bytes) -> dict:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "request body is not valid JSON", "invalid_json") from None
    except RecursionError:
        raise RequestError(400, "request body is nested too deeply", "invalid_json") from None
    if not isinstance(doc, dict):
        raise RequestError(400, "request body must be a JSON object", "invalid_json")
    return doc


def replay(scope: Scope, receive: Receive, body: bytes) -> tuple[Scope, Receive]:
    """A scope with the new content-length and a receive() that yields ``body`` once."""
    sent = False

    async def new_receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    return {**scope, "headers": headers}, new_receive


def route_path(scope: Scope) -> str:
    """The path vLLM's router matches: ``path`` without ``root_path`` (as Starlette does),
    without a trailing slash."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        path = path[len(root):]
    return path.rstrip("/") or "/"


def is_openai_generation(scope: Scope) -> bool:
    return (scope.get("type") == "http" and scope.get("method") == "POST"
            and route_path(scope) in OPENAI_ROUTES)


class JsonRequestMiddleware(ABC):
    """Base of our middlewares: rewrites the JSON body of OpenAI generation requests.

    Subclasses implement :meth:`rewrite` (and may override :meth:`other` for every other
    request). A :class:`RequestError` becomes an OpenAI-shaped error response.
    """

    max_body_bytes = MAX_BODY_BYTES

    def __init__(self, app: ASGIApp):
        self.app = app

    @abstractmethod
    async def rewrite(self, scope: Scope, body: dict, send: Send) -> tuple[dict, Send]:
        """Return the body to forward and the ``send`` the response goes through."""

    async def admit(self, scope: Scope) -> None:  # noqa: B027 - optional hook
        """Checks from the headers alone, before the body is read (raise RequestError)."""

    def handles(self, scope: Scope) -> bool:
        """Whether :meth:`rewrite` sees this request's body."""
        return is_openai_generation(scope)

    async def other(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        if not self.handles(scope):
            return await self.other(scope, receive, send)
        try:
            await self.admit(scope)
            body = parse_json_object(await read_body(receive, self.max_body_bytes))
            body, send = await self.rewrite(scope, body, send)
        except RequestError as e:
            return await send_error(send, e)
        scope, receive = replay(scope, receive, json.dumps(body).encode())
        await self.app(scope, receive, send)
