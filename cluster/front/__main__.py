"""``python -m cluster.front CONFIG``: Ray Serve with that config, its proxy on loopback, and the front door on the
config's ``http_options`` address. Start-up checks fail within seconds with a message (not this project's
applications, bad settings, fewer CPUs or GPUs than the replicas ask for, the port in use); until every application
has run, a replica that cannot start for good stops both with its own message (cluster/startup_watch.py). SIGINT,
SIGTERM or SIGHUP drain the front door, then shut Serve down; ``--front-door-only`` leaves Serve running."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from cluster.front.app import FrontDoor
from cluster.front.config import FrontedApp, front_door_settings, fronted_apps, serve_config_behind, with_models
from cluster.front.forward import Upstream
from cluster.front.health import ServeStatus
from cluster.front.resources import missing_resources, resource_asks
from cluster.permanent import MARK
from cluster.ray_private import deploy, local_ray_on_loopback
from cluster.startup_watch import StartupWatch
from cluster.tiny import tiny_banner, tiny_models
from common.server import configure_logging, limited_server, warn_if_keyless

logger = logging.getLogger("cluster.front")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.front",
        description="Start Ray Serve with a config file, and the front door (the standalone services' HTTP limits "
        "and checks) on the config's http_options address; Ctrl-C or SIGTERM stops both.",
    )
    parser.add_argument("config", type=Path, help="a Serve config file, e.g. cluster/serve_config.yaml")
    parser.add_argument(
        "--address",
        help="an existing Ray cluster (auto, HOST:6379); default RAY_ADDRESS, else a local Ray started for the front "
        "door, every server of it on loopback",
    )
    parser.add_argument(
        "--serve-port", type=int, help="the port of Serve's proxy, on loopback (default: http_options.port + 1)"
    )
    parser.add_argument(
        "--front-door-only",
        action="store_true",
        help="start only the front door, before the Serve proxy already running on this node (another node of "
        "the cluster, started with the same config and --serve-port)",
    )
    parser.add_argument(
        "--no-resource-check",
        action="store_true",
        help="deploy even if the cluster has fewer CPUs or GPUs than the replicas ask for (an autoscaling cluster)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="run the applications on tiny random-weight models (built once under .cache/tiny-models/, as "
        "./start_all.sh --tiny): MEANINGLESS vectors, only for trying the commands",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    if args.front_door_only and not args.address:
        parser.error("--front-door-only needs --address: the Ray cluster whose Serve proxy it stands before")
    return args


def listening_socket(host: str, port: int) -> socket.socket:
    """The front door's socket, bound before anything is deployed: a port in use fails the command at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"the front door cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = yaml.safe_load(args.config.read_text())
        if args.tiny:
            config = with_models(config, tiny_models())
        apps = fronted_apps(config)
    except (OSError, yaml.YAMLError, ValueError) as exc:
        logger.error("%s: %s", args.config, exc)
        return 2
    if args.tiny:
        logger.warning("%s", tiny_banner("these applications run"))
    http_options = config.get("http_options") or {}
    host, port = str(http_options.get("host", "127.0.0.1")), int(http_options.get("port", 8000))
    warn_if_keyless(host, keyless=any(app.settings.api_key is None for app in apps))

    import ray

    address = args.address or os.environ.get("RAY_ADDRESS")
    join_ray(address)
    try:
        if not args.front_door_only and not args.no_resource_check:
            problem = missing_resources(resource_asks(config), ray.cluster_resources(), str(args.config))
            if problem is not None:
                logger.error("%s", problem)
                return 1
        try:
            sock = listening_socket(host, port)
        except OSError as exc:
            logger.error("%s", exc)
            return 1
        try:
            return serve_until_stopped(args, config, apps, sock, host, port, own_ray=not address)
        finally:
            sock.close()
    finally:
        ray.shutdown()


def join_ray(address: str | None) -> None:
    import ray

    if address:
        ray.init(address=address, namespace="serve")  # a cluster listens as it was started
    else:
        # "local": a Ray of the front door's own, never one that a file left by `ray start` names
        with local_ray_on_loopback():
            ray.init(address="local", namespace="serve")


def serve_until_stopped(
    args: argparse.Namespace,
    config: dict[str, Any],
    apps: list[FrontedApp],
    sock: socket.socket,
    host: str,
    port: int,
    own_ray: bool,
) -> int:
    """Deploy (unless --front-door-only), serve on ``sock`` until a stop signal or a replica that cannot start,
    then shut Serve down; the exit code. ``own_ray``: the Ray is the front door's own (it ends with it)."""
    from ray import serve

    serve_port = args.serve_port or port + 1
    if not args.front_door_only:
        deploy(serve_config_behind(config, serve_port, host))
    failed: list[str] = []  # the application whose replicas cannot start (StartupWatch)
    try:
        server = limited_server(
            FrontDoor(apps, Upstream(f"http://127.0.0.1:{serve_port}"), ServeStatus()),
            front_door_settings(apps, host, port),
            runtime=None,
        )

        def cannot_start(application: str, reason: str) -> None:
            logger.error(
                "application %s: a replica %s%s\n(an application's model is `model` in its args in %s, or "
                "SIGLIP2_MODEL / QWEN3_MODEL; --tiny tries the commands on tiny random-weight models)",
                application,
                MARK,
                reason,
                args.config,
            )
            failed.append(application)
            server.should_exit = True  # stops as a stop signal does: the front door, then Serve

        watch = StartupWatch([app.name for app in apps], cannot_start)
        if not args.front_door_only:
            watch.start()
        logger.info(
            "front door on http://%s:%d (%s), Serve's proxy on 127.0.0.1:%d",
            host if ":" not in host else f"[{host}]",
            port,
            ", ".join(app.route_prefix for app in apps),
            serve_port,
        )
        if args.tiny:
            logger.warning("%s", tiny_banner("these applications run"))
        try:
            server.run(sockets=[sock])
        finally:
            watch.stop()
    finally:
        if failed and own_ray:
            # Nothing was served, and the Ray ends with this process, Serve in it: its graceful shutdown would only
            # wait 20-30 s for replicas that keep failing.
            logger.info("stopping Serve with the front door's own Ray")
        elif not args.front_door_only:
            logger.info("stopping Serve")
            serve.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
