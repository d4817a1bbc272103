"""Both services as Ray Serve applications, built from the same ``ServiceDefinition`` as the standalone processes.

    serve run cluster/serve_config.yaml                 # both, one HTTP port: /siglip2/... and /qwen3/...
    serve run cluster.serve:siglip2_app model=/models/siglip2 max_batch_size=64 --route-prefix /siglip2

Each replica is a Ray actor that builds the service's own FastAPI app (``SERVICE.build_app(settings)``) and serves
it as its ASGI ingress: the same routes, error envelope, request ids, API key, body limit, ``/metrics`` and
micro-batcher as ``siglip2_embed.py`` / ``qwen3_embed.py``, and one model per replica, loaded by the app's lifespan.
Serve's proxy passes the route prefix as the ASGI ``root_path``, so the app matches the paths it always matches.

Readiness. Serve counts a replica as running, and starts routing requests to it, once its ASGI lifespan start-up
has finished and a first ``check_health`` has passed. The app's own lifespan returns at once and loads the model in
the background (so that a standalone server can answer ``/health`` 503 meanwhile); here the start-up also waits
until the model is loaded or has failed, so a replica whose model is still loading never gets a request, and one
whose model failed fails that first check with the load error: it fails to start, with that error in ``serve
status`` (an error of the start-up itself shows there only as "ASGI lifespan startup failed"), and Serve starts
another. A model that cannot load for good (no such model, another kind, broken or unreadable weights) fails it as a
``PermanentFailure`` (cluster/permanent.py), at which the front door stops. ``check_health`` also fails once the
model turns unhealthy (a broken device), and Serve replaces the replica. So whichever replica answers a request, its
model is loaded, and ``GET /health`` is that replica's own answer: a node whose requests are served stays in a load
balancer's rotation while one replica of several is lost or replaced. While no replica of an application is
running, Serve's proxy holds requests (``/health`` included) until one is; the front door (cluster/front/) answers
503 then.

The builders' ``args`` are the services' settings, under the names of their flags (``max_batch_size`` or
``max-batch-size``); what they leave out comes from the same environment variables as the standalone services
(``SIGLIP2_MODEL``, ``EMBED_API_KEY``, ...), read where the application is built. Replica counts and resources are
Serve's deployment options: the ``deployments:`` section of a config file, or ``application(..., **options)``.

Sleeping. ``idle_sleep_s`` works in each replica as in a standalone service (the replica's model sleeps when idle
and the next request routed to it wakes it). ``POST /admin/sleep`` and ``/admin/wake`` are refused (501): behind
Serve's router they would reach one replica of several, chosen by the router. Scaling to zero is Serve's way to
free the GPU: ``autoscaling_config: {min_replicas: 0, ...}``, which ends the replicas' processes, CUDA context
included.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.deployment import Deployment
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cluster.permanent import PERMANENT_LOAD_ERRORS, PermanentFailure
from common.api.app import Runtime
from common.api.middleware import ReleaseMemoryAfterLargeBodies
from common.config import ServiceSettings
from common.contract import EmbeddingModel
from common.errors import EmbedError
from common.server import ServiceDefinition, configure_logging
from common.services import SERVICES

logger = logging.getLogger(__name__)

# Settings Serve decides instead: the proxy's http_options set the address, and Ray keeps each replica's log.
NOT_USED_UNDER_SERVE = {
    "host": "the HTTP address is Serve's (http_options.host in the config, or serve start --http-host)",
    "port": "the HTTP port is Serve's (http_options.port in the config, or serve start --http-port)",
    "log_file": "each replica logs to Ray's log folder (/tmp/ray/session_latest/logs/serve/ and worker-*.err)",
}

# The routes that sleep and wake one process's model on demand (refused here: see the module docstring).
ADMIN_PATHS = ("/admin/sleep", "/admin/wake")

# How often a starting replica looks at whether its model has loaded.
READY_POLL_S = 0.05

# Deployment options that differ from Serve's defaults, each overridable from the config file.
DEPLOYMENT_DEFAULTS: dict[str, Any] = {
    # Serve's default (5 requests in a replica at once) would cap every forward pass at 5 requests: the
    # micro-batcher needs many requests in flight to fill a batch; the service's own queue limit answers 429.
    "max_ongoing_requests": 128,
    # The standalone service drains requests in flight for up to 30 s on SIGTERM; a replica does the same.
    "graceful_shutdown_timeout_s": 30.0,
    # The app logs one line per request already, with its request id and item count (as uvicorn's is off).
    "logging_config": {"enable_access_log": False},
}


def service_definition(name: str) -> ServiceDefinition[Any]:
    if name not in SERVICES:
        raise ValueError(f"unknown service {name!r}; the services are {', '.join(SERVICES)}")
    # imported here: only the replicas need the model code
    definition: ServiceDefinition[Any] = importlib.import_module(SERVICES[name].module).SERVICE
    return definition


def settings_from_args(name: str, args: Mapping[str, Any]) -> ServiceSettings:
    """The builder's ``args`` (flag names, ``-`` or ``_``) over the environment, validated now: a typo or a bad
    value fails ``serve run`` / ``serve deploy`` with a message instead of every replica."""
    settings_cls = service_definition(name).settings_cls
    values: dict[str, Any] = {}
    for key, value in args.items():
        field = key.removeprefix("--").replace("-", "_")
        if field in NOT_USED_UNDER_SERVE:
            raise ValueError(f"{name}: {key!r} is not used under Ray Serve: {NOT_USED_UNDER_SERVE[field]}")
        if field not in settings_cls.model_fields:
            raise ValueError(
                f"{name}: unknown setting {key!r}; the settings are the flags of "
                f"'python {SERVICES[name].module}.py --help'"
            )
        values[field] = value
    try:
        settings: ServiceSettings = settings_cls(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ValueError(f"{name}: invalid setting: {problems}") from None
    return settings


class AdminRouteUnderServe(EmbedError, status=501, type="invalid_request_error", code="not_supported_under_serve"):
    """Sleep and wake on demand, asked of a deployment behind Serve's router."""


