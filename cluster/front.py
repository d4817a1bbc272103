"""The front door of the services on Ray Serve: the standalone services' HTTP server and request checks, in front of
Serve's proxy, so that a Serve deployment holds the bounds of a standalone service with the same settings.

    python -m cluster.front cluster/serve_config.yaml        # Serve with that config, and the front door on its port
    python -m cluster.front cluster/serve_config_cpu.yaml    # the same on a machine without a GPU
    python -m cluster.front CONFIG --address auto --front-door-only   # the front door of another node
    python -m cluster.front cluster/serve_config_cpu.yaml --tiny  # on tiny random-weight models: meaningless vectors

Why. Serve's proxy cannot be configured for what a standalone service refuses before a request reaches the app: it
reads request bodies ahead, whole when the request waits for a replica (before the app could check the key or the
size), has no bound on the request line and headers, no idle or header timeout and no connection cap, and a slow
body holds a replica's slot for as long as it trickles (a few hundred of them lock an application out).

What. The front door listens on the config's ``http_options`` address (port 8000) and Serve's proxy moves to
loopback (``--serve-port``, by default that port + 1). The front door is uvicorn with the standalone services'
protocol (``common.http_protocol``: request line and headers at most ``max_header_bytes`` and 100 fields, else 431;
``header_timeout_s`` to send them and for an idle connection; ``max_connections``, past which a new connection gets
503) and, for each application, the standalone app's own request checks (``common.api.app.request_checks``: CORS,
the body's size and read time, then Host, Origin and the API key from the headers alone, before a byte of the body
is read), built from the application's own settings: its ``args`` in the config over the environment, read as its
builder reads them. The body of a route that takes one is then received whole, within those limits, and only then
is the request sent on to Serve's proxy, at loopback speed; the answer streams back. So nothing unauthenticated is
read, a slow body holds a connection of the front door (bounded by ``body_timeout_s``) and never a replica, and a
body over ``max_body_bytes`` is refused as it arrives. Other paths of an application are sent on without their body
(the app answers 404 or 405 whatever it holds). Connection settings are per server: the largest any application
sets. Memory that a large body took is handed back to the system afterwards, here, in Serve's proxy (glibc's
mmap threshold fixed for it: ``PROXY_ENV``) and in the replicas.

Health. ``GET /health`` of an application answers 503 ``{"status": "loading"|"unhealthy", "replicas": {...}}`` only
while no replica of it is running (a fresh deploy whose models are still loading, or every replica gone): Serve's
proxy would hold the request until one is. While a replica runs, the request goes to one, which answers for itself,
so losing one replica of several never takes a node out of a load balancer.

Stopping. SIGINT (Ctrl-C), SIGTERM or SIGHUP drain the front door (as a standalone service drains), then shut Serve
down (as ``serve run`` does on Ctrl-C); ``--front-door-only`` leaves Serve running.

Start-up checks. The config's applications must be this project's (``cluster.serve:siglip2_app`` /
``qwen3_app``) and their settings valid; and the cluster must have the CPUs and GPUs the replicas ask for: Serve
would otherwise wait for them forever, saying so only in its own logs. Either fails within seconds, with a message.
Then, until every application has run, a replica that cannot start for good (no such model, ...: cluster/permanent.py)
stops the front door and Serve with the replica's own message and exit 1 (cluster/startup_watch.py).

Ray. Without ``--address`` (or RAY_ADDRESS) the front door starts a Ray of its own with every server on loopback
(cluster/ray_private.py); a cluster it joins listens as it was started. ``--tiny`` runs the applications on tiny
random-weight models (cluster/tiny.py).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from fastapi.responses import JSONResponse
from multidict import CIMultiDict
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from yarl import URL

from cluster.permanent import MARK
from cluster.ray_private import deploy, local_ray_on_loopback
from cluster.serve import service_definition, settings_from_args
from cluster.startup_watch import StartupWatch
from cluster.tiny import tiny_banner, tiny_models
from common.api.app import UNPROTECTED_PATHS, body_paths, request_checks, route_paths, service_routers
from common.api.middleware import AccessLog, ReleaseMemoryAfterLargeBodies, app_path, is_loopback, send_error
from common.config import ServiceSettings
from common.errors import EmbedError, NotFound, NotReady
from common.metrics import Metrics
from common.server import configure_logging, limited_server
from common.services import SERVICES

logger = logging.getLogger(__name__)

# The builders of this project's applications, and the service each one serves.
BUILDERS = {f"cluster.serve:{name}_app": name for name in SERVICES}
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
# How long the front door reuses what Serve's controller said about the deployments, for GET /health: probes every
# few milliseconds from several load balancers ask the controller at most once a second.
STATUS_TTL_S = 1.0
# ... and how long it waits for that answer: serve.status() has no timeout of its own, and a controller that is down
# or restarting would make every probe wait (each holding one of the front door's connections).
STATUS_TIMEOUT_S = 2.0
# Deployment states whose replicas fail (to start, or their health checks), as opposed to still loading.
FAILING = frozenset({"UNHEALTHY", "DEPLOY_FAILED"})
# Chunks of an answer as they come from Serve's proxy.
RESPONSE_CHUNK_BYTES = 256 * 1024


# -- the applications of a config ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrontedApp:
    """One application of the config, as the front door needs it."""

    name: str  # Serve's application name
    route_prefix: str
    service: str  # "siglip2" or "qwen3": the deployment's name too
    settings: ServiceSettings


def fronted_apps(config: Mapping[str, Any]) -> list[FrontedApp]:
    """The config's applications with their settings, validated as their builders validate them (ValueError)."""
    apps = []
    for app in config.get("applications") or []:
        name, import_path = app.get("name", "default"), app.get("import_path", "")
        if import_path not in BUILDERS:
            raise ValueError(
                f"application {name!r}: the front door knows only this project's applications "
                f"({', '.join(BUILDERS)}), not {import_path!r}"
            )
        service = BUILDERS[import_path]
        settings = settings_from_args(service, app.get("args") or {})
        apps.append(FrontedApp(name, str(app.get("route_prefix", "/")).rstrip("/") or "/", service, settings))
    if not apps:
        raise ValueError("the config has no applications")
    return apps


