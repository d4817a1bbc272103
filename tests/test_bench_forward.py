"""bench_forward measures what the service runs: the card's real peak, padded batches, models built in bfloat16."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen3Config, Qwen3Model

from bench.bench_forward import build_model, main, padded_batch, peak_tflops


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA GeForce RTX 4090", 165.2),
        ("NVIDIA GeForce RTX 3090", 71.0),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_the_peak_is_the_cards_dense_bf16_figure(name: str, tflops: float | None) -> None:
    assert peak_tflops(name) == tflops


def test_a_device_of_unknown_peak_needs_peak_tflops(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_forward", "--device", "cpu", "--layers", "1"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2 and "--peak-tflops" in capsys.readouterr().err


def test_text_batches_are_padded_as_the_service_pads_them() -> None:
    ids, mask = padded_batch(16, 128, torch.Generator().manual_seed(0))
    lengths = mask.sum(dim=1)
    assert ids.shape == mask.shape == (16, 128)
    assert int(lengths.max()) == 128 and int(lengths.min()) < 128 and len(set(lengths.tolist())) > 4
    for row, length in enumerate(lengths.tolist()):  # right padding: real tokens first, then zeros
        assert mask[row, :length].all() and not mask[row, length:].any() and not ids[row, length:].any()


class CreatedTensors(TorchDispatchMode):
    """The dtype of every tensor of more than 1000 elements that an operation creates."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        result = func(*args, **(kwargs or {}))
        if isinstance(result, torch.Tensor) and result.numel() > 1000:
            self.dtypes.add(result.dtype)
        return result


def test_models_are_built_in_bfloat16_from_the_start() -> None:
    """No weight is ever allocated in float32 (for Qwen3-4B that would be 16 GB on the GPU before a cast)."""
    config = Qwen3Config(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    with CreatedTensors() as created:
        model = build_model(Qwen3Model, config, torch.device("cpu"), torch.bfloat16)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    assert created.dtypes == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # put back
