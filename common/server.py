"""Run an app under uvicorn: host warning, graceful shutdown, non-zero exit when the model fails to load."""

from __future__ import annotations

import ipaddress
import logging

import uvicorn
from fastapi import FastAPI

from common.app import Runtime
from common.config import ServiceSettings

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    server.run()
    return 1 if runtime.status == "unhealthy" or not server.started else 0
