"""Ray actors and Serve replicas use the device Ray gave them: none means the CPU (Ray no longer hides the GPUs
from an actor that asked for none), a fraction of a GPU caps the process at that share of its memory."""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cluster.devices import Placement, apply_placement, place_on_ray_resources, placement
from cluster.permanent import PermanentFailure, permanent_reason
from cluster.pipeline import ImageEmbedder, read_image_spec
from siglip2_embed import Siglip2Settings


@pytest.mark.parametrize(
    ("device", "assigned", "expected"),
    [
        ("auto", {"CPU": 1.0}, Placement(force_cpu=True, memory_fraction=None)),
        ("auto", {"CPU": 1.0, "GPU": 0.0}, Placement(force_cpu=True, memory_fraction=None)),
        ("mps", {"CPU": 1.0}, Placement(force_cpu=False, memory_fraction=None)),
        ("auto", {"GPU": 1.0}, Placement(force_cpu=False, memory_fraction=None)),
        ("cuda", {"GPU": 2.0}, Placement(force_cpu=False, memory_fraction=None)),
        ("auto", {"GPU": 0.3}, Placement(force_cpu=False, memory_fraction=0.3)),
        ("cuda", {"GPU": 0.6}, Placement(force_cpu=False, memory_fraction=0.6)),
    ],
)
def test_placement_follows_what_ray_assigned(device: str, assigned: dict[str, float], expected: Placement) -> None:
    assert placement(device, assigned) == expected


def test_an_explicit_cuda_without_a_ray_gpu_is_an_error() -> None:
    """Every replica or actor of the same options gets no GPU either: a permanent failure, at which the front door
    stops and the import says why (cluster/permanent.py)."""
    with pytest.raises(PermanentFailure, match="gave this actor no GPU") as raised:
        placement("cuda", {"CPU": 1.0})
    assert permanent_reason(raised.value) == permanent_reason(str(raised.value)) == raised.value.reason
    assert raised.value.reason.startswith("--device cuda was asked for")


def test_a_gpu_share_caps_the_process_memory(monkeypatch: pytest.MonkeyPatch, tiny_siglip: Path) -> None:
    """(No CUDA here: torch's CUDA calls are replaced to see the cap made, with the share, on the actor's GPU.)"""
    calls: list[tuple[float, int]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    settings = Siglip2Settings(model=str(tiny_siglip))
    assert apply_placement(settings, Placement(force_cpu=False, memory_fraction=0.3)) == settings
    assert calls == [(0.3, 0)]
    forced = apply_placement(settings, Placement(force_cpu=True, memory_fraction=None))
    assert forced.force_cpu and calls == [(0.3, 0)]


@pytest.fixture(scope="module")
def ray_with_one_gpu() -> Iterator[None]:
    """A local Ray that declares one GPU (none is used: the actors only report what they were given)."""
    import ray

    # "local": a new Ray, never one a file left by `ray start` names (gone or not)
    ray.init(address="local", num_cpus=1, num_gpus=1, include_dashboard=False, object_store_memory=100 * 1024 * 1024)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.usefixtures("ray_with_one_gpu")
def test_real_ray_actors_get_the_cpu_or_their_share(tiny_siglip: Path) -> None:
    import ray

    @ray.remote(num_cpus=0)
    class Replica:
        def placement(self, settings: Siglip2Settings) -> tuple[Any, ...]:
            assigned = ray.get_runtime_context().get_assigned_resources()
            chosen = placement(settings.device, assigned)
            return place_on_ray_resources(settings).force_cpu, chosen.memory_fraction

    settings = Siglip2Settings(model=str(tiny_siglip))
    without_gpu = Replica.options(num_gpus=0).remote()  # type: ignore[attr-defined]
    with_share = Replica.options(num_gpus=0.3).remote()  # type: ignore[attr-defined]
    assert ray.get(without_gpu.placement.remote(settings), timeout=120) == (True, None)
    assert ray.get(with_share.placement.remote(settings), timeout=120) == (False, 0.3)


def test_the_import_embedder_splits_out_of_memory_batches_and_never_stores_nan(tiny_siglip: Path) -> None:
    """The Ray import's encoder actor, as the service's batcher: a batch that runs out of memory (torch's error,
    raised inside the vision tower) is split, with the failed pass's activations gone before a half runs; an image
    that yields NaN is that row's error, not a vector; a row that failed to decode keeps its error."""
    settings = Siglip2Settings(model=str(tiny_siglip))
    spec = read_image_spec(settings)
    embedder = ImageEmbedder(settings, spec)
    encoder = embedder.encoder
    failed: list[weakref.ref[torch.Tensor]] = []
    alive_at_each_pass: list[int] = []

    def fail_big_batches(module: torch.nn.Module, args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[0] > 1:
            failed.extend(weakref.ref(t) for t in (hidden, *args) if isinstance(t, torch.Tensor))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB (simulated)")

    embed_images = encoder.embed_images

    def overflow_on_sevens(pixels: Sequence[np.ndarray]) -> np.ndarray:
        alive_at_each_pass.append(sum(ref() is not None for ref in failed))
        vectors = embed_images(pixels)
        vectors[np.array([(p == 7).all() for p in pixels])] = np.nan
        return vectors

    pixels = np.stack([np.full((spec.height, spec.width, 3), value, np.uint8) for value in (10, 7, 90, 200, 0)])
    alone = [embed_images([p])[0] for p in pixels]
    encoder.model.vision_model.encoder.layers[0].register_forward_hook(fail_big_batches)
    encoder.embed_images = overflow_on_sevens  # type: ignore[method-assign]
    errors = np.array(["", "", "", "", "invalid_image: not an image"], dtype=object)
    out = embedder({"path": np.array([f"{i}.png" for i in range(5)]), "pixels": pixels, "error": errors})

    assert list(out["error"][[0, 2, 3]]) == ["", "", ""]
    assert out["error"][1].startswith("non_finite_vector") and out["error"][4] == "invalid_image: not an image"
    assert np.isfinite(out["vector"]).all() and not out["vector"][[1, 4]].any()
    for row in (0, 2, 3):
        np.testing.assert_allclose(out["vector"][row], alone[row] / np.linalg.norm(alone[row]), atol=1e-5)
    assert failed and alive_at_each_pass == [0] * 7, alive_at_each_pass  # 4 -> 2 + 2 -> 1 + 1 + 1 + 1
