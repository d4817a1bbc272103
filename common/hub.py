"""Requests to the Hugging Face hub that give up at once when the hub cannot be reached.

huggingface_hub retries a request that fails on the network five times, 1 to 8 s apart (about 23 s), whatever the
failure. That is right for a timeout or a 5xx answer, which can pass in seconds; a host name that does not resolve,
a refused connection or no route to any network is a machine without network (or a wrong ``HF_ENDPOINT``, or a
proxy that is down), and waiting does not fix it. ``fail_fast_when_unreachable`` gives the hub an HTTP client that
raises ``HubUnreachable`` for those, which the hub's retry loop does not catch, so the first one ends the download.
"""

from __future__ import annotations

import errno
import socket
import threading
from typing import Any

import httpx2
from huggingface_hub import set_client_factory
from huggingface_hub.utils._http import hf_request_event_hook


class HubUnreachable(Exception):
    """The hub's host (or the proxy to it) does not resolve, refuses connections, or no network leads to it."""


def unreachable_reason(error: BaseException) -> str | None:
    """Why the hub cannot be reached, if ``error`` or an error it was raised from says it cannot: "the host name
    does not resolve", "the connection was refused" or "no network leads to it"; None for any other failure."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, socket.gaierror):
            return "the host name does not resolve"
        if isinstance(current, ConnectionRefusedError):
            return "the connection was refused"
        if isinstance(current, OSError) and current.errno == errno.ENETUNREACH:
            return "no network leads to it"
        current = current.__cause__ or current.__context__
    return None


class FailFastClient(httpx2.Client):
    """The hub's client, but for a connection that cannot be made for lack of network: ``HubUnreachable``."""

    def send(self, request: httpx2.Request, *args: Any, **kwargs: Any) -> httpx2.Response:
        try:
            return super().send(request, *args, **kwargs)
        except httpx2.ConnectError as exc:
            reason = unreachable_reason(exc)
            if reason is None:
                raise
            raise HubUnreachable(f"{request.url.scheme}://{request.url.host}: {reason} ({exc})") from exc


def fail_fast_client() -> httpx2.Client:
    # What huggingface_hub's own default_client_factory builds (its request hook blocks requests under
    # HF_HUB_OFFLINE and tags them), as a FailFastClient.
    return FailFastClient(event_hooks={"request": [hf_request_event_hook]}, follow_redirects=True, timeout=None)


_installed = False
_installing = threading.Lock()


def fail_fast_when_unreachable() -> None:
    """From now on, this process's requests to the hub end at the first failure that says the hub cannot be
    reached; timeouts and 5xx answers are still retried. Installed once and kept: swapping the hub's client back
    would close it under a download running in another thread."""
    global _installed
    with _installing:
        if not _installed:
            set_client_factory(fail_fast_client)
            _installed = True
