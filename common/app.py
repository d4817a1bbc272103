"""The app factory both services use: lifespan (load the model in a thread, then serve), health, info, errors,
request ids, per-request log lines and the optional API key.

A service plugs in a ``load_service`` callable (runs in a thread, returns an object with the ``EmbeddingService``
shape) and an ``APIRouter`` with its routes. Routes reach the loaded service through ``ready_service(request)``,
which answers 503 while the model is still loading.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal, Protocol

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from common.access_log import AccessLog
from common.batching import MicroBatcher
from common.body_limit import BodySizeLimit
from common.config import ServiceSettings
from common.errors import NotReady, Unauthorized, install_error_handlers
from common.metrics import Metrics
from common.responses import FastJSONResponse

logger = logging.getLogger(__name__)

SERVICE_VERSION = "0.1.0"


class EmbeddingService(Protocol):
    """What the factory needs from a loaded service."""

    model_name: str
    dimension: int
    version: str
    device: str
    healthy: bool
    batchers: list[MicroBatcher[Any, Any]]

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def info(self) -> dict[str, Any]: ...


class Runtime:
    """The app's mutable state: loading -> ok (or unhealthy), and the loaded service."""

    def __init__(self, settings: ServiceSettings, load_service: Callable[[], EmbeddingService]) -> None:
        self.settings = settings
        self._load_service = load_service
        self.metrics = Metrics()
        self._loaded: Literal["loading", "ok", "unhealthy"] = "loading"
        self.service: EmbeddingService | None = None
        self.load_seconds: float | None = None
        # Called when loading fails; main() uses it to stop the server with a non-zero exit.
        self.on_load_failure: Callable[[], None] | None = None

    @property
    def status(self) -> Literal["loading", "ok", "unhealthy"]:
        if self._loaded == "ok" and self.service is not None and not self.service.healthy:
            return "unhealthy"  # the device keeps failing
        return self._loaded

    async def load(self) -> None:
        # A lifespan can run more than once per app (test harnesses do): start from scratch each time.
        self._loaded, self.service = "loading", None
        started = time.perf_counter()
        try:
            service = await asyncio.to_thread(self._load_service)
            for batcher in service.batchers:
                batcher.observer = self.metrics.observe_batch
                self.metrics.watch_queue(batcher.name, lambda b=batcher: b.queue_depth)  # type: ignore[misc]
            await service.start()
        except Exception:
            logger.exception("loading the model failed")
            self._loaded = "unhealthy"
            if self.on_load_failure is not None:
                self.on_load_failure()
            return
        self.load_seconds = time.perf_counter() - started
        self.metrics.load_seconds.set(self.load_seconds)
        self.metrics.watch_gpu_memory()
        self.service = service
        self._loaded = "ok"
        logger.info(
            "ready: model %s (dimension %d) on %s, loaded in %.1f s",
            service.model_name,
            service.dimension,
            service.device,
            self.load_seconds,
        )


def ready_service(request: Request) -> Any:
    """The loaded service, or 503 while loading. Typed ``Any`` so each service's routes can annotate their own class."""
    runtime: Runtime = request.app.state.runtime
    if runtime.service is None or runtime.status != "ok":
        raise NotReady(f"model is {runtime.status}; retry when GET /health answers 200", headers={"Retry-After": "5"})
    return runtime.service


def require_api_key(request: Request) -> None:
    """Bearer token check when EMBED_API_KEY is set; constant-time compare."""
    expected = request.app.state.runtime.settings.api_key
    if expected is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    # An empty token never passes, not even against an empty key (EMBED_API_KEY= set but blank).
    if (
        scheme.lower() != "bearer"
        or not token
        or not hmac.compare_digest(token.encode(), expected.get_secret_value().encode())
    ):
        raise Unauthorized(
            "missing or wrong API key: send 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"}
        )


def create_app(
    *,
    title: str,
    settings: ServiceSettings,
    load_service: Callable[[], EmbeddingService],
    router: APIRouter,
) -> FastAPI:
    runtime = Runtime(settings, load_service)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Serve /health ("loading") at once; the model loads in the background.
        loading = asyncio.create_task(runtime.load(), name="load-model")
        try:
            yield
        finally:
            if not loading.done():
                loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            if runtime.service is not None:
                await runtime.service.stop()

    app = FastAPI(title=title, version=SERVICE_VERSION, lifespan=lifespan, default_response_class=FastJSONResponse)
    app.state.runtime = runtime
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
        )
    metrics = runtime.metrics
    app.add_middleware(AccessLog, metrics=metrics)  # outermost: sees every response, 413s included
    metrics.ready.set_function(lambda: 1.0 if runtime.status == "ok" else 0.0)

    @app.get("/health", tags=["service"])
    async def health() -> JSONResponse:
        """200 only when a request would be served; 503 "loading" or "unhealthy" otherwise. Never needs a key."""
        service = runtime.service
        if runtime.status != "ok" or service is None:
            return JSONResponse({"status": runtime.status}, status_code=503, headers={"Retry-After": "5"})
        return JSONResponse(
            {
                "status": "ok",
                "model": service.model_name,
                "version": service.version,
                "dimension": service.dimension,
                "device": service.device,
            }
        )

    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse)
    async def metrics_route() -> Response:
        """Prometheus text: requests, errors, latency, batch sizes, queue depth and wait, load time, GPU memory."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/info", tags=["service"], dependencies=[Depends(require_api_key)])
    async def info() -> dict[str, Any]:
        """Model, dimension, device, dtype, batching and limits, the embedding recipe, versions."""
        body: dict[str, Any] = {"status": runtime.status, "service_version": SERVICE_VERSION}
        if runtime.service is not None:
            body.update(runtime.service.info())
            body["load_seconds"] = round(runtime.load_seconds or 0.0, 3)
        body["batching"] = {
            "max_batch_size": settings.max_batch_size,
            "max_batch_wait_ms": settings.max_batch_wait_ms,
        }
        body["limits"] = limits_of(settings)
        return body

    # Multipart parsing stops at the first file or field past the item limit (413), before reading the rest.
    form_limits = {
        "max_files": settings.max_items_per_request + 1,
        "max_fields": settings.max_items_per_request + 16,
        "max_part_size": settings.max_body_bytes,
    }
    app.include_router(router, dependencies=[Depends(require_api_key)], form_limits=form_limits)  # type: ignore[arg-type]
    return app


def limits_of(settings: ServiceSettings) -> dict[str, Any]:
    """Every max_* setting, as /info reports them."""
    limits = {name: value for name, value in settings.model_dump().items() if name.startswith("max_")}
    limits["request_timeout_s"] = settings.request_timeout_s
    return {name: value for name, value in limits.items() if "batch" not in name}
