"""What a config's replicas ask of the cluster, and why a cluster cannot give it: Serve would wait for missing CPUs or
GPUs forever, saying so only in its own logs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ResourceAsk:
    application: str
    replicas: int
    cpus: float  # per replica
    gpus: float


def resource_asks(config: Mapping[str, Any]) -> list[ResourceAsk]:
    """What each application's replicas reserve at start: replicas (the initial or minimum count when autoscaled)
    times their ``ray_actor_options`` (Serve's default: 1 CPU, no GPU)."""
    asks = []
    for app in config.get("applications") or []:
        for deployment in app.get("deployments") or [{}]:
            autoscaling = deployment.get("autoscaling_config") or {}
            replicas = deployment.get("num_replicas", 1)
            if autoscaling or not isinstance(replicas, int):
                replicas = autoscaling.get("initial_replicas") or autoscaling.get("min_replicas", 1)
            options = deployment.get("ray_actor_options") or {}
            cpus = options.get("num_cpus")
            asks.append(
                ResourceAsk(
                    app.get("name", "default"),
                    int(replicas),
                    1.0 if cpus is None else float(cpus),
                    float(options.get("num_gpus") or 0.0),
                )
            )
    return asks


def missing_resources(asks: Sequence[ResourceAsk], cluster: Mapping[str, float], config_name: str) -> str | None:
    """Why the cluster cannot start every replica the config asks for, or None when it can."""
    problems = []
    for resource, unit, per_replica in (("GPU", "GPU", "gpus"), ("CPU", "CPU", "cpus")):
        wanted = sum(ask.replicas * getattr(ask, per_replica) for ask in asks)
        have = float(cluster.get(resource, 0.0))
        if wanted > have + 1e-9:
            details = ", ".join(
                f"{ask.application}: {ask.replicas} x {getattr(ask, per_replica):g} {unit}"
                for ask in asks
                if getattr(ask, per_replica)
            )
            problems.append(f"{wanted:g} {unit}s ({details}) and the Ray cluster has {have:g}")
    if not problems:
        return None
    return (
        f"{config_name} asks for {' and '.join(problems)}: Serve would wait for them forever. On a machine without a "
        "GPU run `python -m cluster.front cluster/serve_config_cpu.yaml`; otherwise lower num_replicas, num_cpus or "
        "num_gpus in the config, or add nodes (with an autoscaler that adds them: --no-resource-check)"
    )
