"""Used by start_all.sh when a service already runs: is it the service this start asks for?

    python -m scripts.running_service NAME URL

Compares the running service's /info (model folder or hub id, embedding version, tiny random weights) with what
the current environment (SIGLIP2_MODEL, QWEN3_LAYER, EMBED_..., see --help of the service) would start. Prints one
line and exits 0 when they match; otherwise says what runs and what was asked, and exits 1, so a user never keeps
vectors of another model, recipe or of the tiny test weights by accident.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from common.config import load_settings
from common.server import ServiceDefinition
from common.services import SERVICES
from scripts.local_http import get_json


def same_model(running: object, asked: object) -> bool:
    """Folders compare by their real path (a relative and an absolute path to one folder are the same model)."""
    if isinstance(running, str) and isinstance(asked, str) and os.path.isdir(running) and os.path.isdir(asked):
        return os.path.realpath(running) == os.path.realpath(asked)
    return running == asked


def describe(identity: dict[str, Any]) -> str:
    tiny = " TINY RANDOM WEIGHTS" if identity.get("tiny") else ""
    return f"model={identity.get('model_path')} version={identity.get('version')}{tiny}"


def main(name: str, url: str) -> int:
    service: ServiceDefinition[Any] = importlib.import_module(SERVICES[name].module).SERVICE
    settings = load_settings(service.settings_cls, [])
    asked = service.expected_identity(settings)
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    try:
        running = get_json(url + "/info", api_key)
    except OSError as exc:
        sys.stderr.write(f"{name}: already running, but {url}/info does not answer ({exc}); ./stop_all.sh {name}\n")
        return 1
    if running.get("status") != "ok":
        sys.stdout.write(f"{name}: already running, still loading ({url})\n")
        return 0
    if (
        same_model(running.get("model_path"), asked["model_path"])
        and running.get("version") == asked["version"]
        and bool(running.get("tiny")) == asked["tiny"]
    ):
        sys.stdout.write(f"{name}: already running at {url}  {describe(running)}\n")
        return 0
    sys.stderr.write(
        f"{name}: a different service is running at {url}: {describe(running)}\n"
        f"{name}: this start asks for: {describe(asked)}\n"
        f"{name}: stop the running one first (./stop_all.sh {name}), then start again\n"
    )
    return 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
