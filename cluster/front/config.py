"""The front door's view of a Serve config: this project's applications with their settings (validated as their
builders validate them), the server's own settings, and the config Serve runs behind the front door."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.serve import settings_from_args
from common.api.middleware import is_loopback
from common.config import ServiceSettings
from common.services import SERVICES

# The builders of this project's applications, and the service each one serves.
BUILDERS = {f"cluster.serve:{name}_app": name for name in SERVICES}


@dataclass(frozen=True)
class FrontedApp:
    """One application of the config, as the front door needs it."""

    name: str  # Serve's application name
    route_prefix: str
    service: str  # "siglip2" or "qwen3": the deployment's name too
    settings: ServiceSettings


def fronted_apps(config: Mapping[str, Any]) -> list[FrontedApp]:
    """The config's applications with their settings, validated as their builders validate them (ValueError)."""
    apps = []
    for app in config.get("applications") or []:
        name, import_path = app.get("name", "default"), app.get("import_path", "")
        if import_path not in BUILDERS:
            raise ValueError(
                f"application {name!r}: the front door knows only this project's applications "
                f"({', '.join(BUILDERS)}), not {import_path!r}"
            )
        service = BUILDERS[import_path]
        settings = settings_from_args(service, app.get("args") or {})
        apps.append(FrontedApp(name, str(app.get("route_prefix", "/")).rstrip("/") or "/", service, settings))
    if not apps:
        raise ValueError("the config has no applications")
    return apps


def with_models(config: Mapping[str, Any], folders: Mapping[str, Path]) -> dict[str, Any]:
    """The config with each of this project's applications on the model folder of its service (``--tiny``), in
    place of any ``model`` its args name."""
    changed = copy.deepcopy(dict(config))
    for app in changed.get("applications") or []:
        service = BUILDERS.get(app.get("import_path", ""))
        if service is not None and service in folders:
            args = app.get("args") or {}
            kept = {key: value for key, value in args.items() if key.removeprefix("--").replace("-", "_") != "model"}
            app["args"] = {**kept, "model": str(folders[service])}
    return changed


def front_door_settings(apps: Sequence[FrontedApp], host: str, port: int) -> ServiceSettings:
    """The server's own settings: its address, and of each connection setting the largest any application sets."""
    settings = [app.settings for app in apps]
    return settings[0].model_copy(
        update={
            "host": host,
            "port": port,
            "max_connections": max(s.max_connections for s in settings),
            "max_header_bytes": max(s.max_header_bytes for s in settings),
            "header_timeout_s": max(s.header_timeout_s for s in settings),
            "shutdown_timeout_s": max(s.shutdown_timeout_s for s in settings),
        }
    )


# glibc's malloc settings for Serve's controller and the proxies it starts, which inherit its environment: with
# glibc's default mmap threshold the proxy kept large uploads' memory (it receives a body in pieces of up to 256 KiB);
# with a fixed one it hands it back. The replicas inherit it too and get glibc's default back, which a forward pass on
# the CPU runs faster with (they trim after large bodies themselves). Measured: bench/RESULTS.md, "glibc's malloc".
PROXY_ENV = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}
REPLICA_ENV = {"GLIBC_TUNABLES": ""}


def serve_config_behind(config: Mapping[str, Any], serve_port: int, front_host: str) -> dict[str, Any]:
    """The config Serve runs: its proxy on loopback at ``serve_port``, with ``PROXY_ENV`` (the replicas with
    ``REPLICA_ENV``) unless the config sets those variables itself. The replicas see every request coming from
    the front door over loopback, so when the front door listens elsewhere without ``allowed_hosts``, the names it
    accepts (any, as a standalone service there does) are accepted by the replicas too: the front door checked."""
    serve_config = copy.deepcopy(dict(config))
    serve_config["http_options"] = {**(config.get("http_options") or {}), "host": "127.0.0.1", "port": serve_port}
    serve_config["controller_options"] = with_env_defaults(config.get("controller_options"), PROXY_ENV)
    serve_config["applications"] = [with_env_defaults(app, REPLICA_ENV) for app in serve_config["applications"]]
    if not is_loopback(front_host):
        for app in serve_config["applications"]:
            args = app.setdefault("args", {})
            if not any(key.replace("-", "_").removeprefix("__") == "allowed_hosts" for key in args):
                args["allowed_hosts"] = ["*"]
    return serve_config


def with_env_defaults(options: Mapping[str, Any] | None, env: Mapping[str, str]) -> dict[str, Any]:
    """``options`` of a Serve config (an application, ``controller_options``) with ``env`` in their
    ``runtime_env``, where they set none of those names."""
    runtime_env = dict((options or {}).get("runtime_env") or {})
    runtime_env["env_vars"] = {**env, **(runtime_env.get("env_vars") or {})}
    return {**(options or {}), "runtime_env": runtime_env}
