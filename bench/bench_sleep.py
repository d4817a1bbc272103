"""Sleeping and waking: the memory a sleeping model gives back, and what a wake costs.

    python -m bench.bench_sleep cycles [--model so400m|qwen3-4layers|siglip-300mb|PATH] [--cycles 20]
    python -m bench.bench_sleep service [--model siglip-300mb] [--cycles 15]
    python -m bench.bench_sleep gpu                  # on a CUDA machine: both full-size models, bf16, both modes

``cycles`` runs the service's own model and sleep code in this process, on the CPU in float32 (``unload``, the CPU's
mode): process RSS before the model loads, loaded, asleep, and after every sleep/wake cycle; the wake's time; the
first request after a sleep (wake included) against a request to the awake model, measured in the same run.
``--model qwen3-4layers`` is Qwen3-4B's architecture cut to 4 decoder layers (this machine does not hold the whole
4B in float32); ``so400m`` is the full SigLIP2 so400m-512 architecture; both with random weights.

``service`` runs ``siglip2_embed.py`` as its own process with ``--idle-sleep-s 2`` and checks, over HTTP, what a
deployment sees: it sleeps after 2 s idle and its RSS drops by most of the weights' size; a burst of 30 requests to
the sleeping service is answered with the pre-sleep vectors after one wake; a hold makes the indexer wait and it
finishes after the wake with every photo indexed once; ``--cycles`` sleep/wake cycles do not grow the RSS.

``gpu`` loads so400m-512 and Qwen3-4B (random weights, bfloat16) one at a time and reports, awake and asleep in
both modes, ``torch.cuda.memory_reserved()`` and the driver's used memory (``torch.cuda.mem_get_info``: what the
generator can have), and the wake's time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch

from bench.models import bench_model

REPO = Path(__file__).resolve().parents[1]
MB = 1024 * 1024
MODELS = REPO / "bench" / "out" / "models"


def rss_of(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def mb(value: float) -> str:
    return f"{value / MB:,.0f} MB"


# --- cycles: the service's code in this process ----------------------------------------------------------------------


def build_service(kind: str, model: Path) -> tuple[Any, int]:
    """The service object (batchers, residency) on the CPU in float32, and its weights' bytes."""
    cpu, dtype = torch.device("cpu"), torch.float32
    service: Any
    if "qwen3" in kind or (model / "text_encoder").is_dir():
        from qwen3_embed import Qwen3Encoder, Qwen3Service, Qwen3Settings

        text_settings = Qwen3Settings(model=str(model), sleep_mode="unload")
        encoder: Any = Qwen3Encoder(str(model), cpu, dtype, text_settings.recipe())
        encoder.embed_texts(["warm-up"])
        service = Qwen3Service(text_settings, encoder, "cpu")
    else:
        from siglip2_embed import Siglip2Encoder, Siglip2Service, Siglip2Settings

        settings = Siglip2Settings(model=str(model), sleep_mode="unload")
        encoder = Siglip2Encoder(str(model), cpu, dtype)
        encoder.embed_texts(["warm-up"])
        service = Siglip2Service(settings, encoder, "cpu")
    weights = sum(p.numel() * p.element_size() for p in encoder.model.parameters())
    return service, weights


def a_request(service: Any, images: bool) -> Any:
    """One request: a caption (both services), or a photo (the image service; on this CPU a so400m image takes tens
    of seconds, which would hide the wake)."""
    if images:
        from tests.helpers import image_bytes, photo_like

        photo = image_bytes(photo_like(640, 480), "JPEG", quality=90)
        return lambda: service.embed_images([photo], True)
    return lambda: service.embed_texts(["a photo of a cat sitting in the sun on a red chair"], True)