def with_models(config: Mapping[str, Any], folders: Mapping[str, Path]) -> dict[str, Any]:
    """The config with each of this project's applications on the model folder of its service (``--tiny``), in
    place of any ``model`` its args name."""
    changed = copy.deepcopy(dict(config))
    for app in changed.get("applications") or []:
        service = BUILDERS.get(app.get("import_path", ""))
        if service is not None and service in folders:
            args = app.get("args") or {}
            kept = {key: value for key, value in args.items() if key.removeprefix("--").replace("-", "_") != "model"}
            app["args"] = {**kept, "model": str(folders[service])}
    return changed


def front_door_settings(apps: Sequence[FrontedApp], host: str, port: int) -> ServiceSettings:
    """The server's own settings: its address, and of each connection setting the largest any application sets."""
    settings = [app.settings for app in apps]
    return settings[0].model_copy(
        update={
            "host": host,
            "port": port,
            "max_connections": max(s.max_connections for s in settings),
            "max_header_bytes": max(s.max_header_bytes for s in settings),
            "header_timeout_s": max(s.header_timeout_s for s in settings),
            "shutdown_timeout_s": max(s.shutdown_timeout_s for s in settings),
        }
    )


# glibc's malloc settings for Serve's controller and the proxies it starts, which inherit its environment. The proxy
# receives a body in pieces of up to 256 KiB; by default glibc raises its mmap threshold to the largest piece freed,
# then serves the next pieces from heaps that free() never shrinks in the middle, and the proxy stayed 80-175 MB
# larger after a few 100 MiB uploads. A fixed threshold maps every piece of 128 KiB or more on its own, and unmaps it
# when it is freed: the proxy came back to its size within 2 MB.
PROXY_ENV = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}
# The replicas inherit the controller's environment too, and set this back to glibc's default: on the CPU a fixed
# threshold made a forward pass 6-12 % slower (each activation mapped anew; bench/bench_malloc.py), and they trim
# after large bodies themselves.
REPLICA_ENV = {"GLIBC_TUNABLES": ""}