def refuse_admin_routes(app: FastAPI) -> None:
    """Answer ``/admin/sleep`` and ``/admin/wake`` with a refusal that says what to use instead, matched before the
    service's own routes; the refusal goes through the app's guard (API key), access log and error envelope."""

    async def refuse() -> None:
        raise AdminRouteUnderServe(
            "sleep and wake on demand are not available under Ray Serve: they would act on one replica, chosen by "
            "the router. To free the GPU, let Serve scale the deployment to zero (autoscaling_config: "
            "min_replicas: 0); idle_sleep_s still puts each replica's model to sleep when it is idle"
        )

    for path in ADMIN_PATHS:
        app.add_api_route(path, refuse, methods=["POST"], include_in_schema=False)
        app.router.routes.insert(0, app.router.routes.pop())


class ProxyAddsRequestId:
    """Drops the app's ``X-Request-ID`` response header: Serve's proxy adds its own to every response, with the same
    value (the client's id, or one it made and passed on as the request's header, which the app then echoes), so
    the client would see it twice (``abc, abc``). An id the app refuses (over 128 characters) thus comes back as the
    client sent it, while the app's log line has the id the app made instead."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_without_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
            await send(message)

        await self.app(scope, receive, send_without_id)


class EmbeddingReplica:
    """One replica: the service's app, built in the replica's process, with its own model and micro-batcher."""

    def __init__(
        self, name: str, settings: ServiceSettings, load: Callable[[ServiceSettings], EmbeddingModel] | None = None
    ) -> None:
        from cluster.devices import place_on_ray_resources

        self.definition = service_definition(name)
        configure_logging(settings.log_level)  # to stderr, which Ray keeps in the replica's worker log
        self.settings = place_on_ray_resources(settings)  # no GPU of Ray's: the CPU; a GPU share: memory capped
        self.load_override = load
        self.runtime: Runtime | None = None
        self.load_error: Exception | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Called by Serve after ``__init__``; Serve then runs the app's lifespan (which loads the model)."""
        app = self.definition.build_app(self.settings, load=self._load)
        refuse_admin_routes(app)
        self.runtime = app.state.runtime
        self._start_only_once_loaded(app, app.state.runtime)
        app.add_middleware(ProxyAddsRequestId)  # after the access log has added the header
        # Outermost: a large body arrives as Serve's messages, which glibc's heap keeps once freed.
        app.add_middleware(ReleaseMemoryAfterLargeBodies)
        return app

    def _load(self) -> EmbeddingModel:
        """Runs in the app's loading thread. A hub id that is not in this node's cache is downloaded first, as the
        standalone ``main`` does before serving (the hub's file locks keep two replicas of a node from racing)."""
        try:
            if self.load_override is not None:
                return self.load_override(self.settings)
            self.definition.download_model(self.settings)
            return self.definition.load(self.settings)
        except Exception as exc:
            self.load_error = exc  # for the first health check, whose error Serve shows in `serve status`
            raise

    def _start_only_once_loaded(self, app: FastAPI, runtime: Runtime) -> None:
        """Make the app's lifespan start-up end only once the model is loaded (see the module docstring)."""
        inner = app.router.lifespan_context

        @asynccontextmanager
        async def lifespan(asgi_app: Any) -> AsyncIterator[Any]:
            context: AbstractAsyncContextManager[Any] = inner(asgi_app)
            async with context as state:
                while runtime.status == "loading":
                    await asyncio.sleep(READY_POLL_S)
                # A failed load ends the start-up too: the first check_health, which Serve runs next, fails with it.
                yield state

        app.router.lifespan_context = lifespan

    def check_health(self) -> None:
        """Serve calls this once before the replica counts as running, then every ``health_check_period_s``; raising
        makes it replace the replica. Its message is what ``serve status`` shows of a replica that failed to start:
        the load error itself (the traceback is in the replica's log, "loading the model failed")."""
        if self.load_error is not None:
            if isinstance(self.load_error, PERMANENT_LOAD_ERRORS):
                raise PermanentFailure.of(str(self.load_error))
            raise RuntimeError(f"the model did not load: {self.load_error}")
        status = self.runtime.status if self.runtime is not None else "loading"
        if status != "ok":
            raise RuntimeError(f"model is {status}")


