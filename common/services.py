"""The project's services, in one place: what the launchers, the container's entry point and health probe, the Ray
Serve applications and the tests know of them. Standard library only (the container's PID 1 and the shell scripts
read it without torch). Adding a service: an entry here, its own file, and the docs; compose.yaml and the
Dockerfile, which cannot read this, are held to it by tests/test_service_registry.py.

    python -m common.services names              the names, one a line
    python -m common.services port NAME          its port as the service would take it from this environment
    python -m common.services shell              bash declarations for scripts/services.sh
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Service:
    name: str  # the launchers' and the container's name for it, and its Serve application's
    module: str  # the Python module (and, with ".py", the script) that defines its SERVICE
    port: int  # its default port
    env_prefix: str  # of its own environment variables (SIGLIP2_MODEL); EMBED_ is both services'
    tiny_builder: str  # the common.tiny_models function that builds its tiny model
    tiny_folder: str  # the folder of its tiny model under ``python -m common.tiny_models OUT``
    mounted_folder: str  # its model's folder under the container's models mount (the hub repository's name)
    route_prefix: str  # under Ray Serve

    @property
    def script(self) -> str:
        return f"{self.module}.py"

    @property
    def model_variable(self) -> str:
        return f"{self.env_prefix}MODEL"


SERVICES: dict[str, Service] = {
    service.name: service
    for service in (
        Service(
            "siglip2",
            "siglip2_embed",
            6010,
            "SIGLIP2_",
            "build_tiny_siglip",
            "siglip",
            "siglip2-so400m-patch16-512",
            "/siglip2",
        ),
        Service("qwen3", "qwen3_embed", 6011, "QWEN3_", "build_tiny_zimage", "zimage", "Z-Image-Turbo", "/qwen3"),
    )
}


def service(name: str) -> Service:
    if name not in SERVICES:
        raise ValueError(f"unknown service {name!r} (expected {' or '.join(SERVICES)})")
    return SERVICES[name]


def setting_from_environment(name: str, setting: str, env: Mapping[str, str]) -> str | None:
    """A setting as the service reads it from the environment: its own variable (``SIGLIP2_PORT``), then the shared
    one (``EMBED_PORT``); None when neither is set (common.config's precedence, without the flags)."""
    upper = setting.upper()
    return env.get(f"{service(name).env_prefix}{upper}") or env.get(f"EMBED_{upper}") or None


def port_of(name: str, env: Mapping[str, str], argv: Sequence[str] = ()) -> int:
    """The port service ``name`` listens on: ``--port`` in ``argv`` (its flags), else the environment, else its
    default: the services' own precedence."""
    for index, arg in enumerate(argv):
        if arg == "--port" and index + 1 < len(argv):
            return int(argv[index + 1])
        if arg.startswith("--port="):
            return int(arg.split("=", 1)[1])
    configured = setting_from_environment(name, "port", env)
    return int(configured) if configured else service(name).port


def shell_declarations(env: Mapping[str, str]) -> str:
    """What scripts/services.sh declares: the names, and each service's port and bind address from ``env``."""
    lines = [f"SERVICE_NAMES=({' '.join(SERVICES)})"]
    for name, entry in SERVICES.items():
        host = setting_from_environment(name, "host", env) or "127.0.0.1"
        lines.append(f"SERVICE_PORT_{name}={port_of(name, env)}")
        lines.append(f"SERVICE_HOST_{name}={shlex.quote(host)}")
        lines.append(f"SERVICE_SCRIPT_{name}={entry.script}")
        lines.append(f"SERVICE_MODEL_VARIABLE_{name}={entry.model_variable}")
        lines.append(f"SERVICE_TINY_FOLDER_{name}={entry.tiny_folder}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    try:
        match list(argv):
            case ["names"]:
                sys.stdout.write("".join(f"{name}\n" for name in SERVICES))
            case ["port", name]:
                sys.stdout.write(f"{port_of(name, os.environ)}\n")
            case ["shell"]:
                sys.stdout.write(shell_declarations(os.environ))
            case _:
                sys.stderr.write(__doc__ or "")
                return 2
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
