"""Request body size limit, enforced while the body is read (before any parsing or decoding)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.config import limit_hint
from common.errors import PayloadTooLarge


class BodySizeLimit:
    """Wraps ``receive``: a declared Content-Length over the limit fails at the first read, a chunked body as soon as
    it passes the limit. The error is raised inside the route, so it is rendered as the usual 413 envelope."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
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
