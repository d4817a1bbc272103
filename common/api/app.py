"""The app factory both services use: the lifespan (load the model in a thread, then serve), ``/health``,
``/info``, ``/metrics``, the error envelope, request ids, the access log, the body limits and the guard (Host,
Origin, optional API key).

A service passes a ``load`` callable (runs in a thread, returns an ``EmbeddingModel``) and the routers of the
inputs it embeds. Routes reach the loaded model through the ``Model`` dependency, which answers 503 while the model
is still loading.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Literal, TypedDict, cast

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from fastapi.telemetry import TelemetryConfig
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from starlette.middleware import Middleware

from common.api.middleware import AccessLog, RequestBody, RequestGuard
from common.api.schemas import ERROR_RESPONSES, FastJSONResponse
from common.config import Modality, ServiceSettings
from common.contract import EmbeddingModel, ImageModel, ModelInfo
from common.errors import NotReady, UnsupportedInput, install_error_handlers
from common.loading import WrongModel
from common.memory import keep_out_of_collections
from common.metrics import Metrics
from common.residency import SleepInfo
from common.residency import State as ResidencyState

logger = logging.getLogger(__name__)

SERVICE_VERSION = "0.1.0"

Status = Literal["loading", "ok", "unhealthy"]


class FormLimits(TypedDict, total=False):
    """The limits Starlette's multipart parser takes (``Request.form(**limits)``, ``include_router(form_limits=)``)."""

    max_files: int
    max_fields: int
    max_part_size: int


class Runtime:
    """The app's mutable state: loading -> ok (or unhealthy), and the loaded model."""

    def __init__(self, settings: ServiceSettings, load: Callable[[], EmbeddingModel]) -> None:
        self.settings = settings
        self._load = load
        self.metrics = Metrics()
        self._loaded: Status = "loading"
        self.model: EmbeddingModel | None = None
        self.load_seconds: float | None = None
        # Called when loading fails; the server uses it to stop with a non-zero exit.
        self.on_load_failure: Callable[[], None] | None = None

    @property
    def status(self) -> Status:
        if self._loaded == "ok" and self.model is not None and not self.model.runtime.healthy:
            return "unhealthy"  # the device keeps failing
        return self._loaded

    def refuse_queued_work(self, reason: str) -> None:
        """Every item still waiting for the model, and every later one, fails with 503 ``not_ready`` (at the end of
        a shutdown's drain: an answer the client can retry elsewhere, not a connection cut off mid-request)."""
        if self.model is not None:
            for batcher in self.model.runtime.batchers:
                batcher.close(reason)

    async def load(self) -> None:
        # A lifespan can run more than once per app (test harnesses do): start from scratch each time.
        self._loaded, self.model = "loading", None
        started = time.perf_counter()
        try:
            model = await asyncio.to_thread(self._load)
            # Before the runtime starts, whose idle timer runs from then.
            keep_out_of_collections()
            for batcher in model.runtime.batchers:
                batcher.observer = self.metrics.observe_batch
                self.metrics.watch_queue(batcher.name, lambda b=batcher: b.queue_depth)  # type: ignore[misc]
            self.metrics.watch_residency(model.runtime.residency)
            await model.runtime.start()
        except WrongModel as exc:
            logger.error("loading the model failed: %s", exc)  # a clear message; a traceback adds nothing
            self._fail()
            return
        except Exception as exc:
            logger.exception("loading the model failed: %s", exc)
            self._fail()
            return
        self.load_seconds = time.perf_counter() - started
        self.metrics.load_seconds.set(self.load_seconds)
        self.metrics.watch_gpu_memory()
        self.model = model
        self._loaded = "ok"
        logger.info(
            "ready: model %s (dimension %d) on %s, loaded in %.1f s",
            model.model_name,
            model.dimension,
            model.device,
            self.load_seconds,
        )
        if model.tiny:
            logger.warning(
                "%s has TINY RANDOM WEIGHTS: its vectors are meaningless, only good for trying the API",
                model.model_name,
            )

    def _fail(self) -> None:
        self._loaded = "unhealthy"
        if self.on_load_failure is not None:
            self.on_load_failure()


# -- dependencies -----------------------------------------------------------------------------------------------


# The dependencies are coroutines although they never wait: FastAPI runs a plain function dependency in its thread
# pool, a hand-off to another thread and back for every request.


def the_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def runtime_of(request: Request) -> Runtime:
    return the_runtime(request)