async def run_cycles(kind: str, model: Path, cycles: int, images: bool) -> list[str]:
    before = rss_of()
    started = time.perf_counter()
    service, weights = await asyncio.to_thread(build_service, kind, model)
    load_s = time.perf_counter() - started
    await service.start()
    request = a_request(service, images)
    expected = await request()
    loaded = rss_of()
    awake_s = []
    for _ in range(3):
        t0 = time.perf_counter()
        await request()
        awake_s.append(time.perf_counter() - t0)
    residency = service.runtime.residency
    asleep_rss, first_s, wake_s, sleep_s = [], [], [], []
    for _ in range(cycles):
        sleep_s.append((await residency.sleep("admin")).seconds)
        asleep_rss.append(rss_of())
        t0 = time.perf_counter()
        vectors = await request()  # wakes the model, then is served
        first_s.append(time.perf_counter() - t0)
        wake_s.append(residency.last_wake_s)
        assert np.array_equal(vectors, expected), "the vectors after a wake differ from those before"
    after = rss_of()
    await service.stop()
    awake = statistics.median(awake_s)
    first = statistics.median(first_s)
    return [
        f"model {kind}: {weights / 1e6:,.0f} MB of float32 weights; CPU, unload; loaded in {load_s:.1f} s; "
        f"requests: one {'photo' if images else 'caption'}",
        f"RSS before the model loads  {mb(before)}",
        f"RSS loaded                  {mb(loaded)}  (+{mb(loaded - before)})",
        f"RSS asleep (1st sleep)      {mb(asleep_rss[0])}  ({(loaded - asleep_rss[0]) / weights:.0%} of the weights "
        f"given back; {mb(asleep_rss[0] - before)} above before-load)",
        f"RSS asleep, cycle {cycles}        {mb(asleep_rss[-1])}  ({mb(asleep_rss[-1] - asleep_rss[0])} vs cycle 1; "
        f"min {mb(min(asleep_rss))}, max {mb(max(asleep_rss))})",
        f"RSS awake after {cycles} cycles  {mb(after)}  ({mb(after - loaded)} vs loaded)",
        f"sleep: median {statistics.median(sleep_s):.2f} s",
        f"wake: median {statistics.median(wake_s):.2f} s (min {min(wake_s):.2f}, max {max(wake_s):.2f})",
        f"request to the awake model: median {awake:.3f} s; first request after a sleep (wake included): median "
        f"{first:.2f} s = {first / awake:.1f}x",
        "vectors after every wake: bit-identical to those before the first sleep",
    ]


# --- service: the real process over HTTP ---------------------------------------------------------------------------


def state(url: str) -> str:
    return str(requests.get(url + "/health", timeout=10).json()["state"])


def wait_for(condition: Any, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def run_service(model: Path, cycles: int) -> list[str]:
    from embed_client import EmbedClient, index_folder
    from tests.helpers import free_port, image_bytes, photo_like

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "siglip2_embed.py", "--model", str(model), "--port", str(port), "--device", "cpu"]
    command += ["--dtype", "float32", "--idle-sleep-s", "2"]
    lines = []
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "server.log", "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:

            def ready() -> bool:
                try:
                    return requests.get(url + "/health", timeout=2).status_code == 200
                except requests.RequestException:
                    return False

            wait_for(ready, 300, "the service")
            texts = [f"a photo of thing number {index}" for index in range(30)]

            def post(text: str) -> requests.Response:
                return requests.post(url + "/embed/text", json={"text": text}, timeout=120)

            before = [np.asarray(post(text).json()["embedding"]) for text in texts]
            # An image too: a float32 file's weights are mapped from it, and count in the RSS once they are read.
            photo = {"file": ("photo.jpg", image_bytes(photo_like(320, 240), "JPEG"))}
            requests.post(url + "/embed/image", files=photo, timeout=120).raise_for_status()
            loaded = rss_of(process.pid)
            idle_started = time.monotonic()
            slept_after = wait_for(lambda: state(url) == "asleep", 60, "the idle sleep")
            asleep = rss_of(process.pid)
            info = requests.get(url + "/info", timeout=10).json()
            weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
            lines.append(f"model {model.name}: {mb(weights)} of weights (float32)")
            lines.append(
                f"idle sleep: asleep {time.monotonic() - idle_started:.1f} s after the last request (--idle-sleep-s 2;"
                f" /health said so after {slept_after:.1f} s of polling); RSS {mb(loaded)} -> {mb(asleep)} "
                f"(-{mb(loaded - asleep)})"
            )
            with ThreadPoolExecutor(len(texts)) as pool:
                answers = list(pool.map(post, texts))
            statuses = {answer.status_code for answer in answers}
            wakes = requests.get(url + "/info", timeout=10).json()["sleep"]["wakes"]
            same = all(
                np.allclose(answer.json()["embedding"], vector, atol=2e-5)
                for answer, vector in zip(answers, before, strict=True)
            )
            lines.append(
                f"burst of {len(texts)} to the sleeping service: statuses {sorted(statuses)}, wakes {wakes}, "
                f"pre-sleep vectors: {same}"
            )

            root = Path(tmp) / "photos"
            root.mkdir()
            for index in range(40):
                (root / f"photo{index:02d}.jpg").write_bytes(image_bytes(photo_like(320, 240, index), "JPEG"))
            client = EmbedClient(url)
            client.sleep(hold=True)
            held = {"503 asleep answers": 0}
            real_sleep = client._sleep

            def counting(seconds: float) -> None:
                held["503 asleep answers"] += 1
                real_sleep(seconds)

            client._sleep = counting
            out = Path(tmp) / "vectors.parquet"
            result: dict[str, Any] = {}
            runner = threading.Thread(
                target=lambda: result.update(summary=index_folder(root, out, client, concurrency=2, progress=False))
            )
            runner.start()
            time.sleep(12)
            waited = runner.is_alive()
            woke = client.wake()
            runner.join(300)
            import pyarrow.parquet as pq

            paths = pq.read_table(out).column("path").to_pylist()
            summary = result["summary"]
            lines.append(
                f"hold: the indexer was still waiting after 12 s held: {waited} ({held['503 asleep answers']} waits "
                f"on 503 asleep); wake took {woke['seconds']:.2f} s; then {summary.embedded} embedded, "
                f"{len(summary.failed)} failed, {len(paths)} rows, {len(set(paths))} distinct paths of 40 photos"
            )

            cycle_rss = []
            for _ in range(cycles):
                requests.post(url + "/admin/sleep", timeout=60)
                cycle_rss.append(rss_of(process.pid))
                post("wake me")
            lines.append(
                f"{cycles} sleep/wake cycles: RSS asleep {mb(cycle_rss[0])} after the first, {mb(cycle_rss[-1])} after "
                f"the last (min {mb(min(cycle_rss))}, max {mb(max(cycle_rss))})"
            )
            del info
        finally:
            process.terminate()
            code = process.wait(60)
            lines.append(f"SIGTERM: exit code {code}")
    return lines


