"""``GET /health`` of an application while none of its replicas runs: Serve's proxy would hold the request until one
does, so the front door answers 503 itself from what Serve's controller says. While a replica runs, it answers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from common.api.middleware import app_path

logger = logging.getLogger(__name__)

# How long the front door reuses what Serve's controller said about the deployments, for GET /health: probes every
# few milliseconds from several load balancers ask the controller at most once a second.
STATUS_TTL_S = 1.0
# ... and how long it waits for that answer: serve.status() has no timeout of its own, and a controller that is down
# or restarting would make every probe wait (each holding one of the front door's connections).
STATUS_TIMEOUT_S = 2.0
# Deployment states whose replicas fail (to start, or their health checks), as opposed to still loading.
FAILING = frozenset({"UNHEALTHY", "DEPLOY_FAILED"})

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
