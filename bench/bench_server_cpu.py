"""Server CPU per one-text request: the server process's own CPU time (user + system, all its threads, from
``/proc/PID/stat``) over a run of N requests, divided by N; the text service against the naive baseline, in one run.

    python -m bench.bench_server_cpu [--rounds 3] [--requests 2000] [--clients 32] [--compare DIR ...]

The servers are started once and kept for the whole run; each round measures every server once, in a rotating
order (the machine may be shared, and its other load changes over minutes):

- the naive baseline (``bench/naive_servers.py texts``: one request, one tokenizer call, one forward pass);
- ``qwen3_embed.py`` of this checkout, as ``start_all.sh`` runs it (log level info, the access log into a file);
- the framework's floor (``bench/naive_servers.py floor``: FastAPI and uvicorn with nothing of ours, no model):
  what any FastAPI text route costs at least, so that the main thread's figure splits into the framework's and ours;
- with ``--compare DIR``, ``qwen3_embed.py`` of another checkout of this repository (an earlier commit in a git
  worktree: ``git worktree add /tmp/before COMMIT``), run the same way.

Two loads: ``--clients`` concurrent clients, one 3-16 word text per request to ``/embed/text`` (the batcher gathers
them into shared forward passes, as under real load), and one client sending one request at a time ("sequential":
every request its own forward pass). The model is ``tiny-zimage``, so that the figure is the serving path's cost,
which bounds the requests a core serves per second on a GPU box, and not the forward pass's.
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.bench_texts import short_texts
from bench.loadgen import ROOT, free_port, post_json, process_cpu_seconds, run_load, run_load_once, started_server
from bench.models import bench_model

OUT = ROOT / "bench" / "out"
BASELINE = "naive baseline"
FLOOR = "framework floor (no model)"
OURS = "qwen3_embed.py"


@dataclass(frozen=True)
class Measured:
    cpu_ms: float  # server CPU per request, all threads
    main_ms: float  # of which the main thread's: the event loop (HTTP, middlewares, routing, validation, replies)
    server_cores: float  # the server's CPU seconds per second of the run
    rate: float  # requests per second
    client_cores: float  # the load generator's
    errors: int


def measure(name: str, url: str, pid: int, texts: list[str], clients: int, requests: int) -> Measured:
    async def one_text(session: aiohttp.ClientSession, index: int) -> int:
        return await post_json(session, f"{url}/embed/text", {"text": texts[index % len(texts)]})

    process_before, main_before = process_cpu_seconds(pid)
    result = run_load_once(name, one_text, clients, requests)
    process_after, main_after = process_cpu_seconds(pid)
    used, main = process_after - process_before, main_after - main_before
    return Measured(
        used * 1000 / requests,
        main * 1000 / requests,
        used / result.seconds,
        result.rate,
        result.client_cpu,
        result.errors,
    )


def warm_up(url: str, texts: list[str], clients: int) -> None:
    async def one_text(session: aiohttp.ClientSession, index: int) -> int:
        return await post_json(session, f"{url}/embed/text", {"text": texts[index % len(texts)]})

    run_load("warm-up", one_text, clients, clients * 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-zimage", help="a model folder, or tiny-zimage (built here)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2000, help="per server, round and concurrent load")
    parser.add_argument("--sequential-requests", type=int, default=400, help="per server and round, one at a time")
    parser.add_argument(
        "--baseline-share", type=float, default=0.25, help="the baseline's requests as a share of the others'"
    )
    parser.add_argument("--compare", type=Path, action="append", default=[], help="another checkout's qwen3_embed.py")
    args = parser.parse_args()

    model = Path(args.model) if Path(args.model).is_dir() else bench_model(args.model, OUT / "models", args.device)
    texts = short_texts(args.requests)
    ours = ["qwen3_embed.py", "--model", str(model), "--device", args.device]
    commands: dict[str, tuple[list[str], Path]] = {
        BASELINE: (["-m", "bench.naive_servers", "texts", "--model", str(model), "--device", args.device], ROOT),
        OURS: (ours, ROOT),
        FLOOR: (["-m", "bench.naive_servers", "floor"], ROOT),
    }
    compared = {f"{OURS} at {checkout}": checkout.resolve() for checkout in args.compare}
    commands.update({name: (ours, checkout) for name, checkout in compared.items()})
    OUT.mkdir(parents=True, exist_ok=True)

    loads = {"concurrent": args.clients, "sequential": 1}
    results: dict[tuple[str, str], list[Measured]] = {}
    with ExitStack() as stack:
        servers = {}
        for index, (name, (command, cwd)) in enumerate(commands.items()):
            port = free_port()
            log = OUT / f"server-cpu-{index}.log"
            extra = ["--log-file", str(OUT / f"server-cpu-{index}.service.log")] if command is ours else []
            servers[name] = stack.enter_context(
                started_server([*command, "--port", str(port), *extra], port, log, cwd=cwd)
            )
            warm_up(servers[name].url, texts, args.clients)
        names = list(servers)
        for round_index in range(args.rounds):
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for load, clients in loads.items():
                for name in order:
                    requests = args.requests if clients > 1 else args.sequential_requests
                    if name == BASELINE:
                        requests = max(clients * 4, int(requests * args.baseline_share))
                    server = servers[name]
                    measured = measure(name, server.url, server.pid, texts, clients, requests)
                    results.setdefault((load, name), []).append(measured)
                    print(
                        f"round {round_index + 1} {load:<10} {name:<40} {measured.cpu_ms:6.3f} ms CPU per request "
                        f"(main thread {measured.main_ms:.3f})  {measured.rate:7.1f} requests/s  "
                        f"server {measured.server_cores:.2f} cores  "
                        f"load generator {measured.client_cores:.2f} cores  errors {measured.errors}",
                        flush=True,
                    )

    print(f"\nmodel {args.model} on {args.device}; server CPU ms per one-text request, median of {args.rounds} rounds")
    for load, clients in loads.items():
        print(f"{load} ({clients} client{'s' if clients > 1 else ''}):")
        baseline = [m.cpu_ms for m in results[(load, BASELINE)]]
        for name in names:
            figures = [m.cpu_ms for m in results[(load, name)]]
            main_thread = statistics.median(m.main_ms for m in results[(load, name)])
            rounds = ", ".join(f"{f:.3f}" for f in figures)
            ratios = ", ".join(f"{f / b:.3f}" for f, b in zip(figures, baseline, strict=True))
            print(
                f"  {name:<40} {statistics.median(figures):6.3f} ms (rounds {rounds}; main thread {main_thread:.3f}); "
                f"/ baseline of the same round: {ratios}"
            )
        floor = statistics.median(m.main_ms for m in results[(load, FLOOR)])
        ours_main = statistics.median(m.main_ms for m in results[(load, OURS)])
        print(f"  {OURS}'s main thread beyond the framework's floor: {ours_main - floor:.3f} ms")
        for name in compared:
            pairs = list(zip(results[(load, OURS)], results[(load, name)], strict=True))
            ratios = ", ".join(f"{m.cpu_ms / c.cpu_ms:.3f}" for m, c in pairs)
            main_ratios = ", ".join(f"{m.main_ms / c.main_ms:.3f}" for m, c in pairs)
            print(f"  {OURS} / {name}, each round: {ratios} (main thread: {main_ratios})")


if __name__ == "__main__":
    main()
