"""The container image's HEALTHCHECK: exit 0 only while the service's GET /health answers 200.

Which service runs, and on which port, comes from the container's main process (PID 1, the entry point): its
arguments name the service and may hold --port, and the port variables are read as the service reads them
(``SIGLIP2_PORT`` before ``EMBED_PORT``). The service's own port matters: with host networking, the other service's
container may listen on the other port of this network namespace.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path

DEFAULT_PORTS = {"siglip2": 6010, "qwen3": 6011}


def service_port(argv: list[str], env: dict[str, str]) -> int | None:
    """The port of the service that ``IMAGE argv...`` runs, or None when it runs none (the usage)."""
    service = next((arg for arg in argv if arg in DEFAULT_PORTS), None)
    if service is None:
        return None
    for index, arg in enumerate(argv):
        if arg == "--port" and index + 1 < len(argv):
            return int(argv[index + 1])
        if arg.startswith("--port="):
            return int(arg.split("=", 1)[1])
    return int(env.get(f"{service.upper()}_PORT") or env.get("EMBED_PORT") or DEFAULT_PORTS[service])


def main() -> int:
    argv = Path("/proc/1/cmdline").read_bytes().decode().split("\0")
    port = service_port(argv, dict(os.environ))
    if port is None:
        return 1
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never send localhost to a proxy
    try:
        with opener.open(f"http://127.0.0.1:{port}/health", timeout=4) as response:
            return 0 if response.status == 200 else 1
    except Exception as exc:  # noqa: BLE001 - refused, 503, timeout: all mean "not healthy"
        sys.stderr.write(f"GET /health on port {port}: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
