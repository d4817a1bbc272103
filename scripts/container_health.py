"""The container image's HEALTHCHECK: exit 0 only while the service's GET /health answers 200.

Which service runs, and on which port, comes from the container's main process (PID 1, the entry point): its
arguments name the service and may hold --port, and the port variables are read as the service reads them
(``SIGLIP2_PORT`` before ``EMBED_PORT``). The service's own port matters: with host networking, the other service's
container may listen on the other port of this network namespace.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from common.services import SERVICES, port_of
from scripts.local_http import get_json


def service_port(argv: list[str], env: dict[str, str]) -> int | None:
    """The port of the service that ``IMAGE argv...`` runs (its ``--port``, else its variables as the service reads
    them: ``SIGLIP2_PORT`` before ``EMBED_PORT``), or None when it runs none (the usage)."""
    name = next((arg for arg in argv if arg in SERVICES), None)
    return None if name is None else port_of(name, env, argv)


def main() -> int:
    argv = Path("/proc/1/cmdline").read_bytes().decode().split("\0")
    port = service_port(argv, dict(os.environ))
    if port is None:
        return 1
    try:
        get_json(f"http://127.0.0.1:{port}/health", timeout=4)  # 503 raises: not healthy
    except Exception as exc:  # noqa: BLE001 - refused, 503, timeout: all mean "not healthy"
        sys.stderr.write(f"GET /health on port {port}: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
