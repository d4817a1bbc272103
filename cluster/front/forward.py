"""Sending a checked request on to Serve's proxy on this node, its whole body at once, and streaming the answer back."""

from __future__ import annotations

import logging

import aiohttp
from multidict import CIMultiDict
from starlette.types import Receive, Scope, Send
from yarl import URL

from common.api.middleware import app_path, send_error
from common.errors import EmbedError, NotReady

logger = logging.getLogger(__name__)

# Headers of one hop, never passed on (RFC 9110 7.6.1), and the body framing, which the front door sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "expect",
    }
)
# uvicorn adds its own to every response; Serve's proxy (uvicorn too) would make them twice.
OWN_RESPONSE_HEADERS = frozenset({"date", "server"})
DROPPED_RESPONSE_HEADERS = HOP_BY_HOP | OWN_RESPONSE_HEADERS
# Chunks of an answer as they come from Serve's proxy.
RESPONSE_CHUNK_BYTES = 256 * 1024


class Upstream:
    """The connections to Serve's proxy on this node, opened by the front door's lifespan."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, force_close=False, enable_cleanup_closed=True)
        # No overall timeout: Serve's proxy has its own (http_options.request_timeout_s), and the app its own.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the front door's lifespan has not started"
        return self._session


class ForwardToServe:
    """The innermost app: the whole body (of a route that takes one; the checks around it bound its size and time),
    then the request to Serve's proxy, and its answer streamed back."""

    def __init__(self, upstream: Upstream, body_paths: frozenset[str], strip_cors: bool) -> None:
        self.upstream = upstream
        self.body_paths = body_paths
        self.strip_cors = strip_cors  # the front door's CORS middleware sets those headers once

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = bytearray()
        if app_path(scope) in self.body_paths:
            try:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body += message.get("body", b"")
                    if not message.get("more_body", False):
                        break
            except EmbedError as error:  # 413 or 408 from the body limits, as the standalone app answers them
                await send_error(send, scope, error)
                return
        await self.forward(scope, body or None, send)  # aiohttp sends a bytearray as it is: no copy of a large body

    async def forward(self, scope: Scope, body: bytearray | None, send: Send) -> None:
        headers: CIMultiDict[str] = CIMultiDict()
        for raw_name, raw_value in scope["headers"]:
            name = raw_name.decode("latin-1").lower()
            if name not in HOP_BY_HOP and name != "x-request-id":
                headers.add(name, raw_value.decode("latin-1"))
        request_id = scope.get("state", {}).get("request_id")
        if request_id:  # the id of the front door's log line: the replica logs it and Serve's proxy echoes it
            headers["x-request-id"] = request_id
        target = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string", b"")
        url = URL(
            self.upstream.base_url + target.decode("latin-1") + ("?" + query.decode("latin-1") if query else ""),
            encoded=True,
        )
        started = False
        try:
            async with self.upstream.session.request(
                scope["method"],
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            ) as answer:
                response_headers = [
                    (name.lower(), value)
                    for name, value in answer.raw_headers
                    if name.decode("latin-1").lower() not in DROPPED_RESPONSE_HEADERS
                    and not (self.strip_cors and name.lower().startswith(b"access-control-"))
                ]
                if answer.headers.get("content-length") is not None:
                    response_headers.append((b"content-length", answer.headers["content-length"].encode("latin-1")))
                await send({"type": "http.response.start", "status": answer.status, "headers": response_headers})
                started = True
                async for chunk in answer.content.iter_chunked(RESPONSE_CHUNK_BYTES):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        except (aiohttp.ClientError, ConnectionError) as exc:
            if started:
                raise  # the answer has begun: uvicorn closes the connection
            logger.warning("Serve's proxy at %s did not answer: %r", self.upstream.base_url, exc)
            unavailable = NotReady(
                "the service is not reachable on this node; retry shortly", headers={"Retry-After": "5"}
            )
            await send_error(send, scope, unavailable)
