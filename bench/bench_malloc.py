"""A replica's forward pass on the CPU with glibc's default malloc and with the fixed mmap threshold that the front
door gives Serve's proxy (``cluster.front.PROXY_ENV``), which is why the replicas get ``REPLICA_ENV`` instead.

    python -m bench.bench_malloc [--rounds 2] [--batch 1] [--layers 27] [--image-size 512]

The SigLIP2 so400m-512 vision tower (random weights) in a fresh process per measurement, the two settings in
alternating order each round; each process reports its median seconds per forward pass after a warm-up pass.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from cluster.front.config import PROXY_ENV, REPLICA_ENV

SETTINGS = {"default": REPLICA_ENV["GLIBC_TUNABLES"], "fixed threshold": PROXY_ENV["GLIBC_TUNABLES"]}


def forward_seconds(batch: int, layers: int, image_size: int, iterations: int) -> float:
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from bench.models import SO400M_512

    torch.manual_seed(0)
    config = SiglipVisionConfig(
        **{**SO400M_512["vision_config"], "num_hidden_layers": layers, "image_size": image_size}
    )
    model = SiglipVisionModel(config).eval()
    pixels = torch.randn(batch, 3, image_size, image_size)
    times = []
    with torch.inference_mode():
        for _ in range(iterations + 1):
            started = time.perf_counter()
            model(pixel_values=pixels)
            times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(forward_seconds(args.batch, args.layers, args.image_size, args.iterations)))
        return

    child = [sys.executable, "-m", "bench.bench_malloc", "--child", *sys.argv[1:]]
    results: dict[str, list[float]] = {name: [] for name in SETTINGS}
    names = list(SETTINGS)
    for round_ in range(args.rounds):
        for name in names[round_ % 2 :] + names[: round_ % 2]:
            env = {**os.environ, "GLIBC_TUNABLES": SETTINGS[name]}
            output = subprocess.run(child, env=env, check=True, capture_output=True, text=True).stdout
            results[name].append(json.loads(output.splitlines()[-1]))
            print(f"round {round_ + 1}, {name}: {results[name][-1]:.3f} s per forward pass", flush=True)
    default, fixed = (statistics.median(results[name]) for name in names)
    print(f"batch {args.batch}, {args.layers} layers, {args.image_size} px, load average {os.getloadavg()[0]:.1f}")
    print(f"default {default:.3f} s, fixed threshold {fixed:.3f} s: fixed / default = {fixed / default:.3f}")
    per_round = [f / d for d, f in zip(*results.values(), strict=True)]
    print("per round: " + ", ".join(f"{ratio:.3f}" for ratio in per_round))


if __name__ == "__main__":
    main()