def serve_config_behind(config: Mapping[str, Any], serve_port: int, front_host: str) -> dict[str, Any]:
    """The config Serve runs: its proxy on loopback at ``serve_port``, with ``PROXY_ENV`` (the replicas with
    ``REPLICA_ENV``) unless the config sets those variables itself. The replicas see every request coming from
    the front door over loopback, so when the front door listens elsewhere without ``allowed_hosts``, the names it
    accepts (any, as a standalone service there does) are accepted by the replicas too: the front door checked."""
    serve_config = copy.deepcopy(dict(config))
    serve_config["http_options"] = {**(config.get("http_options") or {}), "host": "127.0.0.1", "port": serve_port}
    serve_config["controller_options"] = with_env_defaults(config.get("controller_options"), PROXY_ENV)
    serve_config["applications"] = [with_env_defaults(app, REPLICA_ENV) for app in serve_config["applications"]]
    if not is_loopback(front_host):
        for app in serve_config["applications"]:
            args = app.setdefault("args", {})
            if not any(key.replace("-", "_").removeprefix("__") == "allowed_hosts" for key in args):
                args["allowed_hosts"] = ["*"]
    return serve_config


def with_env_defaults(options: Mapping[str, Any] | None, env: Mapping[str, str]) -> dict[str, Any]:
    """``options`` of a Serve config (an application, ``controller_options``) with ``env`` in their
    ``runtime_env``, where they set none of those names."""
    runtime_env = dict((options or {}).get("runtime_env") or {})
    runtime_env["env_vars"] = {**env, **(runtime_env.get("env_vars") or {})}
    return {**(options or {}), "runtime_env": runtime_env}


# -- what the replicas ask for --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResourceAsk:
    application: str
    replicas: int
    cpus: float  # per replica
    gpus: float


def resource_asks(config: Mapping[str, Any]) -> list[ResourceAsk]:
    """What each application's replicas reserve at start: replicas (the initial or minimum count when autoscaled)
    times their ``ray_actor_options`` (Serve's default: 1 CPU, no GPU)."""
    asks = []
    for app in config.get("applications") or []:
        for deployment in app.get("deployments") or [{}]:
            autoscaling = deployment.get("autoscaling_config") or {}
            replicas = deployment.get("num_replicas", 1)
            if autoscaling or not isinstance(replicas, int):
                replicas = autoscaling.get("initial_replicas") or autoscaling.get("min_replicas", 1)
            options = deployment.get("ray_actor_options") or {}
            cpus = options.get("num_cpus")
            asks.append(
                ResourceAsk(
                    app.get("name", "default"),
                    int(replicas),
                    1.0 if cpus is None else float(cpus),
                    float(options.get("num_gpus") or 0.0),
                )
            )
    return asks


def missing_resources(asks: Sequence[ResourceAsk], cluster: Mapping[str, float], config_name: str) -> str | None:
    """Why the cluster cannot start every replica the config asks for, or None when it can."""
    problems = []
    for resource, unit, per_replica in (("GPU", "GPU", "gpus"), ("CPU", "CPU", "cpus")):
        wanted = sum(ask.replicas * getattr(ask, per_replica) for ask in asks)
        have = float(cluster.get(resource, 0.0))
        if wanted > have + 1e-9:
            details = ", ".join(
                f"{ask.application}: {ask.replicas} x {getattr(ask, per_replica):g} {unit}"
                for ask in asks
                if getattr(ask, per_replica)
            )
            problems.append(f"{wanted:g} {unit}s ({details}) and the Ray cluster has {have:g}")
    if not problems:
        return None
    return (
        f"{config_name} asks for {' and '.join(problems)}: Serve would wait for them forever. On a machine without a "
        "GPU run `python -m cluster.front cluster/serve_config_cpu.yaml`; otherwise lower num_replicas, num_cpus or "
        "num_gpus in the config, or add nodes (with an autoscaler that adds them: --no-resource-check)"
    )


# -- Serve's view of the replicas, for /health --------------------------------------------------------------------

DeploymentStatus = tuple[str, dict[str, int]]  # Serve's status of a deployment, and its replicas' states


def serve_deployments() -> dict[str, dict[str, DeploymentStatus]]:
    """What Serve's controller says: application -> deployment -> (status, replica states)."""
    from ray import serve

    found: dict[str, dict[str, DeploymentStatus]] = {}
    for app_name, app in serve.status().applications.items():
        found[app_name] = {}
        for name, deployment in app.deployments.items():
            # Typed as str enums, given as plain strings at times: the same values either way.
            states = {str(getattr(state, "value", state)): count for state, count in deployment.replica_states.items()}
            found[app_name][name] = (str(getattr(deployment.status, "value", deployment.status)), states)
    return found


