"""Run an app under uvicorn: host warning, graceful shutdown, non-zero exit when the model fails to load."""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from common.app import Runtime
from common.config import ServiceSettings, SettingsT, load_settings
from common.logs import configure_logging
from common.model_source import ModelNotFound, resolve_model_source

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextmanager
def _exit_normally_after_a_signal() -> Iterator[None]:
    """uvicorn re-raises SIGTERM/SIGINT once its graceful shutdown is done, which with the default handlers kills
    the process (exit status -15). The requests are drained by then: ignore the repeat and return our exit code."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(app: FastAPI, settings: ServiceSettings) -> int:
    """Serve until SIGINT/SIGTERM (uvicorn drains in-flight requests first). Returns the process exit code."""
    if not is_loopback(settings.host) and settings.api_key is None:
        logger.warning(
            "listening on %s without an API key: anyone who can reach this port can use it (set EMBED_API_KEY)",
            settings.host,
        )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the logging configured in main
        timeout_graceful_shutdown=30,
        access_log=False,
    )
    server = uvicorn.Server(config)
    runtime: Runtime = app.state.runtime

    def stop_server() -> None:
        server.should_exit = True

    runtime.on_load_failure = stop_server
    with _exit_normally_after_a_signal():
        server.run()
    return 1 if runtime.status == "unhealthy" or not server.started else 0


def run_service(
    settings_cls: type[SettingsT],
    build_app: Callable[[SettingsT], FastAPI],
    *,
    download_help: str,
    select_files: Callable[[list[str]], list[str] | None] | None = None,
    argv: list[str] | None = None,
) -> int:
    """A service's main(): settings, logging, the model on disk (downloaded if it is a hub id), then serve."""
    settings = load_settings(settings_cls, argv)
    configure_logging(settings.log_level, settings.log_file)
    try:
        resolve_model_source(settings.model, download_help=download_help, download=True, select_files=select_files)
    except ModelNotFound as exc:
        logger.error("%s", exc)
        return 1
    return serve(build_app(settings), settings)