async def ready_model(request: Request) -> EmbeddingModel:
    """The loaded model, or 503 while loading."""
    runtime = the_runtime(request)
    if runtime.model is None or runtime.status != "ok":
        raise NotReady(f"model is {runtime.status}; retry when GET /health answers 200", headers={"Retry-After": "5"})
    return runtime.model


Model = Annotated[EmbeddingModel, Depends(ready_model)]


async def ready_image_model(request: Request) -> ImageModel:
    """The loaded model, which reads images (the image routes are mounted only on such services)."""
    model = await ready_model(request)
    if "image" not in model.modalities:
        raise UnsupportedInput(f"this service ({model.model_name}) embeds text only; send images to an image service")
    return cast(ImageModel, model)


ImageModelOf = Annotated[ImageModel, Depends(ready_image_model)]


def form_limits(settings: ServiceSettings) -> FormLimits:
    """Multipart parsing stops at the first file or field past the item limit (413), before reading the rest."""
    return {
        "max_files": settings.max_items_per_request + 1,
        "max_fields": settings.max_items_per_request + 16,
        "max_part_size": settings.max_body_bytes,
    }


# -- /health, /info, /metrics -----------------------------------------------------------------------------------


class BatchingInfo(BaseModel):
    max_batch_size: int
    max_batch_wait_ms: float


class ServiceState(BaseModel):
    """What /info reports in any state."""

    status: Status
    service_version: str
    batching: BatchingInfo
    limits: dict[str, int | float]


class ServiceInfo(ModelInfo, ServiceState):
    """/info once the model is loaded: the service's state and what the model says about itself."""

    load_seconds: float
    sleep: SleepInfo


class Health(BaseModel):
    """/health (200) once the model serves."""

    status: Literal["ok"]
    model: str
    version: str
    dimension: int = Field(description="length of every vector")
    dimensions: int = Field(description="the same as dimension, under the name clients of the Quadux SigLIP API read")
    device: str
    modalities: list[Modality]
    tiny: bool = Field(description="true for the tiny random-weight test models: their vectors are meaningless")
    fingerprint: str = Field(description="of the model's weights: the same weights in any folder have the same one")
    state: ResidencyState = Field(description="where the weights are: awake, asleep, waking or held (200 in all four)")
    instance: str | None = Field(None, description="the instance_id the launcher gave this process, if any")


class HealthState(BaseModel):
    """/health (503) while the model loads, or once it failed to load or its device keeps failing."""

    status: Status


def limits_of(settings: ServiceSettings) -> dict[str, int | float]:
    """Every max_* setting but the batching ones, and the timeouts."""
    limits = {name: value for name, value in settings.model_dump().items() if name.startswith("max_")}
    for name in ("request_timeout_s", "body_timeout_s", "header_timeout_s"):
        limits[name] = getattr(settings, name)
    return {name: value for name, value in limits.items() if "batch" not in name}


service_router = APIRouter(tags=["service"])


# Uptime checkers probe with HEAD: each GET route of the service also answers HEAD (the same headers, no body).
@service_router.get("/health", response_model=Health, responses={503: {"model": HealthState}})
@service_router.head("/health", include_in_schema=False)
async def health(runtime: Annotated[Runtime, Depends(runtime_of)]) -> JSONResponse:
    """200 only when a request would be served (a sleeping model is woken by it, so 200 while it sleeps too, with
    its ``state``: a supervisor must not restart a sleeping service); 503 "loading" or "unhealthy" otherwise. Never
    needs a key."""
    model = runtime.model
    if runtime.status != "ok" or model is None:
        return JSONResponse({"status": runtime.status}, status_code=503, headers={"Retry-After": "5"})
    body = Health(
        status="ok",
        model=model.model_name,
        version=model.version,
        dimension=model.dimension,
        dimensions=model.dimension,
        device=model.device,
        modalities=list(model.modalities),
        tiny=model.tiny,
        fingerprint=model.fingerprint,
        state=model.runtime.residency.state,
        instance=runtime.settings.instance_id,
    )
    return JSONResponse(body.model_dump(exclude_none=True))


