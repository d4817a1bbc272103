"""Forward-pass-only throughput of the full-size architectures (random weights) as a fraction of the FLOP limit.

    python -m bench.bench_forward --device cuda [--peak-tflops 800] [--compile]

SigLIP2 so400m-512 vision tower: images/s and achieved TFLOP/s over batch sizes. Qwen3-4B (35 of 36 layers, as
the service runs it for hidden_states[-2]): tokens/s and TFLOP/s for batches of short and long texts. The peak is
the dense bf16 matmul figure of the card (~800 TFLOP/s for an H100 SXM). ``--layers N`` shrinks both
models so the script can be smoke-tested on a CPU.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from transformers import Qwen3Config, Qwen3Model, SiglipVisionConfig, SiglipVisionModel

from bench.models import QWEN3_4B, SO400M_512, qwen3_flops_per_token, siglip_vision_flops


def timed(step: Callable[[], Any], device: torch.device, seconds: float) -> float:
    """Mean seconds per call after warm-up."""
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        calls += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=800.0)
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per configuration")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers, for a CPU smoke test")
    parser.add_argument("--batches", default="8,32,64,128")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = args.peak_tflops * 1e12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, dtype {dtype}, peak {args.peak_tflops:.0f} TFLOP/s, compile {args.compile}")

    bench_vision(args, device, dtype, peak)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    bench_text(args, device, dtype, peak)


def bench_vision(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, peak: float) -> None:
    vision: dict[str, Any] = dict(SO400M_512["vision_config"])
    if args.layers:
        vision["num_hidden_layers"] = args.layers
    with torch.device(device):
        model = SiglipVisionModel(SiglipVisionConfig(**vision)).to(dtype).eval()  # type: ignore[arg-type]
    runner = torch.compile(model) if args.compile else model
    flops = siglip_vision_flops(
        vision["image_size"],
        vision["patch_size"],
        vision["hidden_size"],
        vision["intermediate_size"],
        vision["num_hidden_layers"],
    )
    print(f"SigLIP so400m-512 vision tower: {flops / 1e12:.3f} TFLOP per image")
    for batch in (int(b) for b in args.batches.split(",")):
        pixels = torch.randn(batch, 3, vision["image_size"], vision["image_size"], device=device, dtype=dtype)
        with torch.inference_mode():
            seconds = timed(partial(runner, pixel_values=pixels), device, args.seconds)
        rate = batch / seconds
        print(
            f"  batch {batch:4d}: {rate:8.1f} img/s  {rate * flops / 1e12:7.1f} TFLOP/s  "
            f"{rate * flops / peak:6.1%} of peak"
        )


def bench_text(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, peak: float) -> None:
    config: dict[str, Any] = dict(QWEN3_4B)
    layers = args.layers or config["num_hidden_layers"] - 1  # hidden_states[-2]: the last layer is never run
    config["num_hidden_layers"] = layers
    with torch.device(device):
        text_model = Qwen3Model(Qwen3Config(**config)).to(dtype).eval()  # type: ignore[arg-type]
    text_runner = torch.compile(text_model, dynamic=True) if args.compile else text_model
    per_token = qwen3_flops_per_token(QWEN3_4B, layers, 0) / 1e9
    print(f"Qwen3-4B, {layers} layers: {per_token:.2f} GFLOP per token (+ attention)")
    for batch, length in ((64, 32), (32, 128), (16, 512)):
        ids = torch.randint(0, 150000, (batch, length), device=device)
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            seconds = timed(partial(text_runner, input_ids=ids, attention_mask=mask), device, args.seconds)
        tokens = batch * length / seconds
        achieved = tokens * qwen3_flops_per_token(QWEN3_4B, layers, length // 2)
        print(
            f"  {batch:3d} texts x {length:3d} tokens: {tokens:9.0f} tokens/s  {achieved / 1e12:7.1f} TFLOP/s  "
            f"{achieved / peak:6.1%} of peak"
        )


if __name__ == "__main__":
    main()
