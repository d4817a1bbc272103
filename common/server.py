"""What turns a model into a running service: ``ServiceDefinition`` (one per model file) builds the app and runs
``main``: settings, logging, the model on disk (downloaded if it is a hub id), then uvicorn (with the connection
limits of ``common.http_protocol``), a graceful shutdown on SIGTERM, SIGINT and SIGHUP, and a non-zero exit when
the model fails to load."""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import math
import os
import resource
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Generic

import uvicorn
from fastapi import APIRouter, FastAPI
from starlette.types import ASGIApp

from common.api import admin_routes, image_routes, text_routes
from common.api.app import Runtime, create_app
from common.api.middleware import is_loopback
from common.config import ServiceSettings, SettingsT, load_settings
from common.contract import EmbeddingModel
from common.http_protocol import ConnectionLimits, protocol_class
from common.loading import (
    ModelNotFound,
    has_random_weights,
    hide_the_default_siglip_text_config_warning,
    resolve_model_source,
)

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A long-lived box must not fill its disk: at most 6 files of 20 MB (the live one and 5 rotated ones).
LOG_FILE_BYTES = 20 * 1024 * 1024
LOG_FILE_BACKUPS = 5
# Signals that stop the service gracefully. SIGHUP too: the terminal of a service started by hand closing must not
# kill the requests in flight.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# After the drain (shutdown_timeout_s), the time the requests failed with 503 and the batch on the model get to
# finish before uvicorn cancels what is left.
SHUTDOWN_GRACE_S = 5.0
# File descriptors the process needs besides its connections: model files, logs, threads' pipes, the listener.
RESERVED_FDS = 256


@dataclass(frozen=True)
class ServiceDefinition(Generic[SettingsT]):
    """Everything that differs between the services' ``main``s."""

    title: str
    # Its settings class also says which inputs the service embeds (``modalities``), hence which routes it has.
    settings_cls: type[SettingsT]
    # Resolve, load and warm up the model; runs in a thread at start-up.
    load: Callable[[SettingsT], EmbeddingModel]
    # How to download the model, for the one-paragraph "not found" message.
    download_help: str
    # Which files of a hub repository the model needs (None: all of them).
    select_files: Callable[[list[str]], list[str] | None] | None = None
    # The embedding-space version these settings give (it changes with any option that changes the numbers).
    version_of: Callable[[SettingsT], str] | None = None
    # Routes of this service beyond the text (and image) ones, e.g. the text service's /embed/tokens.
    extra_routers: tuple[APIRouter, ...] = ()

    def expected_identity(self, settings: SettingsT) -> dict[str, object]:
        """What a service started with these settings will report in /info: the launcher compares a running
        service with it, so that a service of another model, recipe or tiny-ness is never silently kept."""
        return {
            "model_path": settings.model,
            "version": self.version_of(settings) if self.version_of else None,
            "tiny": has_random_weights(settings.model),
        }

    def routers(self) -> Sequence[APIRouter]:
        takes_images = "image" in self.settings_cls.modalities
        return [
            text_routes.router,
            *([image_routes.router] if takes_images else []),
            *self.extra_routers,
            admin_routes.router,
        ]

    def build_app(self, settings: SettingsT, load: Callable[[], EmbeddingModel] | None = None) -> FastAPI:
        """The FastAPI app; ``load`` replaces model loading in tests (a tiny real model, wrapped or not)."""
        return create_app(
            title=self.title,
            settings=settings,
            load=load or (lambda: self.load(settings)),
            routers=self.routers(),
        )

    def download_model(self, settings: SettingsT) -> None:
        """A hub id that is not in the local cache is downloaded (only the files the model needs) before loading;
        ``ModelNotFound`` with the download help when that cannot be done."""
        resolve_model_source(
            settings.model, download_help=self.download_help, download=True, select_files=self.select_files
        )

    def main(self, argv: list[str] | None = None) -> int:
        """Flags and environment -> a serving process; returns the exit code."""
        settings = load_settings(self.settings_cls, argv)
        configure_logging(settings.log_level, settings.log_file)
        try:
            self.download_model(settings)
        except ModelNotFound as exc:
            logger.error("%s", exc)
            return 1
        return serve(self.build_app(settings), settings)


