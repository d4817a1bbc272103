"""The dtype a model computes in, and why: decided once at start-up, logged, and shown in ``/info``.

``auto`` picks bfloat16 where the hardware computes it natively, float32 elsewhere:

* CUDA: bfloat16 (float16 overflows to NaN in Qwen3's activations).
* A CPU with bfloat16 instructions (x86: AVX-512 BF16 or AMX; Arm: the BF16 extension) and a torch with oneDNN,
  whose kernels use them: bfloat16. A CPU without them emulates bfloat16 (its values converted to float32 and
  back), 5 to 7 times slower than float32 itself through the services (bench/RESULTS.md): it keeps float32. So
  does a CPU of any other architecture, where torch reports no bfloat16 instructions.
* MPS: float32 (bfloat16 there is not measured).

The CPU's instructions are what ``torch.cpu.get_capabilities()`` reports (cpuinfo's reading of the CPU, the same
flags as ``/proc/cpuinfo``'s); the decision itself is a pure function of that mapping, so it is tested on any CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from common.config import DType

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# torch.cpu.get_capabilities()'s keys for the instructions that compute bfloat16, by architecture, and their names.
NATIVE_BFLOAT16: dict[str, dict[str, str]] = {
    "x86_64": {"avx512_bf16": "AVX-512 BF16", "amx_bf16": "AMX"},
    "arm64": {"bf16": "the Arm BF16 extension"},
}
# What the log says a CPU without them has instead (the widest vector instructions torch uses there).
VECTOR_UNITS: dict[str, dict[str, str]] = {
    "x86_64": {"avx512_f": "AVX-512", "avx2": "AVX2"},
    "arm64": {"sve": "SVE", "neon": "NEON"},
}
# The reason of a service built around an encoder that was given its dtype directly (tests, benchmarks).
GIVEN_WITH_THE_ENCODER = "given with the encoder"


@dataclass(frozen=True)
class DTypeChoice:
    dtype: torch.dtype
    reason: str  # one sentence for the log and /info: what decided it

    @property
    def name(self) -> str:
        return dtype_name(self.dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def architecture(capabilities: Mapping[str, Any]) -> str:
    """torch's name of the CPU's architecture: "x86_64", "arm64", "ppc64", "s390x", "riscv64" or "unknown"."""
    return str(capabilities.get("architecture", "unknown"))


def native_bfloat16(capabilities: Mapping[str, Any]) -> list[str]:
    """The names of the CPU's instructions that compute bfloat16, from ``torch.cpu.get_capabilities()``; empty when
    it has none (or is of an architecture not listed in ``NATIVE_BFLOAT16``)."""
    known = NATIVE_BFLOAT16.get(architecture(capabilities), {})
    return [name for key, name in known.items() if capabilities.get(key) is True]


def describe_cpu(capabilities: Mapping[str, Any]) -> str:
    """ "AMD EPYC, x86_64 with AVX2" style label of what the CPU has, for the reason of a float32 choice."""
    arch = architecture(capabilities)
    units = [name for key, name in VECTOR_UNITS.get(arch, {}).items() if capabilities.get(key) is True]
    cpu = str(capabilities.get("cpu_name") or "").strip()
    return (f"{cpu}, " if cpu else "") + arch + (f" with {units[0]}" if units else "")


def cpu_capabilities() -> Mapping[str, Any]:
    """What torch detected of this CPU: its architecture, name and instruction sets (torch caches it)."""
    return torch.cpu.get_capabilities()


def pick_dtype(
    requested: DType,
    device: torch.device,
    capabilities: Mapping[str, Any] | None = None,
    onednn: bool | None = None,
    cpu_float32_because: str | None = None,
) -> DTypeChoice:
    """The dtype for ``requested`` on ``device`` and the reason. ``capabilities`` and ``onednn`` (whether this torch
    has oneDNN's kernels) default to this machine's; tests pass fixed ones. ``cpu_float32_because``: why this model
    keeps float32 under ``auto`` even on a CPU that computes bfloat16 natively (a route it cannot hold in bfloat16)."""
    if requested != "auto":
        return DTypeChoice(DTYPES[requested], f"{requested} was asked for (--dtype {requested})")
    if device.type == "cuda":
        return DTypeChoice(torch.bfloat16, "auto: bfloat16 on CUDA")
    if device.type != "cpu":
        return DTypeChoice(torch.float32, f"auto: float32 on {device.type} (bfloat16 there is not measured)")
    capabilities = cpu_capabilities() if capabilities is None else capabilities
    onednn = torch.backends.mkldnn.is_available() if onednn is None else onednn
    native = native_bfloat16(capabilities)
    if native and onednn and cpu_float32_because:
        return DTypeChoice(
            torch.float32,
            f"auto: float32, although this CPU computes bfloat16 natively ({', '.join(native)}): {cpu_float32_because}",
        )
    if native and onednn:
        return DTypeChoice(torch.bfloat16, f"auto: bfloat16, this CPU computes it natively ({', '.join(native)})")
    if native:
        return DTypeChoice(
            torch.float32,
            f"auto: float32, this CPU has {', '.join(native)} but this torch is built without oneDNN, whose kernels "
            "use them (bfloat16 would be emulated, slower than float32)",
        )
    wanted = " or ".join(NATIVE_BFLOAT16.get(architecture(capabilities), {}).values())
    lacks = f"has no {wanted}" if wanted else "has no bfloat16 instructions torch knows of"
    return DTypeChoice(
        torch.float32,
        f"auto: float32, this CPU ({describe_cpu(capabilities)}) {lacks}: bfloat16 would be emulated, slower than "
        "float32",
    )