class ServeStatus:
    """``serve_deployments()`` asked at most once per ``STATUS_TTL_S``, in a thread; None when it failed or took
    longer than ``STATUS_TIMEOUT_S``."""

    def __init__(self, ask: Callable[[], dict[str, dict[str, DeploymentStatus]]] = serve_deployments) -> None:
        self.ask = ask
        self._known: tuple[float, dict[str, dict[str, DeploymentStatus]] | None] | None = None
        self._asking = asyncio.Lock()

    async def deployment(self, application: str, deployment: str) -> DeploymentStatus | None:
        async with self._asking:
            if self._known is None or time.monotonic() - self._known[0] > STATUS_TTL_S:
                answer = None
                try:
                    answer = await asyncio.wait_for(asyncio.to_thread(self.ask), STATUS_TIMEOUT_S)
                except Exception as exc:  # noqa: BLE001 - whatever the reason, a replica answers for itself
                    logger.warning("could not ask Serve's controller for the deployments' status: %r", exc)
                self._known = (time.monotonic(), answer)
            known = self._known[1]
        if known is None:
            return None
        # Not registered yet: the application is still being deployed.
        return known.get(application, {}).get(deployment, ("DEPLOYING", {}))


class HealthWhileNoReplicaRuns:
    """``GET /health`` (and HEAD) answers 503 itself while no replica of the application runs, with the standalone
    service's ``status`` ("loading", or "unhealthy" when the replicas fail) and the replicas' states; otherwise a
    replica answers. When the controller cannot be reached the request goes on (a replica answers for itself)."""

    def __init__(self, app: ASGIApp, *, application: str, deployment: str, status: ServeStatus) -> None:
        self.app = app
        self.application = application
        self.deployment = deployment
        self.status = status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and app_path(scope) == "/health":
            known = await self.status.deployment(self.application, self.deployment)
            if known is not None and known[1].get("RUNNING", 0) == 0:
                body = {"status": "unhealthy" if known[0] in FAILING else "loading", "replicas": known[1]}
                await JSONResponse(body, status_code=503, headers={"Retry-After": "5"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- forwarding -----------------------------------------------------------------------------------------------------


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


# -- the front door app ---------------------------------------------------------------------------------------------


class FrontDoor:
    """Dispatches by route prefix to each application's checks and forwarder; a path under no prefix is 404."""

    def __init__(self, apps: Sequence[FrontedApp], upstream: Upstream, status: ServeStatus) -> None:
        self.upstream = upstream
        self.metrics = Metrics()
        # Longest prefix first: "/siglip2-big" is not "/siglip2"'s.
        self.routes = [(app.route_prefix, self.checked_app(app, status)) for app in apps]
        self.routes.sort(key=lambda route: -len(route[0]))
        self.app = AccessLog(ReleaseMemoryAfterLargeBodies(self.dispatch), metrics=self.metrics)

    def checked_app(self, app: FrontedApp, status: ServeStatus) -> ASGIApp:
        routers = service_routers(service_definition(app.service).routers())
        inner: ASGIApp = ForwardToServe(self.upstream, body_paths(routers), strip_cors=bool(app.settings.cors_origins))
        inner = HealthWhileNoReplicaRuns(inner, application=app.name, deployment=app.service, status=status)
        for check in reversed(request_checks(app.settings, route_paths(routers) - UNPROTECTED_PATHS)):
            inner = check.cls(inner, *check.args, **check.kwargs)
        return inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        elif scope["type"] == "http":
            await self.app(scope, receive, send)
        # websockets: none of the applications has one; uvicorn refuses the upgrade when nothing accepts it

    async def dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope["path"])
        for prefix, app in self.routes:
            if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
                await app({**scope, "root_path": "" if prefix == "/" else prefix}, receive, send)
                return
        await send_error(send, scope, NotFound("Not Found"), close=has_unread_body(scope))

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "lifespan.startup":
                await self.upstream.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.upstream.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


def has_unread_body(scope: Scope) -> bool:
    return any(name in (b"content-length", b"transfer-encoding") for name, _ in scope["headers"])


# -- the command ----------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.front",
        description="Start Ray Serve with a config file, and the front door (the standalone services' HTTP limits "
        "and checks) on the config's http_options address; Ctrl-C or SIGTERM stops both.",
    )
    parser.add_argument("config", type=Path, help="a Serve config file, e.g. cluster/serve_config.yaml")
    parser.add_argument(
        "--address",
        help="an existing Ray cluster (auto, HOST:6379); default RAY_ADDRESS, else a local Ray started for the front "
        "door, every server of it on loopback",
    )
    parser.add_argument(
        "--serve-port", type=int, help="the port of Serve's proxy, on loopback (default: http_options.port + 1)"
    )
    parser.add_argument(
        "--front-door-only",
        action="store_true",
        help="start only the front door, before the Serve proxy already running on this node (another node of "
        "the cluster, started with the same config and --serve-port)",
    )
    parser.add_argument(
        "--no-resource-check",
        action="store_true",
        help="deploy even if the cluster has fewer CPUs or GPUs than the replicas ask for (an autoscaling cluster)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="run the applications on tiny random-weight models (built once under .cache/tiny-models/, as "
        "./start_all.sh --tiny): MEANINGLESS vectors, only for trying the commands",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    if args.front_door_only and not args.address:
        parser.error("--front-door-only needs --address: the Ray cluster whose Serve proxy it stands before")
    return args


def listening_socket(host: str, port: int) -> socket.socket:
    """The front door's socket, bound before anything is deployed: a port in use fails the command at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"the front door cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = yaml.safe_load(args.config.read_text())
        if args.tiny:
            config = with_models(config, tiny_models())
        apps = fronted_apps(config)
    except (OSError, yaml.YAMLError, ValueError) as exc:
        logger.error("%s: %s", args.config, exc)
        return 2
    if args.tiny:
        logger.warning("%s", tiny_banner("these applications run"))
    http_options = config.get("http_options") or {}
    host, port = str(http_options.get("host", "127.0.0.1")), int(http_options.get("port", 8000))
    serve_port = args.serve_port or port + 1
    if not is_loopback(host) and any(app.settings.api_key is None for app in apps):
        logger.warning("the front door listens on %s and an application has no API key (set EMBED_API_KEY)", host)

    import ray
    from ray import serve

    failed: list[str] = []  # the application whose replicas cannot start (StartupWatch)
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace="serve")  # a cluster listens as it was started
    else:
        # "local": a Ray of the front door's own, never one that a file left by `ray start` names
        with local_ray_on_loopback():
            ray.init(address="local", namespace="serve")
    try:
        if not args.front_door_only and not args.no_resource_check:
            problem = missing_resources(resource_asks(config), ray.cluster_resources(), str(args.config))
            if problem is not None:
                logger.error("%s", problem)
                return 1
        try:
            sock = listening_socket(host, port)
        except OSError as exc:
            logger.error("%s", exc)
            return 1
        if not args.front_door_only:
            deploy(serve_config_behind(config, serve_port, host))
        try:
            server = limited_server(
                FrontDoor(apps, Upstream(f"http://127.0.0.1:{serve_port}"), ServeStatus()),
                front_door_settings(apps, host, port),
                runtime=None,
            )

            def cannot_start(application: str, reason: str) -> None:
                logger.error(
                    "application %s: a replica %s%s\n(an application's model is `model` in its args in %s, or "
                    "SIGLIP2_MODEL / QWEN3_MODEL; --tiny tries the commands on tiny random-weight models)",
                    application,
                    MARK,
                    reason,
                    args.config,
                )
                failed.append(application)
                server.should_exit = True  # stops as a stop signal does: the front door, then Serve

            watch = StartupWatch([app.name for app in apps], cannot_start)
            if not args.front_door_only:
                watch.start()
            logger.info(
                "front door on http://%s:%d (%s), Serve's proxy on 127.0.0.1:%d",
                host if ":" not in host else f"[{host}]",
                port,
                ", ".join(app.route_prefix for app in apps),
                serve_port,
            )
            if args.tiny:
                logger.warning("%s", tiny_banner("these applications run"))
            try:
                server.run(sockets=[sock])
            finally:
                watch.stop()
        finally:
            sock.close()
            if not args.front_door_only:
                logger.info("stopping Serve")
                serve.shutdown()
    finally:
        ray.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
