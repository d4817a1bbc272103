"""uvicorn's httptools HTTP/1.1 protocol with the limits it lacks, for what a client can hold before its request
reaches the app:

- request line and headers: at most ``max_header_bytes`` bytes and ``MAX_HEADERS`` fields (431); uvicorn's
  httptools protocol has no bound at all (10 MB of headers got a 200), and its h11 protocol, which has one, is
  several times slower and answers 400;
- time: a connection must send its complete request line and headers within ``header_timeout_s`` of connecting or
  of starting a request (slowloris), and an idle one before its first request is closed after that time too
  (uvicorn's keep-alive timeout starts only after a first response);
- connections: at most ``max_connections``, so that the process never runs out of file descriptors. A new
  connection past it sheds an old one that holds no request (one that has not sent a byte, oldest first; then an
  idle keep-alive; then one still sending its headers), so that connections held open without a word cannot lock
  other clients out; only when every connection has a request in progress does the new one get 503 at once.
  uvicorn's ``limit_concurrency`` cannot do this: it acts only once a request's headers are complete, and
  connections that never complete them are the problem;
- pipelining: uvicorn marks only the newest request of a connection as disconnected when the connection drops, so
  the one still running wrote to a closed transport (two ERROR tracebacks per connection); here it is marked too;
- every refusal is answered in the usual JSON envelope, and logged as a warning at most once per ``LOG_EVERY_S``
  per kind, with the number left out (thousands of hostile connections must not flood the log).
"""

from __future__ import annotations

import asyncio
import http
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from common.config import limit_hint
from common.errors import EmbedError, HeadersTooLarge, HeaderTimeout, InvalidInput, TooManyConnections, error_json

logger = logging.getLogger(__name__)

# Header fields of one request (Python's http.client allows 100 too; browsers send about 20).
MAX_HEADERS = 100
LOG_EVERY_S = 10.0
# What a shed connection was doing, by its rank (LimitedHttpToolsProtocol._shedding_rank).
SHED_KINDS = ("it had not sent a byte", "idle between requests", "still sending its headers")
# When a connection came or its last response ended, as a count rather than loop.time(): uvloop's clock has
# millisecond steps and stands still within a tick, so connections accepted together would tie and "oldest first"
# would be decided by their addresses in memory.
_idle_ticks = itertools.count()


