"""Request ids, the per-request log line and request metrics, as a plain ASGI middleware (Starlette's
BaseHTTPMiddleware costs a task and a stream per request, which showed in the text benchmark)."""

from __future__ import annotations

import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.metrics import Metrics

access_logger = logging.getLogger("embed.access")


def request_id_from(client_id: str) -> str:
    # Accept a client's id only if it is short and printable (it goes into logs and headers).
    return client_id if 0 < len(client_id) <= 128 and client_id.isprintable() else uuid.uuid4().hex


class AccessLog:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        request_id = request_id_from(headers.get(b"x-request-id", b"").decode("latin-1"))
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *(h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"),
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")  # the template, never the raw path
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            if "error_code" in state:
                self.metrics.errors.labels(route, state["error_code"]).inc()
            access_logger.info(
                "%s %s %d items=%s %.1fms id=%s",
                scope["method"],
                scope["path"],
                status,
                state.get("items", "-"),
                elapsed * 1000,
                request_id,
            )
