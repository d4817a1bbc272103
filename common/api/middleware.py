"""The two middlewares every app runs, as plain ASGI classes (Starlette's BaseHTTPMiddleware costs a task and a
stream per request, which showed in the text benchmark):

- ``AccessLog``: request ids (``X-Request-ID`` echoed or made up), one log line and the metrics of each request;
- ``BodySizeLimit``: the request body limit, enforced while the body is read, before any parsing or decoding;
- ``CancelOnDisconnect``: a client that goes away cancels its request's work (queued decodes, batch rows).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.config import limit_hint
from common.errors import PayloadTooLarge
from common.metrics import Metrics

access_logger = logging.getLogger("embed.access")


def request_id_from(client_id: str) -> str:
    # Accept a client's id only if it is short and printable (it goes into logs and headers).
    return client_id if 0 < len(client_id) <= 128 and client_id.isprintable() else uuid.uuid4().hex


class HTTPMiddleware:
    """Passes lifespan and websocket scopes through untouched; ``handle`` sees the HTTP requests."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.handle(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class AccessLog(HTTPMiddleware):
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
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
        except asyncio.CancelledError:
            if state.get("client_disconnected"):  # set by CancelOnDisconnect, which cancelled the request
                status = 499
                state["error_code"] = "client_disconnected"
            raise
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


class BodySizeLimit(HTTPMiddleware):
    """Wraps ``receive``: a declared Content-Length over the limit fails at the first read, a chunked body as soon as
    it passes the limit. The error is raised inside the route, so it is rendered as the usual 413 envelope."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        super().__init__(app)
        self.max_bytes = max_bytes

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = dict(scope["headers"]).get(b"content-length", b"")
        received = 0

        def too_large(size: str) -> PayloadTooLarge:
            return PayloadTooLarge(
                f"request body is {size} bytes; the limit is {limit_hint('max_body_bytes', self.max_bytes)}"
            )

        async def limited_receive() -> Message:
            nonlocal received
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise too_large(declared.decode())
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large(f"more than {self.max_bytes}")
            return message

        await self.app(scope, limited_receive, send)


class CancelOnDisconnect(HTTPMiddleware):
    """Once a request's body has been read, a client that disconnects before the response starts cancels the
    request: its image decodes that have not started never run and its rows leave the batch queues (uvicorn would
    otherwise finish the work for nobody). It wraps the access log, which logs such a request as 499
    ``client_disconnected``.

    After the body, ``receive`` only ever says ``http.disconnect``; a watcher waits for that message, and an app
    that asks for another message gets the watcher's."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.setdefault("state", {})
        watcher: asyncio.Task[Message] | None = None
        response_started = False

        async def watch() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not response_started:
                state["client_disconnected"] = True
                work.cancel()
            return message

        async def receive_then_watch() -> Message:
            nonlocal watcher
            if watcher is not None:
                return await asyncio.shield(watcher)
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                watcher = asyncio.ensure_future(watch())
            return message

        async def send_and_note(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        work = asyncio.ensure_future(self.app(scope, receive_then_watch, send_and_note))
        try:
            await work
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not state.get("client_disconnected") or (current is not None and current.cancelling()):
                raise  # the server is shutting down, not our cancel
            # Nobody is there to read a response (servers drop what is sent to a closed connection).
        finally:
            if watcher is not None:
                watcher.cancel()
