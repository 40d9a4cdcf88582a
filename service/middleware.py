"""Pure ASGI middleware: body size limit, token-bucket rate limit, security headers, access log + request metrics."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from service.auth import KeyRing, TrustedProxies, client_address, client_identity
from service.observability import Metrics
from service.settings import RateLimitSettings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("service.access")

#: Paths never rate limited and not worth an access-log line at info level.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


async def send_json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
    data = json.dumps(body).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers],
    })
    await send({"type": "http.response.body", "body": data})


class BodyLimitMiddleware:
    """Refuses bodies over their limit with 413 before the app sees them: by Content-Length when given, else by
    counting while reading. The body is read up front (bounded) and replayed to the app."""

    def __init__(self, app: ASGIApp, *, default_limit: int, limits: dict[str, int] | None = None):
        self.app = app
        self.default_limit = default_limit
        self.limits = limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.default_limit)
        too_large = {"error": "PayloadTooLarge", "detail": f"the request body is over the limit of {limit} bytes"}
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await send_json(send, 400, {"error": "BadInput", "detail": "invalid Content-Length"})
                    return
                if declared > limit:
                    await send_json(send, 413, too_large, [(b"connection", b"close")])
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await send_json(send, 413, too_large, [(b"connection", b"close")])
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class TokenBuckets:
    """Per-client token buckets, the least recently seen dropped beyond ``max_clients``."""

    def __init__(self, cfg: RateLimitSettings):
        self.cfg = cfg
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, client: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(client, (float(self.cfg.burst), now))
        tokens = min(float(self.cfg.burst), tokens + (now - last) * self.cfg.per_second)
        ok = tokens >= 1.0
        if ok:
            tokens -= 1.0
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self.cfg.max_clients:
            self._buckets.popitem(last=False)
        return ok


class RateLimitMiddleware:
    """One token bucket per validated identity (:func:`service.auth.client_identity`): a configured API key's own,
    else the client address (behind ``trusted`` proxies, the forwarded one)."""

    def __init__(self, app: ASGIApp, *, buckets: TokenBuckets, metrics: Metrics, keys: KeyRing,
                 trusted: TrustedProxies):
        self.app = app
        self.buckets = buckets
        self.metrics = metrics
        self.keys = keys
        self.trusted = trusted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in QUIET_PATHS:
            await self.app(scope, receive, send)
            return
        if not self.buckets.allow(client_identity(scope, self.keys, self.trusted)):
            self.metrics.rejected.labels("rate_limit").inc()
            await send_json(
                send, 429, {"error": "RateLimited", "detail": "too many requests; slow down"}, [(b"retry-after", b"1")]
            )
            return
        await self.app(scope, receive, send)


#: The page's policy: its own scripts, styles, images and API only; no plugins, no framing, no foreign forms.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
#: Every other response (JSON, images): nothing may run in it, and it may not be framed.
API_CSP = "default-src 'none'; frame-ancestors 'none'; sandbox"
#: The API docs load Swagger UI / ReDoc from their CDN: only framing is forbidden there.
DOCS_CSP = "frame-ancestors 'none'"
DOCS_PATHS = ("/docs", "/redoc")


class SecurityHeadersMiddleware:
    """Adds Content-Security-Policy (with frame-ancestors), X-Frame-Options, X-Content-Type-Options and
    Referrer-Policy to every HTTP response (a header the app set itself wins)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path == "/" or path.startswith("/static/"):
            csp = PAGE_CSP
        elif path.startswith(DOCS_PATHS):
            csp = DOCS_CSP
        else:
            csp = API_CSP
        extra = [(b"content-security-policy", csp.encode()), (b"x-frame-options", b"DENY"),
                 (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *((k, v) for k, v in extra if k not in have)]
            await send(message)

        await self.app(scope, receive, send_wrapper)


class AccessLogMiddleware:
    """Times every request, counts it by route template and status, writes one JSON access-log line (no header
    values but the request id: API keys are never logged)."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, enabled: bool = True,
                 trusted: TrustedProxies | None = None):
        self.app = app
        self.metrics = metrics
        self.enabled = enabled
        self.trusted = trusted or TrustedProxies([])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500
        request_id = None
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                request_id = value.decode("latin-1")[:64]
        request_id = request_id or uuid.uuid4().hex[:16]

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            seconds = time.perf_counter() - t0
            route = scope.get("route")
            template = getattr(route, "path", None) or (
                "static" if scope["path"].startswith("/static") else "unmatched"
            )
            self.metrics.requests.labels(scope["method"], template, str(status)).inc()
            self.metrics.latency.labels(template).observe(seconds)
            if self.enabled and (scope["path"] not in QUIET_PATHS or status >= 400):
                access_log.info(
                    "request",
                    extra={
                        "method": scope["method"],
                        "path": scope["path"],
                        "route": template,
                        "status": status,
                        "ms": round(seconds * 1000, 2),
                        "client": client_address(scope, self.trusted),
                        "request_id": request_id,
                    },
                )
