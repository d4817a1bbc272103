"""HTTP to a service on this machine, for the launcher and the container's health probe: never through a proxy
(an HTTP_PROXY set for the outside world would otherwise be asked for 127.0.0.1). Standard library only.

    python -m scripts.local_http health URL [INSTANCE]

prints one line (model, version, dimension, device) and exits 0 once URL/health answers 200 (from the process given
the instance id INSTANCE, if given); exits 1 while nothing answers so, 3 when another process answers there.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from typing import Any

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get_json(url: str, api_key: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """``GET url``'s JSON body; an HTTP error (503 while loading) raises ``urllib.error.HTTPError``, an OSError."""
    request = urllib.request.Request(url)
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with OPENER.open(request, timeout=timeout) as response:
        body: dict[str, Any] = json.load(response)
    return body


def health_line(url: str, instance: str | None) -> tuple[int, str]:
    """(exit code, line) of ``health URL INSTANCE`` (see the module's docstring)."""
    try:
        health = get_json(url + "/health", timeout=5)
    except (OSError, ValueError):
        return 1, ""
    if instance is not None and health.get("instance") != instance:
        return 3, ""
    tiny = "  TINY RANDOM WEIGHTS: meaningless vectors" if health.get("tiny") else ""
    line = f"model={health['model']} version={health['version']} dimension={health['dimension']} "
    return 0, f"{line}device={health['device']}{tiny}"


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or argv[0] != "health":
        sys.stderr.write(__doc__ or "")
        return 2
    code, line = health_line(argv[1], argv[2] if len(argv) == 3 else None)
    if line:
        sys.stdout.write(line + "\n")
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
