"""Which device and dtype a model runs on."""

from __future__ import annotations

import logging

import torch

from common.config import DType, ServiceSettings

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pick_device(settings: ServiceSettings) -> torch.device:
    """cuda -> mps -> cpu for "auto"; an explicit choice that is not available is an error, not a silent fallback."""
    if settings.force_cpu:
        return torch.device("cpu")
    requested = settings.device
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("--device mps was asked for, but torch sees no MPS device")
    return torch.device("cuda", 0) if requested == "cuda" else torch.device(requested)


def pick_dtype(requested: DType, device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA (float16 overflows to NaN in Qwen3's activations), float32 elsewhere."""
    if requested != "auto":
        return _DTYPES[requested]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def describe_device(device: torch.device) -> str:
    """ "cuda:0 (NVIDIA H100 80GB HBM3)" style label for logs."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def locate_model(settings: ServiceSettings, download_help: str) -> tuple[str, torch.device, torch.dtype]:
    """What every loader starts with: the model's folder, the device and the dtype (logged)."""
    from common.model_source import resolve_model_source

    source = resolve_model_source(settings.model, download_help=download_help)
    device = pick_device(settings)
    dtype = pick_dtype(settings.dtype, device)
    logger.info("loading %s on %s as %s", source, describe_device(device), dtype)
    return source, device, dtype