EmbeddingDeployment: Deployment = serve.deployment(**DEPLOYMENT_DEFAULTS)(serve.ingress()(EmbeddingReplica))


def application(
    name: str,
    args: Mapping[str, Any] | None = None,
    *,
    load: Callable[[ServiceSettings], EmbeddingModel] | None = None,
    **options: Any,
) -> Application:
    """The application of service ``name`` ("siglip2" or "qwen3"): settings from ``args`` and the environment,
    Serve deployment options (``num_replicas``, ``ray_actor_options``, ...) from ``options``. ``load`` replaces the
    service's model loading, as ``build_app``'s does (tests; it must be importable in the replicas)."""
    settings = settings_from_args(name, args or {})
    return EmbeddingDeployment.options(name=name, **options).bind(name, settings, load)


def _builder(name: str) -> Callable[[dict[str, Any]], Application]:
    def build(args: dict[str, Any]) -> Application:
        return application(name, args)

    build.__name__ = build.__qualname__ = f"{name}_app"
    build.__doc__ = f"Builder for ``import_path: cluster.serve:{name}_app``."
    return build


# ``cluster.serve:siglip2_app``, ``cluster.serve:qwen3_app``: one builder for each service of the registry (Serve
# wants a plain function of one argument for an import_path that takes ``args``).
BUILDERS = {f"{name}_app": _builder(name) for name in SERVICES}


def __getattr__(attribute: str) -> Callable[[dict[str, Any]], Application]:
    if attribute in BUILDERS:
        return BUILDERS[attribute]
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")
