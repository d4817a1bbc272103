"""Forward-pass-only throughput of the full-size architectures (random weights) as a fraction of the FLOP limit.

    python -m bench.bench_forward --device cuda [--peak-tflops N] [--compile]

SigLIP2 so400m-512 vision tower: images/s and achieved TFLOP/s over batch sizes. Qwen3-4B (35 of 36 layers, as
the service runs it for hidden_states[-2]): tokens/s and TFLOP/s for batches of short and long texts, padded as the
service pads them (texts of different lengths, right padding, an attention mask with zeros: SDPA takes a faster path
for an all-ones mask than the service ever gets). The peak is the card's dense (not sparse) bf16 tensor figure,
looked up by the device's name (``PEAK_BF16_TFLOPS``); any other device needs ``--peak-tflops``. The models are
built directly in the benchmark's dtype (4 B parameters built in float32 would need 16 GB before the cast).
``--layers N`` shrinks both models so the script can be smoke-tested on a CPU.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from transformers import (
    PretrainedConfig,
    PreTrainedModel,
    Qwen3Config,
    Qwen3Model,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from bench.models import QWEN3_4B, SO400M_512, qwen3_flops_per_token, siglip_vision_flops

# Dense bf16 tensor-core TFLOP/s (with float32 accumulation, no sparsity) by device name, first match wins. Sources:
# NVIDIA's datasheets (H100, H200, A100, L40S, L4, A10) and architecture whitepapers (Ada for the RTX 4090, Ampere
# GA102 for the RTX 3090), which print the sparse figure beside it at twice the dense one.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    (r"H100.*PCIe", 756.0),  # H100 PCIe: 1513 sparse
    (r"H100.*NVL", 835.0),  # H100 NVL: 1671 sparse
    (r"H100|H200|GH200", 989.0),  # H100 SXM and H200: 1979 sparse
    (r"A100", 312.0),  # A100 (SXM and PCIe): 624 sparse
    (r"L40S", 362.0),  # L40S: 733 sparse
    (r"\bL4\b", 121.0),  # L4 (24 GB): 242 sparse
    (r"\bA10\b", 125.0),  # A10 (24 GB): 250 sparse
    (r"RTX 4090", 165.2),  # RTX 4090 (24 GB), bf16 with float32 accumulation: 330.4 sparse
    (r"RTX 3090", 71.0),  # RTX 3090 (24 GB), bf16 with float32 accumulation: 142 sparse
]


def peak_tflops(device_name: str) -> float | None:
    """The card's dense bf16 peak, or None for a device not in the table."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def build_model(
    model_class: type[PreTrainedModel], config: PretrainedConfig, device: torch.device, dtype: torch.dtype
) -> PreTrainedModel:
    """The model with random weights, allocated on ``device`` in ``dtype`` from the start (never in float32 first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return model_class(config).eval()
    finally:
        torch.set_default_dtype(previous)


def padded_batch(batch: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask as the service pads a batch: text lengths spread between a quarter of ``length``
    and ``length`` (the longest text sets the padded length), right padding."""
    lengths = torch.randint(max(1, length // 4), length + 1, (batch,), generator=generator)
    lengths[0] = length
    ids = torch.randint(0, 150000, (batch, length), generator=generator)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return ids * mask, mask


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
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (default: looked up by name)"
    )
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bfloat16 on CUDA")
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per configuration")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers, for a CPU smoke test")
    parser.add_argument("--batches", default="8,32,64,128")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    tflops = args.peak_tflops or peak_tflops(name)
    if tflops is None:
        parser.error(f"no peak known for {name!r}: pass --peak-tflops (its dense bf16 tensor TFLOP/s)")
    peak = tflops * 1e12
    print(f"device {name}, dtype {dtype}, peak {tflops:.0f} TFLOP/s, compile {args.compile}")

    bench_vision(args, device, dtype, peak)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    bench_text(args, device, dtype, peak)


def bench_vision(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, peak: float) -> None:
    vision: dict[str, Any] = dict(SO400M_512["vision_config"])
    if args.layers:
        vision["num_hidden_layers"] = args.layers
    model = build_model(SiglipVisionModel, SiglipVisionConfig(**vision), device, dtype)
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
    text_model = build_model(Qwen3Model, Qwen3Config(**config), device, dtype)
    text_runner = torch.compile(text_model, dynamic=True) if args.compile else text_model
    per_token = qwen3_flops_per_token(QWEN3_4B, layers, 0) / 1e9
    print(f"Qwen3-4B, {layers} layers: {per_token:.2f} GFLOP per token (+ attention)")
    generator = torch.Generator().manual_seed(0)
    for batch, length in ((64, 32), (32, 128), (16, 512)):
        ids, mask = (t.to(device) for t in padded_batch(batch, length, generator))
        with torch.inference_mode():
            seconds = timed(partial(text_runner, input_ids=ids, attention_mask=mask), device, args.seconds)
        # The device computes every padded position; the service's clients get the real tokens.
        achieved = batch * length / seconds * qwen3_flops_per_token(QWEN3_4B, layers, length // 2)
        real_tokens = int(mask.sum()) / seconds
        print(
            f"  {batch:3d} texts padded to {length:3d} tokens: {real_tokens:9.0f} real tokens/s  "
            f"{achieved / 1e12:7.1f} TFLOP/s  {achieved / peak:6.1%} of peak"
        )


if __name__ == "__main__":
    main()