class RotatingLogFile(logging.handlers.RotatingFileHandler):
    """``RotatingFileHandler`` that formats each record once: the standard one formats every record a second time,
    and stats the file twice, only to see whether it still fits (the access log writes a line per request). Rolled
    over before a line that would take it to ``maxBytes``, as the standard one; a file that is not a regular one
    (``/dev/stderr``) never is."""

    def __init__(self, filename: str, max_bytes: int, backups: int) -> None:
        super().__init__(filename, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self.regular_file = os.path.isfile(self.baseFilename)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
            if self.stream is None:  # closed (by close(), or a rollover that could not reopen it)
                self.stream = self._open()
            if self.regular_file and self.maxBytes > 0:
                self.stream.seek(0, os.SEEK_END)  # another process may have written to it too
                if self.stream.tell() + len(line) >= self.maxBytes:
                    self.doRollover()
            self.stream.write(line)
            self.stream.flush()
        except RecursionError:  # as logging's own handlers: reporting it would recurse too
            raise
        except Exception:  # noqa: BLE001  (logging.Handler.emit's contract: report through handleError)
            self.handleError(record)


def configure_logging(level: str, log_file: str | None = None) -> None:
    """Timestamps, level, logger name; to stderr, or to a size-capped rotating file. Called once, by main."""
    handler: logging.Handler
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = RotatingLogFile(log_file, LOG_FILE_BYTES, LOG_FILE_BACKUPS)
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # The format uses no record's thread, process or caller: not collecting them saves a walk up the stack and a few
    # lookups for every line (the access log writes one per request); the logging HOWTO's "Optimization".
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    # uvicorn's own access log would duplicate ours (ours has the request id and item count).
    logging.getLogger("uvicorn.access").disabled = True
    for noisy in ("httpx", "urllib3", "PIL", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # huggingface_hub prints to a stderr handler of its own and also propagates to ours: each download retry would
    # show twice (and bypass the rotated log file).
    import huggingface_hub.utils.logging  # noqa: F401 - creates that handler, so that it can be removed here

    logging.getLogger("huggingface_hub").handlers.clear()
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars would fill the log files
    hide_the_default_siglip_text_config_warning()
    if log_file:
        # transformers logs to its own stderr handler; send its warnings to the (rotated) log file instead.
        transformers_logging.disable_default_handler()
        transformers_logging.enable_propagation()


class EmbedServer(uvicorn.Server):
    """uvicorn's server, with the service's shutdown: every stop signal drains (uvicorn knows only SIGINT and
    SIGTERM, and re-raises them once done, which would kill the process with status -15), and the requests still
    queued when the drain time is over are failed with 503 ``not_ready`` and Retry-After, an answer a client can
    act on, instead of being cancelled into uvicorn's plain-text 500 with a traceback each. Without a ``runtime``
    (a server that holds no model: the Ray Serve front door) the drain ends as uvicorn's does."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime | None, drain_s: float) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.drain_s = drain_s

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach the main thread only (a server run in a thread is stopped with should_exit)
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.call_later(self.drain_s, self._end_drain)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()

    def _end_drain(self) -> None:
        if self.runtime is None:
            return
        logger.warning("shutdown: drain time (%g s) is over; refusing the requests still queued with 503", self.drain_s)
        self.runtime.refuse_queued_work("the service is shutting down")


def connection_limit(wanted: int) -> int:
    """``wanted`` connections if the process may open enough files, raising its soft limit up to the hard one if
    need be; otherwise as many as fit, with a warning (past the limit, accept() fails and nothing is logged)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + RESERVED_FDS
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        if raised > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
                soft = raised
            except (ValueError, OSError):
                pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        fitting = max(1, soft - RESERVED_FDS)
        logger.warning(
            "the process may open only %d files: serving at most %d connections instead of max_connections=%d "
            "(raise 'ulimit -n')",
            soft,
            fitting,
            wanted,
        )
        return fitting
    return wanted


def build_server(app: FastAPI, settings: ServiceSettings) -> EmbedServer:
    """The uvicorn server for ``app``, with the limits of ``settings``; ``run()`` serves until stopped."""
    return limited_server(app, settings, app.state.runtime)


def limited_server(app: ASGIApp, settings: ServiceSettings, runtime: Runtime | None) -> EmbedServer:
    """A uvicorn server on ``settings.host``/``port`` with the connection limits of ``settings`` (header size and
    time, open connections) and the service's shutdown; ``runtime`` is the model's, if the server holds one."""
    limits = ConnectionLimits(
        max_connections=connection_limit(settings.max_connections),
        max_header_bytes=settings.max_header_bytes,
        header_timeout_s=settings.header_timeout_s,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol_class(limits),
        log_config=None,  # keep the logging configured in main
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s + SHUTDOWN_GRACE_S),
        access_log=False,
    )
    return EmbedServer(config, runtime, settings.shutdown_timeout_s)


def warn_if_keyless(host: str, keyless: bool) -> None:
    """The warning for a server others can reach (the services and the Ray front door) that has no API key."""
    if keyless and not is_loopback(host):
        logger.warning(
            "listening on %s without an API key: anyone who can reach this port can use it (set EMBED_API_KEY)", host
        )


def warn_about_keys(settings: ServiceSettings) -> None:
    """Say at start who may use the service and who may take its model away (sleep, hold)."""
    warn_if_keyless(settings.host, keyless=settings.api_key is None)
    if settings.admin_key is not None:
        return
    if settings.api_key is not None:
        logger.warning(
            "EMBED_API_KEY also lets every embedding client put the model to sleep and hold it there (POST "
            "/admin/sleep): set EMBED_ADMIN_KEY to keep that to the program that borrows the GPU"
        )
    else:
        logger.info(
            "no key: any process that can reach this port may put the model to sleep and hold it there (POST "
            "/admin/sleep); EMBED_ADMIN_KEY keeps that to the program that borrows the GPU"
        )


def serve(app: FastAPI, settings: ServiceSettings) -> int:
    """Serve until SIGINT/SIGTERM/SIGHUP (uvicorn drains in-flight requests first). Returns the process exit code."""
    warn_about_keys(settings)
    server = build_server(app, settings)
    runtime: Runtime = app.state.runtime

    def stop_server() -> None:
        server.should_exit = True

    runtime.on_load_failure = stop_server
    server.run()
    return 1 if runtime.status == "unhealthy" or not server.started else 0