def run_gpu(cycles: int) -> list[str]:
    device = torch.device("cuda", 0)
    lines = []
    for kind in ("so400m", "qwen3-4b"):
        model = bench_model(kind, MODELS, "cpu")
        for mode in ("offload", "unload"):
            if "qwen3" in kind:
                from qwen3_embed import Qwen3Encoder

                encoder: Any = Qwen3Encoder(str(model), device, torch.bfloat16)
            else:
                from siglip2_embed import Siglip2Encoder

                encoder = Siglip2Encoder(str(model), device, torch.bfloat16)
            encoder.embed_texts(["warm-up"])
            torch.cuda.synchronize()

            def used() -> str:
                free, total = torch.cuda.mem_get_info()
                return f"reserved {mb(torch.cuda.memory_reserved())}, driver used {mb(total - free)}"

            awake = used()
            wakes = []
            for _ in range(cycles):
                encoder.release_weights(mode)
                asleep = used()
                started = time.perf_counter()
                encoder.restore_weights(mode)
                torch.cuda.synchronize()
                wakes.append(time.perf_counter() - started)
            lines.append(
                f"{kind} {mode}: awake {awake}; asleep {asleep}; wake median {statistics.median(wakes):.2f} s "
                f"(min {min(wakes):.2f}, max {max(wakes):.2f})"
            )
            del encoder
            torch.cuda.empty_cache()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=["cycles", "service", "gpu"])
    parser.add_argument("--model", default=None, help="so400m, qwen3-4layers, siglip-300mb or a folder")
    parser.add_argument("--cycles", type=int, default=None)
    parser.add_argument("--images", action="store_true", help="cycles: time a photo request instead of a caption")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    kind = args.model or ("so400m" if args.scenario == "cycles" else "siglip-300mb")
    model = Path(kind)
    if not model.is_dir():
        # Built in a child process: building leaves gigabytes in this process's allocator, which would count as
        # "before the model loads".
        build = f"from bench.models import bench_model, Path; bench_model({kind!r}, Path({str(MODELS)!r}), 'cpu')"
        subprocess.run([sys.executable, "-c", build], cwd=REPO, check=True)
        model = MODELS / kind
    if args.scenario == "gpu":
        print("\n".join(run_gpu(args.cycles or 5)))
        return
    if args.scenario == "cycles":
        lines = asyncio.run(run_cycles(kind, model, args.cycles or 20, args.images))
    else:
        lines = run_service(model, args.cycles or 15)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
