"""What turns a model into a running service: ``ServiceDefinition`` (one per model file) builds the app and runs
``main``: settings, logging, the model on disk (downloaded if it is a hub id), then uvicorn with graceful shutdown
and a non-zero exit when the model fails to load."""

from __future__ import annotations

import ipaddress
import logging
import logging.handlers
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Generic

import uvicorn
from fastapi import APIRouter, FastAPI

from common.api import image_routes, text_routes
from common.api.app import Runtime, create_app
from common.config import ServiceSettings, SettingsT, load_settings
from common.contract import EmbeddingModel
from common.loading import ModelNotFound, has_random_weights, resolve_model_source

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A long-lived box must not fill its disk: at most 6 files of 20 MB (the live one and 5 rotated ones).
LOG_FILE_BYTES = 20 * 1024 * 1024
LOG_FILE_BACKUPS = 5


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
        return [text_routes.router, *([image_routes.router] if takes_images else [])]

    def build_app(self, settings: SettingsT, load: Callable[[], EmbeddingModel] | None = None) -> FastAPI:
        """The FastAPI app; ``load`` replaces model loading in tests (a tiny real model, wrapped or not)."""
        return create_app(
            title=self.title,
            settings=settings,
            load=load or (lambda: self.load(settings)),
            routers=self.routers(),
        )

    def main(self, argv: list[str] | None = None) -> int:
        """Flags and environment -> a serving process; returns the exit code."""
        settings = load_settings(self.settings_cls, argv)
        configure_logging(settings.log_level, settings.log_file)
        try:
            resolve_model_source(
                settings.model, download_help=self.download_help, download=True, select_files=self.select_files
            )
        except ModelNotFound as exc:
            logger.error("%s", exc)
            return 1
        return serve(self.build_app(settings), settings)


def configure_logging(level: str, log_file: str | None = None) -> None:
    """Timestamps, level, logger name; to stderr, or to a size-capped rotating file. Called once, by main."""
    handler: logging.Handler
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=LOG_FILE_BYTES, backupCount=LOG_FILE_BACKUPS, encoding="utf-8"
        )
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
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
    if log_file:
        # transformers logs to its own stderr handler; send its warnings to the (rotated) log file instead.
        transformers_logging.disable_default_handler()
        transformers_logging.enable_propagation()


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
