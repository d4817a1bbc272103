"""The Ray Data bulk import against the standalone indexer + image service, over the same folder, on this machine.

    python -m bench.bench_cluster_index [--model tiny-512|so400m|PATH] [--photos 800] [--size 1600x1200]
        [--rounds 3] [--batch-size 32] [--cpus-per-actor 1]

Generates the photos once (smooth gradients plus noise, baseline JPEGs, quality 90, in two folders) under
bench/out/, starts siglip2_embed.py (timed to /health 200) and a local Ray as the job does (``ray.init(address=
"local", include_dashboard=False)``; timed, with what it costs while idle: processes, PSS, CPU), warms both up on 8
photos, then alternates ``--rounds`` runs of the standalone indexer (``index_folder``, 4 requests in flight, as
``python -m embed_client index``) and of the Ray job (``cluster.index_images.run``), each into a new output, and
ends with a Ray rerun that has nothing to do. Then, with the service stopped, it times the command line once as a
user runs it: a new process that starts its own Ray. Prints the median times and their ratio (above 1: the Ray job
is faster), with and without each side's start-up, the phases of the median Ray run and of the command line, and
checks that both outputs hold the same vectors. The job's log (the DEBUG level of ``cluster``) has Ray Data's
per-operator statistics.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from bench.loadgen import ROOT, free_port, server_process
from bench.models import add_model_arguments, model_from_arguments
from cluster.index_images import Summary
from tests.helpers import image_bytes, photo_like

OUT = ROOT / "bench" / "out"
TICKS = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")


def make_photos(folder: Path, count: int, width: int, height: int) -> Path:
    """``count`` photo-like JPEGs in two sub-folders (made once, kept between runs)."""
    for index in range(count):
        path = folder / f"set{index % 2}" / f"photo-{index:05d}.jpg"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(image_bytes(photo_like(width, height, seed=index), "JPEG", quality=90))
    return folder


# -- processes, from /proc ------------------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # the fields after the command name, which may hold spaces


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def pss_mib(pids: list[int]) -> float:
    """Proportional set size: each shared page split among the processes that map it, so the sum is what the
    processes cost together (a plain RSS sum counts the shared libraries of every process again)."""
    total = 0
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:")), 0)
    return total / 1024


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        if (fields := _stat(pid)) is not None:
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / TICKS


@dataclass
class Peak:
    processes: int = 0
    pss_mib: float = 0.0


def sample_peak(processes: Callable[[], list[int]], stop: threading.Event, peak: Peak) -> None:
    while not stop.wait(0.5):
        pids = processes()
        peak.processes = max(peak.processes, len(pids))
        peak.pss_mib = max(peak.pss_mib, pss_mib(pids))


# -- the two sides --------------------------------------------------------------------------------------------------


def timed(function: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


@contextmanager
def sampling(pids: Callable[[], list[int]]) -> Iterator[Peak]:
    """The peak number and PSS of the processes ``pids()`` names, while the block runs."""
    peak, stop = Peak(), threading.Event()
    sampler = threading.Thread(target=sample_peak, args=(pids, stop, peak), daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()


def index_standalone(url: str, folder: Path, out: Path, concurrency: int) -> float:
    """The standalone indexer into a new parquet file; seconds."""
    from embed_client import EmbedClient, index_folder

    out.unlink(missing_ok=True)
    shutil.rmtree(out.with_name(out.name + ".parts"), ignore_errors=True)
    with EmbedClient(url) as client:
        seconds, summary = timed(lambda: index_folder(folder, out, client, concurrency=concurrency, progress=False))
    assert not summary.failed
    return seconds


def index_on_ray(folder: Path, out: Path, model: Path, args: argparse.Namespace) -> Summary:
    """The Ray Data job into a new folder (Ray already started)."""
    from cluster.index_images import run
    from siglip2_embed import Siglip2Settings

    shutil.rmtree(out, ignore_errors=True)
    settings = Siglip2Settings(model=str(model), device=args.device)
    summary = run(str(folder), str(out), settings, batch_size=args.batch_size, cpus_per_actor=args.cpus_per_actor)
    assert summary.failed == 0
    return summary


def start_ray() -> tuple[float, list[str]]:
    """ray.init as the job does it (a new local Ray without a dashboard), and what Ray costs idle."""
    import ray

    before = set(descendants(os.getpid()))
    init_s, _ = timed(lambda: ray.init(address="local", include_dashboard=False))
    time.sleep(5)  # let the start-up settle before measuring the idle cost
    ray_pids = [pid for pid in descendants(os.getpid()) if pid not in before]
    cpu_before = cpu_seconds(ray_pids)
    time.sleep(10)
    idle_cores = (cpu_seconds(ray_pids) - cpu_before) / 10
    return init_s, [
        f"ray.init (a new local Ray, as the job starts it): {init_s:.1f} s; then "
        f"{len(ray_pids)} processes, PSS {pss_mib(ray_pids):.0f} MiB in all, {idle_cores:.2f} cores busy while idle"
    ]


def warm_up_folder(photos: Path) -> Path:
    """8 of the photos elsewhere: a first run of each side warms up what later runs share (Ray's worker processes,
    the service its first batch shapes, the page cache the libraries)."""
    folder = OUT / "cluster-bench" / "warm-up"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for path in sorted((photos / "set0").glob("*.jpg"))[:8]:
        shutil.copy(path, folder / path.name)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, tiny="tiny-512", full_size="so400m")
    parser.add_argument("--photos", type=int, default=800, help="how many photos (default 800)")
    parser.add_argument("--size", default="1600x1200", help="photo size WxH (default 1600x1200)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side, alternating (default 3)")
    parser.add_argument("--batch-size", type=int, default=32, help="the Ray job's --batch-size (default 32)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="the Ray job's --cpus-per-actor")
    parser.add_argument("--concurrency", type=int, default=4, help="the standalone indexer's requests in flight")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("cluster").setLevel(logging.DEBUG)  # the job's phases and Ray Data's per-operator stats

    import ray

    model = model_from_arguments(args)
    width, height = (int(n) for n in args.size.split("x"))
    photos = make_photos(OUT / f"cluster-photos-{args.photos}-{args.size}", args.photos, width, height)
    bench_out = OUT / "cluster-bench"
    bench_out.mkdir(parents=True, exist_ok=True)
    warm_up = warm_up_folder(photos)
    load_before = os.getloadavg()[0]
    port = free_port()
    command = ["siglip2_embed.py", "--model", str(model), "--device", args.device, "--log-level", "warning"]
    standalone_s: list[float] = []
    # CPU seconds per round: the service process, this process while it runs the indexer (the client), this
    # process while it runs the Ray job (the driver). The Ray workers' CPU is in Ray Data's statistics (the log).
    service_cpu: list[float] = []
    client_cpu: list[float] = []
    driver_cpu: list[float] = []
    jobs: list[Summary] = []
    started = time.perf_counter()
    with server_process([*command, "--port", str(port)], port, bench_out / "service.log") as url:
        service_start_s = time.perf_counter() - started
        service = descendants(os.getpid())
        init_s, lines = start_ray()
        index_standalone(url, warm_up, bench_out / "warm-up.parquet", args.concurrency)
        index_on_ray(warm_up, bench_out / "warm-up-index", model, args)
        # Alternating, so that load from other work on the machine falls on both sides alike.
        ray_peaks: list[Peak] = []
        with sampling(lambda: service) as service_peak:
            for _ in range(args.rounds):
                cpu_before = (cpu_seconds(service), time.process_time())
                standalone_s.append(index_standalone(url, photos, bench_out / "standalone.parquet", args.concurrency))
                service_cpu.append(cpu_seconds(service) - cpu_before[0])
                client_cpu.append(time.process_time() - cpu_before[1])
                driver_before = time.process_time()
                with sampling(lambda: [pid for pid in descendants(os.getpid()) if pid not in service]) as ray_peak:
                    jobs.append(index_on_ray(photos, bench_out / "ray-index", model, args))
                driver_cpu.append(time.process_time() - driver_before)
                ray_peaks.append(ray_peak)
        rerun = index_on_ray_again(photos, bench_out / "ray-index", model)
        ray.shutdown()
    cold_s, cold = command_line_run(photos, bench_out / "ray-index-cold", model, args)

    job_s = [job.seconds for job in jobs]
    median_standalone, median_job = float(np.median(standalone_s)), float(np.median(job_s))
    middle = jobs[int(np.argsort(job_s)[len(job_s) // 2])]
    lines = [
        f"{args.photos} photos {args.size}, model {args.random_weights or args.model} on {args.device}, "
        f"{os.cpu_count()} cores; Ray: --batch-size {args.batch_size} --cpus-per-actor {args.cpus_per_actor}; "
        f"indexer: --concurrency {args.concurrency}; load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after (other work on the machine)",
        f"standalone: service start {service_start_s:.1f} s, peak PSS {service_peak.pss_mib:.0f} MiB; indexer runs "
        f"{', '.join(f'{s:.1f}' for s in standalone_s)} s: median {median_standalone:.1f} s "
        f"({args.photos / median_standalone:.1f} img/s); CPU per image: service "
        f"{np.median(service_cpu) / args.photos * 1000:.1f} ms, indexer (client) "
        f"{np.median(client_cpu) / args.photos * 1000:.1f} ms",
        *lines,
        f"Ray job runs {', '.join(f'{s:.1f}' for s in job_s)} s: median {median_job:.1f} s "
        f"({args.photos / median_job:.1f} img/s); at most {max(p.processes for p in ray_peaks)} Ray processes, PSS "
        f"{max(p.pss_mib for p in ray_peaks):.0f} MiB in all (driver not included); driver CPU per image "
        f"{np.median(driver_cpu) / args.photos * 1000:.1f} ms",
        f"  phases of the median run, seconds from its start: {middle.phases}",
        f"  rerun with nothing to do: {rerun.seconds:.2f} s, skipped {rerun.skipped}",
        f"ratio, both sides started: {median_standalone / median_job:.2f}x "
        f"(indexer {median_standalone:.1f} s / Ray job {median_job:.1f} s; above 1: the Ray job is faster)",
        f"ratio, with start-up: {(service_start_s + median_standalone) / (init_s + median_job):.2f}x "
        f"(service start + indexer {service_start_s + median_standalone:.1f} s / ray.init + job "
        f"{init_s + median_job:.1f} s)",
        f"the command line, cold (a new process and a new Ray, as a user runs it): {cold_s:.1f} s wall; the job's "
        f"phases {cold['phases']}; against service start + indexer: "
        f"{(service_start_s + median_standalone) / cold_s:.2f}x",
        f"same vectors: lowest cosine between the two outputs {lowest_cosine():.6f}",
    ]
    print("\n".join(lines))


def index_on_ray_again(photos: Path, out: Path, model: Path) -> Summary:
    from cluster.index_images import run
    from siglip2_embed import Siglip2Settings

    summary = run(str(photos), str(out), Siglip2Settings(model=str(model)))
    assert summary.embedded == 0
    return summary


def command_line_run(photos: Path, out: Path, model: Path, args: argparse.Namespace) -> tuple[float, dict[str, Any]]:
    """``python -m cluster.index_images`` in a new process, as a user runs it (its own new Ray): wall seconds, and the
    phases it logged."""
    shutil.rmtree(out, ignore_errors=True)
    command = [
        *(sys.executable, "-m", "cluster.index_images", str(photos), "--out", str(out), "--model", str(model)),
        *("--device", args.device, "--batch-size", str(args.batch_size)),
        *("--cpus-per-actor", str(args.cpus_per_actor)),
    ]
    seconds, result = timed(lambda: subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True))
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["embedded"] == args.photos, summary
    logged = [line for line in result.stderr.splitlines() if "phases (seconds from the start)" in line]
    phases = ast.literal_eval(logged[-1].split(": ", 2)[-1]) if logged else {}
    return seconds, {"phases": phases, **summary}


def lowest_cosine() -> float:
    import pyarrow.parquet as pq

    def vectors(path: Path) -> dict[str, np.ndarray]:
        table = pq.read_table(path)
        matrix = table.column("vector").combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
        return dict(zip(table.column("path").to_pylist(), matrix, strict=True))

    standalone = vectors(OUT / "cluster-bench" / "standalone.parquet")
    on_ray = vectors(OUT / "cluster-bench" / "ray-index")  # OUT_DIR is the dataset of the vectors
    assert standalone.keys() == on_ray.keys()
    return min(float(standalone[path] @ on_ray[path]) for path in standalone)


if __name__ == "__main__":
    main()
