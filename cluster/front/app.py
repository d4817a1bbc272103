"""The front door's ASGI app: each application's own request checks (those of the standalone app, from its settings)
around the health answer and the forwarder, dispatched by route prefix."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cluster.front.config import FrontedApp
from cluster.front.forward import ForwardToServe, Upstream
from cluster.front.health import HealthWhileNoReplicaRuns, ServeStatus
from cluster.serve import service_definition
from common.api.app import UNPROTECTED_PATHS, body_paths, request_checks, route_paths, service_routers
from common.api.middleware import AccessLog, ReleaseMemoryAfterLargeBodies, has_body, send_error
from common.errors import NotFound
from common.metrics import Metrics


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
        await send_error(send, scope, NotFound("Not Found"), close=has_body(scope))

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
