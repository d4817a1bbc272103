"""The one registry of the services (common/services.py): the files that cannot read it (compose.yaml, the
Dockerfile) agree with it, each service's settings take their defaults from it, and a setting reaches the launcher,
the container's health probe, the Serve application and the service itself the same way (the settings' own
precedence: the service's variable, then the shared one, then the default)."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.serve import settings_from_args
from common.config import ServiceSettings
from common.services import SERVICES, port_of, setting_from_environment
from scripts.container_health import service_port

ROOT = Path(__file__).resolve().parents[1]


def settings_cls(name: str) -> type[ServiceSettings]:
    settings: type[ServiceSettings] = importlib.import_module(SERVICES[name].module).SERVICE.settings_cls
    return settings


def test_compose_and_the_dockerfile_agree_with_the_registry() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert set(compose["services"]) == set(SERVICES)
    for name, service in compose["services"].items():
        entry = SERVICES[name]
        assert service["command"] == [name]
        assert service["ports"] == [f"127.0.0.1:${{{entry.env_prefix}PORT:-{entry.port}}}:{entry.port}"]
    for machine in ("compose.override.yaml", "compose.cpu.yaml", "compose.tiny.yaml", "compose.secrets.yaml"):
        assert set(yaml.safe_load((ROOT / machine).read_text())["services"]) == set(SERVICES), machine
    exposed = re.search(r"^EXPOSE (.+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert exposed and sorted(map(int, exposed.group(1).split())) == sorted(s.port for s in SERVICES.values())


def test_the_services_take_their_defaults_from_the_registry() -> None:
    for name, entry in SERVICES.items():
        cls = settings_cls(name)
        assert cls.service_env_prefix == entry.env_prefix
        assert cls.model_fields["port"].default == entry.port
        assert (ROOT / entry.script).is_file()


ENVIRONMENTS: list[dict[str, str]] = [
    {},
    {"EMBED_PORT": "7100"},
    {"SIGLIP2_PORT": "7200", "QWEN3_PORT": "7201"},
    {"SIGLIP2_PORT": "7300", "QWEN3_PORT": "7301", "EMBED_PORT": "7100", "EMBED_HOST": "0.0.0.0"},
    {"EMBED_HOST": "::1", "QWEN3_HOST": "127.0.0.2"},
]


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda env: ",".join(env) or "none")
def test_a_setting_reaches_every_reader_the_same_way(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The port and the host from the same environment: the service's settings, the Serve application's (its
    builder reads the environment where it runs), the registry (what start_all.sh asks), scripts/services.sh as
    the shell scripts see it, and the container's health probe (PID 1's argv and environment)."""
    for variable in ("EMBED_PORT", "EMBED_HOST", "SIGLIP2_PORT", "QWEN3_PORT", "SIGLIP2_HOST", "QWEN3_HOST"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    shell = subprocess.run(
        [
            "bash",
            "-c",
            "source scripts/services.sh; for n in ${SERVICE_NAMES[@]}; do "
            'echo "$n $(service_value PORT $n) $(service_value HOST $n)"; done',
        ],
        cwd=ROOT,
        env={**os.environ, "EMBED_LOG_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    seen_by_the_shell = {line.split()[0]: line.split()[1:] for line in shell.stdout.splitlines()}
    for name in SERVICES:
        service: Any = settings_cls(name)(model="unused")
        under_serve = settings_from_args(name, {"model": "unused"})
        host = setting_from_environment(name, "host", os.environ) or "127.0.0.1"
        assert service.port == under_serve.port == port_of(name, os.environ) == int(seen_by_the_shell[name][0])
        assert service.port == service_port(["/opt/venv/bin/python3", "-m", "x", name], dict(os.environ))
        assert service.host == under_serve.host == host == seen_by_the_shell[name][1]
    assert service_port(["x", "qwen3", "--port", "9999"], dict(os.environ)) == 9999
    assert service_port(["x"], {}) is None