@service_router.get("/metrics", response_class=PlainTextResponse)
@service_router.head("/metrics", include_in_schema=False)
async def metrics(runtime: Annotated[Runtime, Depends(runtime_of)]) -> Response:
    """Prometheus text: requests, errors, latency, batch sizes, queue depth and wait, load time, GPU memory."""
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@service_router.get("/info", response_model=ServiceInfo | ServiceState, responses={401: {}})
@service_router.head("/info", include_in_schema=False)
async def info(runtime: Annotated[Runtime, Depends(runtime_of)]) -> ServiceInfo | ServiceState:
    """Model, dimension, which inputs it embeds, device, dtype, batching and limits, the recipe, versions."""
    settings = runtime.settings
    state = ServiceState(
        status=runtime.status,
        service_version=SERVICE_VERSION,
        batching=BatchingInfo(max_batch_size=settings.max_batch_size, max_batch_wait_ms=settings.max_batch_wait_ms),
        limits=limits_of(settings),
    )
    if runtime.model is None:
        return state
    return ServiceInfo(
        **state.model_dump(),
        **runtime.model.info().model_dump(),
        load_seconds=round(runtime.load_seconds or 0.0, 3),
        sleep=runtime.model.runtime.residency.info(),
    )


# -- the factory ------------------------------------------------------------------------------------------------

# FastAPI's OpenTelemetry hooks off: the services' metrics are Prometheus's (/metrics) and their request log is the
# access log; on, FastAPI looks up the global tracer, meter and logger providers on every request.
NO_OPENTELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}

# Paths that hold no inputs or vectors and never need a key (the OpenAPI pages, not routes of ours, show the API, not
# data).
UNPROTECTED_PATHS = frozenset({"/health", "/metrics"})
# The routes that take the model from the embedding clients (sleep, wake): the admin key's, when one is set.
ADMIN_PREFIX = "/admin/"


def service_routers(routers: Sequence[APIRouter]) -> list[APIRouter]:
    """Every router of a service's app: /health, /info, /metrics, then the service's own."""
    return [service_router, *routers]


def route_paths(routers: Sequence[APIRouter]) -> frozenset[str]:
    """The paths of the routes in ``routers`` (none has path parameters)."""
    return frozenset(route.path for router in routers for route in router.routes if isinstance(route, APIRoute))


def body_paths(routers: Sequence[APIRouter]) -> frozenset[str]:
    """The paths of the routes that read a request body (every POST route)."""
    return frozenset(
        route.path
        for router in routers
        for route in router.routes
        if isinstance(route, APIRoute) and "POST" in (route.methods or ())
    )


def request_checks(settings: ServiceSettings, protected_paths: Collection[str]) -> list[Middleware]:
    """The checks a request passes before it reaches a route, outermost first: CORS (when origins are set), the body
    limits (size, read time), then the guard (Host, Origin, API key on ``protected_paths``, from the headers alone).
    The standalone app and the Ray Serve front door (cluster/front/) both run exactly these, from the same
    settings, so a deployment under Serve holds the standalone service's bounds by construction."""
    checks = []
    if settings.cors_origins:
        # Outside the guard: a preflight is answered here, and a 401 or 403 carries the CORS headers a page needs
        # to read it.
        checks.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                expose_headers=["X-Request-ID"],
            )
        )
    checks.append(Middleware(RequestBody, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s))
    checks.append(
        Middleware(
            RequestGuard,
            api_key=settings.api_key,
            protected_paths=protected_paths,
            allowed_hosts=settings.allowed_hosts,
            cors_origins=settings.cors_origins,
            admin_key=settings.admin_key,
            admin_paths=[path for path in protected_paths if path.startswith(ADMIN_PREFIX)],
        )
    )
    return checks


def create_app(
    *, title: str, settings: ServiceSettings, load: Callable[[], EmbeddingModel], routers: Sequence[APIRouter]
) -> FastAPI:
    runtime = Runtime(settings, load)

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
            if runtime.model is not None:
                await runtime.model.runtime.stop()

    app = FastAPI(
        title=title,
        version=SERVICE_VERSION,
        lifespan=lifespan,
        default_response_class=FastJSONResponse,
        telemetry=NO_OPENTELEMETRY,
    )
    app.state.runtime = runtime
    install_error_handlers(app)
    paths = route_paths(service_routers(routers))
    # Added innermost first: AccessLog > CORS > RequestBody > RequestGuard > the routes.
    for check in reversed(request_checks(settings, paths - UNPROTECTED_PATHS)):
        app.add_middleware(check.cls, *check.args, **check.kwargs)
    # Outermost: sees every response, 413s and 500s included.
    app.add_middleware(AccessLog, metrics=runtime.metrics, route_paths=paths)
    runtime.metrics.ready.set_function(lambda: 1.0 if runtime.status == "ok" else 0.0)

    app.include_router(service_router)
    limits = form_limits(settings)
    for router in routers:
        app.include_router(router, responses=ERROR_RESPONSES, form_limits=limits)
    return app
