"""The front door's watch over the first start of the applications it deployed: a replica that cannot start for a
reason a new one would meet too (a ``PermanentFailure``: no such model, a model of another kind, broken or
unreadable weights, no GPU for ``--device cuda``) stops the front door within a second or so, with the replica's own
message. Serve would start new replicas forever, and ``/health`` would answer 503 "unhealthy" forever.

Serve passes a replica's start-up error on only as text: its deployment's message in ``serve.status()``, set at each
failed start ("A replica failed to start with exception. Retrying ... Error: <the replica's traceback>"). The watch
asks every ``WATCH_PERIOD_S`` until every application has run: after that, a replica that fails is one lost, which
Serve replaces while the others serve.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence

from cluster.permanent import permanent_reason

logger = logging.getLogger(__name__)

WATCH_PERIOD_S = 1.0

# application -> deployment -> (Serve's status of the deployment, its message)
Deployments = dict[str, dict[str, tuple[str, str]]]


def deployment_messages() -> Deployments:
    from ray import serve

    return {
        name: {
            # Typed as str enums, given as plain strings at times: the same values either way.
            deployment: (str(getattr(status.status, "value", status.status)), status.message)
            for deployment, status in app.deployments.items()
        }
        for name, app in serve.status().applications.items()
    }


def cannot_start(
    known: Mapping[str, Mapping[str, tuple[str, str]]], applications: Sequence[str]
) -> tuple[str, str] | None:
    """(application, reason) of the first deployment whose replicas fail permanently, or None."""
    for application in applications:
        for _, message in known.get(application, {}).values():
            reason = permanent_reason(message)
            if reason is not None:
                return application, reason
    return None


def all_running(known: Mapping[str, Mapping[str, tuple[str, str]]], applications: Sequence[str]) -> bool:
    return all(
        known.get(application) and all(status == "HEALTHY" for status, _ in known[application].values())
        for application in applications
    )


class StartupWatch:
    """A thread that calls ``on_failure(application, reason)`` once, at the first permanent failure of a replica of
    ``applications``, and ends then, or once every one of them has run, or at ``stop()``."""

    def __init__(
        self,
        applications: Sequence[str],
        on_failure: Callable[[str, str], None],
        ask: Callable[[], Deployments] = deployment_messages,
        period_s: float = WATCH_PERIOD_S,
    ) -> None:
        self.applications = list(applications)
        self.on_failure = on_failure
        self.ask = ask
        self.period_s = period_s
        self._stopped = threading.Event()
        # A daemon: serve.status() has no timeout, and a controller that never answers must not keep the process.
        self._thread = threading.Thread(target=self._watch, name="startup-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(self.period_s):
            try:
                known = self.ask()
            except Exception as exc:  # noqa: BLE001 - the controller may be starting: asked again next period
                logger.debug("could not ask Serve's controller for the deployments' status: %r", exc)
                continue
            failure = cannot_start(known, self.applications)
            if failure is not None and not self._stopped.is_set():
                self.on_failure(*failure)
                return
            if all_running(known, self.applications):
                logger.debug("every application has run: the start-up watch ends")
                return
