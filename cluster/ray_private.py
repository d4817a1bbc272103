"""The private parts of Ray this project uses, in one place. A Ray upgrade that moves one of them fails here, with a
message, and in tests/test_cluster_local.py, instead of silently changing what a command does.

* A local Ray on loopback (``local_ray_on_loopback``). Ray binds a node's servers to the node's address, and resolves
  a loopback address to the machine's reachable one (``ray.init(_node_ip_address="127.0.0.1")`` does not keep a node
  local); some of its agents bind every interface besides. Ray keeps a node on loopback only where it supports no
  cluster (Windows, macOS), by a switch that other systems honour too: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes
  the node's address 127.0.0.1. The processes ``ray.init`` starts read it from their environment; the driver, which
  imported Ray already, reads it from ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``, read when Ray is imported.
* Serve started and a config deployed as ``serve run CONFIG`` does, returning at once (``deploy``): Serve's public
  ``serve.run`` takes built applications, not a config's schema with its http and controller options.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from common.api.middleware import is_loopback

logger = logging.getLogger(__name__)

# Ray's switch for a local-only node (ray._private.ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR).
LOCAL_ONLY_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def local_ray_on_loopback() -> Iterator[None]:
    """Around the ``ray.init`` that starts a local Ray: its node's address is 127.0.0.1, so its servers (GCS, raylet,
    dashboard, agents, metrics, every worker) listen on loopback alone. Only for a Ray this process starts: a driver
    that joins a cluster must not change how the cluster listens. The processes started meanwhile keep the switch in
    their environment (the workers the raylet starts later inherit it); this process's is put back afterwards."""
    from ray._private import ray_constants

    if getattr(ray_constants, "ENABLE_RAY_CLUSTERS_ENV_VAR", None) != LOCAL_ONLY_VARIABLE or not hasattr(
        ray_constants, "ENABLE_RAY_CLUSTER"
    ):
        raise RuntimeError(
            f"this Ray ({_ray_version()}) has no ray_constants.ENABLE_RAY_CLUSTER switch named {LOCAL_ONLY_VARIABLE}: "
            "cluster/ray_private.py cannot keep a local Ray on loopback; pin the Ray of requirements-cluster.txt"
        )
    saved_variable, saved_constant = os.environ.get(LOCAL_ONLY_VARIABLE), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOCAL_ONLY_VARIABLE] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved_variable is None:
            os.environ.pop(LOCAL_ONLY_VARIABLE, None)
        else:
            os.environ[LOCAL_ONLY_VARIABLE] = saved_variable
    import ray

    if ray.is_initialized() and not is_loopback(ray.util.get_node_ip_address()):
        logger.warning(
            "the local Ray's node address is %s, not loopback: its servers can be reached from other machines "
            "(token authentication still guards them)",
            ray.util.get_node_ip_address(),
        )


def deploy(config: dict[str, Any]) -> None:
    """Start Serve and deploy the config, as ``serve run CONFIG`` does (through the same calls; returns at once)."""
    from ray.serve._private.api import serve_start
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
        controller_options=schema.controller_options,
    )
    client.deploy_apps(schema, _blocking=False)


def _ray_version() -> str:
    import ray

    return f"Ray {ray.__version__}"
