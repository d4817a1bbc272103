"""The standalone services against the same services on Ray Serve (cluster/serve.py), in one run on one machine.

    python -m bench.bench_cluster_serve [--rounds 3] --photos DIR [--clients 16] [--image-requests 240]

Four configurations run side by side for the whole run, each service measured alone in turn:

- standalone: ``siglip2_embed.py`` and ``qwen3_embed.py`` as uvicorn processes, as start_all.sh runs them;
- Serve, 1 replica: both applications on a local Ray (``ray.init`` timed), through Serve's proxy;
- front door, 1 replica: the same applications through the front door (``python -m cluster.front
  --front-door-only``, its own process, as on every node of a deployment) and then Serve's proxy;
- Serve, 2 replicas: the same with 2 replicas per application, sharing the same cores.

Loads: images (12 MP camera JPEGs and the 1920 px photos, multipart ``/embed/image``, 16 clients), short texts
(``/embed/text``, 32 clients), and one client's sequential requests (``/health``, one text) for the latency floor.
Each round measures every configuration once, in a rotating order, and the figures are medians over the rounds: the
machine may be shared, and its other load changes over minutes. Also printed: which process spent how much CPU per
request (where Serve's time goes), and Ray's processes and their memory.

Serve runs with the malloc settings that ``cluster.front`` gives it (``PROXY_ENV`` for the controller and its
proxies, ``REPLICA_ENV`` for the replicas); ``--proxy-malloc glibc-default`` leaves glibc's defaults everywhere, for
a run to compare against (each run's ratios are against its own standalone figures).

Models as in bench_images / bench_texts: ``tiny-512`` (SigLIP with the real 512 px input and preprocessing, a very
light tower) and ``tiny-zimage``, so that, as on a GPU box, the CPU's share is decoding and serving.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import torch
import yaml

from bench.bench_images import camera_jpegs
from bench.bench_texts import short_texts
from bench.loadgen import ROOT, LoadResult, free_port, post_file, post_json, run_load, server_process
from bench.models import bench_model

OUT = ROOT / "bench" / "out"
TICKS = os.sysconf("SC_CLK_TCK")


# -- processes, from /proc (no psutil here) ---------------------------------------------------------------------


@dataclass
class Proc:
    pid: int
    name: str
    cpu_s: float
    rss_mb: float


def descendants(root: int) -> list[Proc]:
    """Every process below ``root`` (Ray's processes are children of this one, its workers of the raylet)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent:
                found.append(pid)
                frontier.append(pid)
    return [proc for pid in found if (proc := read_proc(pid)) is not None]


def read_proc(pid: int) -> Proc | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    rss_kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return Proc(pid, short_name(cmdline), (int(fields[11]) + int(fields[12])) / TICKS, rss_kb / 1024)


def short_name(cmdline: str) -> str:
    """Ray names its worker processes ("ray::ProxyActor", "ray::ServeReplica:siglip2:siglip2"); others by program."""
    if cmdline.startswith("ray::"):
        return cmdline.split()[0].split(".")[0]  # the actor, not the method it runs now ("ray::ProxyActor.receive...")
    words = cmdline.split()
    program = next((Path(w).name for w in words if w.endswith(".py") or "/" not in w), Path(words[0]).name)
    for word in words:
        if word.endswith((".py", "gcs_server", "raylet")) or word.startswith("-m"):
            program = Path(word).name
            break
    return program if words else "?"


@contextmanager
def cpu_during(root: int) -> Iterator[dict[str, float]]:
    """CPU seconds each process below ``root`` used while the block ran (processes of the same name summed)."""
    before = {proc.pid: proc.cpu_s for proc in descendants(root)}
    usage: dict[str, float] = {}
    yield usage
    for proc in descendants(root):
        usage[proc.name] = usage.get(proc.name, 0.0) + proc.cpu_s - before.get(proc.pid, 0.0)


def cpu_line(usage: dict[str, float], result: LoadResult) -> str:
    """Server-side CPU milliseconds per request, by process, and the cores they kept busy."""
    requests = len(result.latencies)
    top = sorted(usage.items(), key=lambda item: -item[1])
    parts = ", ".join(f"{name} {seconds * 1000 / requests:.1f}" for name, seconds in top if seconds * 1000 >= requests)
    cores = sum(usage.values()) / result.seconds
    return f"CPU ms per request: {parts} ({cores:.2f} cores in all)"


# -- the loads ----------------------------------------------------------------------------------------------------


@dataclass
class Loads:
    twelve: list[tuple[str, bytes]]
    photos: list[tuple[str, bytes]]
    texts: list[str]
    clients: int
    image_requests: int
    text_requests: int


def image_load(url: str, label: str, datas: list[tuple[str, bytes]], loads: Loads) -> tuple[LoadResult, str]:
    async def one_image(session: aiohttp.ClientSession, index: int) -> int:
        name, data = datas[index % len(datas)]
        return await post_file(session, f"{url}/embed/image", "file", name, data)

    with cpu_during(os.getpid()) as usage:
        result = run_load(label, one_image, loads.clients, loads.image_requests)
    return result, cpu_line(usage, result)


def text_load(url: str, label: str, loads: Loads) -> tuple[LoadResult, str]:
    async def one_text(session: aiohttp.ClientSession, index: int) -> int:
        return await post_json(session, f"{url}/embed/text", {"text": loads.texts[index % len(loads.texts)]})

    with cpu_during(os.getpid()) as usage:
        result = run_load(label, one_text, 32, loads.text_requests)
    return result, cpu_line(usage, result)


def floor_latency(url: str, label: str) -> tuple[float, float]:
    """p50 of one client's sequential GET /health and POST /embed/text (one short text), in ms."""

    async def health(session: aiohttp.ClientSession, index: int) -> int:
        async with session.get(f"{url}/health") as response:
            await response.read()
            return response.status

    async def one_text(session: aiohttp.ClientSession, index: int) -> int:
        return await post_json(session, f"{url}/embed/text", {"text": "a cat"})

    results = [run_load(f"{label} {name}", call, 1, 200) for name, call in (("health", health), ("text", one_text))]
    p50s = [float(np.percentile(result.latencies, 50)) * 1000 for result in results]
    return p50s[0], p50s[1]


@dataclass
class Round:
    """One configuration's figures in one round."""

    images_12mp: LoadResult
    images_1920: LoadResult
    texts: LoadResult
    cpu_12mp: str  # which process spent the CPU during the 12 MP load
    cpu_texts: str


def measure(label: str, urls: dict[str, str], loads: Loads) -> Round:
    twelve, cpu_12mp = image_load(urls["siglip2"], f"{label}: 12 MP", loads.twelve, loads)
    photos, _ = image_load(urls["siglip2"], f"{label}: 1920 px", loads.photos, loads)
    texts, cpu_texts = text_load(urls["qwen3"], f"{label}: texts", loads)
    return Round(twelve, photos, texts, cpu_12mp, cpu_texts)


def start_standalone(stack: ExitStack, models: dict[str, Path], device: str) -> dict[str, str]:
    """Both services as processes of their own, as start_all.sh runs them."""
    urls = {}
    for name, script in (("siglip2", "siglip2_embed.py"), ("qwen3", "qwen3_embed.py")):
        port = free_port()
        command = [script, "--model", str(models[name]), "--device", device, "--log-level", "warning"]
        log = OUT / f"standalone-{name}.log"
        urls[name] = stack.enter_context(server_process([*command, "--port", str(port)], port, log))
    return urls


def deploy_on_serve(
    models: dict[str, Path], device: str, replicas: int, port: int, env: dict[str, str]
) -> dict[str, str]:
    """Both applications with ``replicas`` replicas each, under /NAME-xREPLICAS. Each application's replicas
    together reserve as many CPUs as the machine has (Ray is started with enough logical CPUs for all of them): like
    the standalone processes, each may use every core, and the loads run one service at a time. Ray sets a replica's
    torch threads to its whole CPUs, so 1 replica gets as many threads as a standalone process."""
    from ray import serve

    from cluster.serve import application

    cpus = float(os.cpu_count() or 1)
    gpus = 0.2 / replicas if device == "cuda" else 0.0  # every application on one GPU
    urls: dict[str, str] = {}
    for name in ("siglip2", "qwen3"):
        args = {"model": str(models[name]), "device": device, "log_level": "warning"}
        actor = {"num_cpus": cpus / replicas, "num_gpus": gpus, "runtime_env": {"env_vars": env}}
        app = application(name, args, num_replicas=replicas, ray_actor_options=actor)
        prefix = f"/{name}-x{replicas}"
        serve.run(app, name=prefix[1:], route_prefix=prefix)
        urls[name] = f"http://127.0.0.1:{port}{prefix}"
    return urls


def start_front_door(stack: ExitStack, models: dict[str, Path], device: str, serve_port: int) -> dict[str, str]:
    """The front door before the 1-replica applications (deployed by ``deploy_on_serve``), as ``python -m
    cluster.front --front-door-only`` runs it: a config naming them, and Serve's proxy on ``serve_port``."""
    port = free_port()
    applications = [
        {
            "name": f"{name}-x1",
            "route_prefix": f"/{name}-x1",
            "import_path": f"cluster.serve:{name}_app",
            "args": {"model": str(models[name]), "device": device, "log_level": "warning"},
        }
        for name in ("siglip2", "qwen3")
    ]
    config = OUT / "front_door_config.yaml"
    config.write_text(
        yaml.safe_dump({"http_options": {"host": "127.0.0.1", "port": port}, "applications": applications})
    )
    command = ["-m", "cluster.front", str(config), "--address", "auto", "--front-door-only"]
    command += ["--serve-port", str(serve_port), "--log-level", "warning"]
    log = OUT / "front-door.log"
    url = stack.enter_context(server_process(command, port, log, health_path="/siglip2-x1/health"))
    return {name: f"{url}/{name}-x1" for name in ("siglip2", "qwen3")}


def each_round(rates: dict[str, list[float]], numerator: str, denominator: str) -> str:
    """Each round's own ratio: the runs of a round are minutes apart at most."""
    return ", ".join(f"{n / d:.0%}" for n, d in zip(rates[numerator], rates[denominator], strict=True))


def summary_line(name: str, results: list[LoadResult], unit: str) -> str:
    rates = [result.rate for result in results]
    latencies = [np.percentile(result.latencies, q) * 1000 for q in (50, 99) for result in results]
    p50 = np.median(latencies[: len(results)])
    p99 = np.median(latencies[len(results) :])
    rounds = ", ".join(f"{rate:.1f}" for rate in rates)
    return f"{name:<22} {np.median(rates):8.1f} {unit}/s (rounds: {rounds})   p50 {p50:7.1f} ms   p99 {p99:7.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--photos",
        type=Path,
        required=True,
        help="a folder of real JPEG photos (the figures in bench/RESULTS.md: eight 1920 px camera photos)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--image-requests", type=int, default=240)
    parser.add_argument("--text-requests", type=int, default=960)
    parser.add_argument("--rounds", type=int, default=3, help="each configuration measured this many times, in turn")
    parser.add_argument("--object-store-mb", type=int, default=500)
    parser.add_argument(
        "--proxy-malloc",
        choices=["front-door", "glibc-default"],
        default="front-door",
        help="Serve's malloc settings: as cluster.front starts Serve (default), or glibc's defaults",
    )
    args = parser.parse_args()

    cache = OUT / "models"
    kinds = {"siglip2": "tiny-512", "qwen3": "tiny-zimage"}
    models = {name: bench_model(kind, cache, args.device) for name, kind in kinds.items()}
    loads = Loads(
        twelve=[(p.name, p.read_bytes()) for p in camera_jpegs(args.photos, OUT / "12mp")],
        photos=[(p.name, p.read_bytes()) for p in sorted(args.photos.glob("*.jpg"))],
        texts=short_texts(args.text_requests),
        clients=args.clients,
        image_requests=args.image_requests,
        text_requests=args.text_requests,
    )
    load_before = os.getloadavg()[0]

    import ray
    from ray import serve

    from cluster.front.config import PROXY_ENV, REPLICA_ENV

    as_front_door = args.proxy_malloc == "front-door"
    controller_options = {"runtime_env": {"env_vars": PROXY_ENV}} if as_front_door else None
    replica_env = REPLICA_ENV if as_front_door else {}
    with ExitStack() as stack:
        standalone_urls = start_standalone(stack, models, args.device)
        standalone_procs = descendants(os.getpid())
        started = time.perf_counter()
        ray.init(
            address="local",  # a new Ray, never one a file left by `ray start` names
            # Logical CPUs: four applications (two services, 1 and 2 replicas) reserve all cores each; see
            # deploy_on_serve. Ray would otherwise wait forever for CPUs to schedule the last replicas on.
            num_cpus=4 * (os.cpu_count() or 1),
            include_dashboard=False,
            object_store_memory=args.object_store_mb * 1024 * 1024,
            log_to_driver=False,
        )
        stack.callback(ray.shutdown)
        init_s = time.perf_counter() - started
        port = free_port()
        started = time.perf_counter()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, controller_options=controller_options)
        stack.callback(serve.shutdown)
        serve_start_s = time.perf_counter() - started
        ray_procs = [proc for proc in descendants(os.getpid()) if proc.pid not in {p.pid for p in standalone_procs}]
        idle = [proc for proc in ray_procs if not proc.name.startswith("ray::ServeReplica")]
        configurations = {
            "standalone": standalone_urls,
            "Serve, 1 replica": deploy_on_serve(models, args.device, 1, port, replica_env),
        }
        one_replica_procs = [p for p in descendants(os.getpid()) if p.pid not in {q.pid for q in standalone_procs}]
        configurations["front door, 1 replica"] = start_front_door(stack, models, args.device, port)
        configurations["Serve, 2 replicas"] = deploy_on_serve(models, args.device, 2, port, replica_env)

        rounds: dict[str, list[Round]] = {name: [] for name in configurations}
        floors: dict[str, list[tuple[float, float]]] = {name: [] for name in configurations}
        names = list(configurations)
        for index in range(args.rounds):
            # A different order each round: the machine's other load changes over time.
            for name in names[index % len(names) :] + names[: index % len(names)]:
                urls = configurations[name]
                rounds[name].append(measure(name, urls, loads))
                floors[name].append((floor_latency(urls["siglip2"], name)[0], floor_latency(urls["qwen3"], name)[1]))
    load_after = os.getloadavg()[0]

    lines = [
        f"models tiny-512 / tiny-zimage on {args.device}, {os.cpu_count()} CPUs; images: {args.clients} clients, "
        f"one image per request; texts: 32 clients, one text per request; {args.rounds} rounds, medians; "
        f"load average {load_before:.1f} before, {load_after:.1f} after"
    ]
    for label, attribute, unit in (
        ("12 MP", "images_12mp", "img"),
        ("1920 px", "images_1920", "img"),
        ("texts", "texts", "texts"),
    ):
        for name in names:
            lines.append(summary_line(f"{label}, {name}", [getattr(r, attribute) for r in rounds[name]], unit))
        rates = {name: [getattr(r, attribute).rate for r in rounds[name]] for name in names}
        alone, one, front, two = (float(np.median(rates[name])) for name in names)
        each = functools.partial(each_round, rates)
        lines.append(
            f"{label}: Serve 1 replica = {one / alone:.0%} of standalone (each round: "
            f"{each(names[1], names[0])}); front door = {front / one:.0%} of Serve 1 replica (each round: "
            f"{each(names[2], names[1])}); 2 replicas = {two / one:.2f}x 1 replica"
        )
    lines.append("")
    for name in names:
        health, text = (float(np.median([floor[i] for floor in floors[name]])) for i in (0, 1))
        lines.append(f"{name}: one client, sequential, p50: GET /health {health:.2f} ms, one text {text:.2f} ms")
        lines.append(f"    12 MP load, last round: {rounds[name][-1].cpu_12mp}")
        lines.append(f"    text load, last round: {rounds[name][-1].cpu_texts}")
    lines.append("")
    lines.append(f"ray.init {init_s:.1f} s, serve.start {serve_start_s:.1f} s; object store {args.object_store_mb} MB")
    lines.append(f"Serve's malloc settings: {args.proxy_malloc}")
    for label, procs in (
        ("standalone, both services", standalone_procs),
        ("Ray + Serve idle (no application)", idle),
        ("Ray + Serve, both applications, 1 replica each", one_replica_procs),
    ):
        total = sum(proc.rss_mb for proc in procs)
        parts = ", ".join(f"{proc.name} {proc.rss_mb:.0f}" for proc in sorted(procs, key=lambda p: -p.rss_mb))
        lines.append(f"{label}: {len(procs)} processes, RSS {total:.0f} MB in all ({parts})")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
