"""ASGI middleware (``--middleware vllm_guard.masking.middleware.MaskingMiddleware``).

request -> session (principal + id) -> fields -> detector pool -> vault -> masked request ->
vLLM -> restorer -> response. Fail closed: every POST route other than completions, chat
completions and responses is refused while masking is on (vLLM would render or tokenize its
text unmasked), WebSockets too; whatever the masker cannot read is refused with a 4xx; a vault
or detector outage is a 503 and nothing is forwarded.
"""

from __future__ import annotations

from vllm_guard import envs
from vllm_guard.asgi import (
    PRINCIPAL_KEY,
    SERVER_SET_KEY,
    ASGIApp,
    JsonRequestMiddleware,
    Message,
    Receive,
    RequestError,
    Scope,
    Send,
    header,
    route_path,
    send_error,
)
from vllm_guard.errors import GuardError
from vllm_guard.log import get_logger
from vllm_guard.masking.config import MaskingConfig
from vllm_guard.masking.detection.detector import build_detector
from vllm_guard.masking.fields import ROUTES
from vllm_guard.masking.masker import Masker
from vllm_guard.masking.metrics import METRICS
from vllm_guard.masking.pool import DetectionFailed, DetectorPool
from vllm_guard.masking.restorer import ResponseRestorer
from vllm_guard.masking.sessions import SessionBinder, load_session_key, session_cache_salt
from vllm_guard.masking.strategies import make_stand_ins
from vllm_guard.masking.vault import (
    InMemoryVault,
    RedisVault,
    Vault,
    VaultUnavailable,
    load_vault_key,
)

# methods that carry no body vLLM would render; everything else must be a masked route
READ_ONLY = ("GET", "HEAD", "OPTIONS")
BODYLESS_POSTS = ("/ping",)  # SageMaker's health check
logger = get_logger(__name__)


def make_vault(config: MaskingConfig) -> Vault:
    if config.vault == "redis":
        return RedisVault(config.redis_url, load_vault_key(config.vault_key_env),
                          config.ttl_seconds, config.max_placeholders_per_session)
    return InMemoryVault(config.ttl_seconds, config.max_sessions,
                         config.max_placeholders_per_session)


def with_header(send: Send, name: bytes, value: str) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []),
                                              (name, value.encode("latin-1"))]}
        await send(message)
    return wrapped


class MaskingMiddleware(JsonRequestMiddleware):
    def __init__(self, app: ASGIApp, config_path: str | None = None,
                 config: MaskingConfig | None = None):
        super().__init__(app)
        path = config_path or envs.get(envs.MASKING)
        if config is None:
            if not path:
                raise GuardError(f"MaskingMiddleware needs a config file: set {envs.MASKING}")
            config = MaskingConfig.load(path)
        self.config = config
        self.max_body_bytes = config.max_body_bytes
        self.sessions = SessionBinder(load_session_key(config.session_key_env,
                                                       required=config.vault == "redis"))
        pool = DetectorPool(lambda: build_detector(config), path, config.detector_workers,
                            config.detect_timeout_seconds)
        self.masker = Masker(pool, make_vault(config), config.max_placeholders_per_request,
                             make_stand_ins(config))
        self.session_header = config.session_header.lower().encode()
        logger.info("vllm-guard masking on: vault=%s, entities=%s, strategies=%s, detector "
                    "workers=%d", config.vault, sorted(config.enabled()),
                    config.strategies or "placeholder", config.detector_workers)

    def handles(self, scope: Scope) -> bool:
        return scope.get("method") == "POST" and route_path(scope) in ROUTES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") == "websocket":
            return await send({"type": "websocket.close", "code": 1008,
                               "reason": "not available with masking on"})
        if scope.get("type") == "http" and not self.handles(scope) and not (
                scope.get("method") in READ_ONLY or route_path(scope) in BODYLESS_POSTS):
            return await send_error(send, RequestError(
                403, f"{scope.get('method')} {route_path(scope)} is not available with masking "
                "on (its input would reach vLLM unmasked)", "endpoint_not_allowed",
                "permission_error"))
        await super().__call__(scope, receive, send)

    async def rewrite(self, scope: Scope, body: dict, send: Send) -> tuple[dict, Send]:
        principal = scope.get(PRINCIPAL_KEY)
        namespace, token = self.sessions.resolve(principal, header(scope, self.session_header))
        route = route_path(scope)
        server_set = scope.get(SERVER_SET_KEY, frozenset())
        try:
            mapping = await self.masker.mask_request(namespace, route, body, server_set)
        except (VaultUnavailable, DetectionFailed) as e:
            METRICS["vault_unavailable" if isinstance(e, VaultUnavailable)
                    else "detection_failed"] += 1
            logger.error("vllm-guard masking: %s; request refused (fail closed)", e)
            code = "vault_unavailable" if isinstance(e, VaultUnavailable) else "masking_failed"
            raise RequestError(503, f"{e}; request not forwarded", code) from None
        if "cache_salt" not in server_set:  # no grant middleware in front: isolate sessions
            salt = body.get("cache_salt")
            if salt is not None and not isinstance(salt, str):
                raise RequestError(400, "'cache_salt' must be a string", "invalid_cache_salt")
            body["cache_salt"] = session_cache_salt(namespace, salt)
        send = with_header(send, self.session_header, token)
        return body, ResponseRestorer(send, mapping, route)