class RateLimitedLog:
    """A warning that repeats: logged at once, then at most once per ``every_s``, saying how many were left out."""

    def __init__(self, message: str, every_s: float = LOG_EVERY_S) -> None:
        self.message = message
        self.every_s = every_s
        self._last = -float("inf")
        self._left_out = 0

    def warning(self, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            self._left_out += 1
            return
        since = f" ({self._left_out} more like it in the last {now - self._last:.0f} s)" if self._left_out else ""
        logger.warning("%s%s", self.message % args, since)
        self._last, self._left_out = now, 0


class RefusalLogs:
    """One rate-limited warning per kind of refusal, shared by the connections of one server."""

    def __init__(self) -> None:
        self.too_many_connections = RateLimitedLog(
            "%d connections are open, each with a request in progress: refusing new ones with 503 (max_connections=%d)"
        )
        self.shed = RateLimitedLog(
            "%d connections are open: closed one that held no request (%s) to admit a new one (max_connections=%d)"
        )
        self.headers_too_large = RateLimitedLog("refused a request whose headers were too large (431) from %s")
        self.header_timeout = RateLimitedLog(
            "closed a connection that had not sent its request headers after %g s (from %s)"
        )
        self.invalid_http = RateLimitedLog("refused a request that is not valid HTTP (400) from %s: %s")


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    max_header_bytes: int
    header_timeout_s: float


class _HeadersTooLarge(Exception):
    """Raised in a parser callback: stops httptools, then answered with 431."""


def canned_response(error: EmbedError) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, for answers given before the app is involved."""
    body = error_json(error)
    head = [
        f"HTTP/1.1 {error.status} {http.HTTPStatus(error.status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        *(f"{name}: {value}" for name, value in (error.headers or {}).items()),
        "connection: close",
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    limits: ClassVar[ConnectionLimits]
    logs: ClassVar[RefusalLogs]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._refused = False
        self._in_headers = False
        self._message_began = False  # in the data being parsed now
        self._header_bytes = 0  # of the current request, counted from the parser's callbacks
        self._header_fields = 0
        self._unparsed_header_bytes = 0  # received while the parser was still buffering a header
        self._header_timer: asyncio.TimerHandle | None = None
        self._running: RequestResponseCycle | None = None
        self._sent_a_byte = False
        self._idle_since = 0  # a tick of _idle_ticks: connected, or its last response ended
        self._shed = False

    # -- connections --------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._idle_since = next(_idle_ticks)
        open_connections = len(self.connections) - sum(1 for c in self.connections if getattr(c, "_shed", False))
        if open_connections > self.limits.max_connections and not self._shed_one(open_connections):
            self.logs.too_many_connections.warning(open_connections - 1, self.limits.max_connections)
            self._refuse(
                TooManyConnections(
                    "the service has too many open connections; retry shortly "
                    f"({limit_hint('max_connections', self.limits.max_connections)})",
                    headers={"Retry-After": "1"},
                )
            )
            return
        self._arm_header_timer()

    def _shed_one(self, open_connections: int) -> bool:
        """Close the connection that holds no request and has held it longest, preferring one that never sent a
        byte, then an idle keep-alive, then one still sending its headers; False when every other connection has a
        request in progress."""
        candidates = [
            (rank, connection._idle_since, connection)
            for connection in self.connections
            if isinstance(connection, LimitedHttpToolsProtocol)
            and connection is not self
            and not connection._shed
            and (rank := connection._shedding_rank()) is not None
        ]
        if not candidates:
            return False
        rank, _, victim = min(candidates, key=lambda candidate: candidate[:2])
        self.logs.shed.warning(open_connections - 1, SHED_KINDS[rank], self.limits.max_connections)
        victim._shed = True
        victim._cancel_header_timer()
        victim.transport.close()
        return True

    def _shedding_rank(self) -> int | None:
        """0: has not sent a byte; 1: idle between requests; 2: still sending its request headers; None: a request
        is in progress (never shed)."""
        if self.transport.is_closing() or self._refused:
            return None
        if not self._sent_a_byte:
            return 0
        if self._running is not None and not self._running.response_complete:
            return None
        return 2 if self._in_headers else 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        running = self._running
        if running is not None and running is not self.cycle and not running.response_complete:
            running.disconnected = True
            running.message_event.set()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._idle_since = next(_idle_ticks)
        super().on_response_complete()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def _refuse(self, error: EmbedError) -> None:
        self._refused = True
        self._cancel_header_timer()
        if not self.transport.is_closing():
            self.transport.write(canned_response(error))
            self.transport.close()

    # -- request line and headers -------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refused or self._shed:
            return
        self._sent_a_byte = True
        self._unset_keepalive_if_required()
        self._message_began = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadersTooLarge):
                self._refuse_large_headers()
            else:
                self.logs.invalid_http.warning(self._peer(), str(exc)[:100])
                self._refuse(InvalidInput("invalid HTTP request"))
            return
        if self._in_headers and not self._message_began:
            # httptools keeps a header's name and value to itself until the header is complete: count what
            # arrives meanwhile, or one endless header would be buffered without limit.
            self._unparsed_header_bytes += len(data)
            if self._unparsed_header_bytes > self.limits.max_header_bytes:
                self._refuse_large_headers()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._message_began = self._in_headers = True
        self._header_bytes = self._header_fields = self._unparsed_header_bytes = 0
        self._arm_header_timer()

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_fields += 1
        self._count_header_bytes(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._cancel_header_timer()
        super().on_headers_complete()

    def _count_header_bytes(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.limits.max_header_bytes or self._header_fields > MAX_HEADERS:
            raise _HeadersTooLarge

    def _refuse_large_headers(self) -> None:
        self.logs.headers_too_large.warning(self._peer())
        self._refuse(
            HeadersTooLarge(
                f"the request line and headers are larger than {self.limits.max_header_bytes} bytes or have more than "
                f"{MAX_HEADERS} fields ({limit_hint('max_header_bytes', self.limits.max_header_bytes)})"
            )
        )

    # -- time -----------------------------------------------------------------------------------------------------

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            if self._in_headers:  # a pipelined request, still incomplete behind the one being served
                self._arm_header_timer()
            return
        if not self._in_headers:
            self.transport.close()  # idle since it connected: nothing to answer, nothing worth a log line
            return
        self.logs.header_timeout.warning(self.limits.header_timeout_s, self._peer())
        self._refuse(
            HeaderTimeout(
                f"the request headers did not arrive within {self.limits.header_timeout_s:g} s; the limit is "
                "header_timeout_s (--header-timeout-s or EMBED_HEADER_TIMEOUT_S)"
            )
        )

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "unknown"


def protocol_class(limits: ConnectionLimits) -> type[LimitedHttpToolsProtocol]:
    """The protocol class to hand to uvicorn (``Config(http=...)``), with these limits."""

    class Protocol(LimitedHttpToolsProtocol):
        pass

    Protocol.limits = limits
    Protocol.logs = RefusalLogs()
    return Protocol
