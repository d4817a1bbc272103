"""Device faults: a batch that runs out of GPU memory is split until it fits (every request still succeeds, an item
that does not fit even alone fails only its own request), and a broken device (any other error from the model)
turns /health unhealthy, without leaking the error to clients."""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from common.errors import OutOfMemory
from common.runtime import FAILURES_BEFORE_UNHEALTHY
from qwen3_embed import Qwen3Encoder, Qwen3Service, Qwen3Settings
from tests.helpers import BatchMethod, assert_error, assert_same_vectors, image_app, mixed_images, serving, text_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_out_of_memory_batches_are_split_and_every_request_still_succeeds(tiny_siglip: Path) -> None:
    sizes: list[int] = []

    def oom_over_two(method: BatchMethod) -> BatchMethod:
        def run(items: Sequence[Any]) -> np.ndarray:
            sizes.append(len(items))
            if len(items) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
            return method(items)

        return run

    def oom_on_boom(method: BatchMethod) -> BatchMethod:
        def run(texts: Sequence[str]) -> np.ndarray:
            if "boom" in texts:  # an item that does not fit even alone
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return method(texts)

        return run

    images = mixed_images()
    app = image_app(tiny_siglip, wrap_images=oom_over_two, wrap_texts=oom_on_boom, max_batch_wait_ms=50)
    with serving(app) as client:
        alone = [np.asarray(client.post("/embed/image", files={"file": ("x", d)}).json()["embedding"]) for d in images]
        sizes.clear()
        requests_ = [[0, 1, 2, 3], [4, 5, 6], [7, 0, 1, 2, 3], [5]]
        with ThreadPoolExecutor(len(requests_)) as pool:
            answers = list(
                pool.map(
                    lambda ids: client.post("/embed/images", files=[("files", ("x", images[i])) for i in ids]),
                    requests_,
                )
            )
        for ids, answer in zip(requests_, answers, strict=True):
            assert answer.status_code == 200, answer.text
            assert_same_vectors(answer.json()["embeddings"], [alone[i] for i in ids])
        assert max(sizes) > 2  # a batch did run out of memory and was split
        expected_ok = client.post("/embed/text", json={"text": "ok"}).json()["embedding"]
        with ThreadPoolExecutor(2) as pool:
            boom = pool.submit(client.post, "/embed/texts", json={"texts": ["boom"]})
            fine = pool.submit(client.post, "/embed/texts", json={"texts": ["ok"]})
            assert_error(boom.result(), 503, "out_of_memory")
            assert_same_vectors(fine.result().json()["embeddings"], [np.asarray(expected_ok)])
        assert client.get("/health").status_code == 200  # running out of memory is not a broken device


def test_a_broken_device_turns_health_unhealthy(tiny_zimage: Path, caplog: pytest.LogCaptureFixture) -> None:
    broken = threading.Event()

    def fail_when_broken(method: BatchMethod) -> BatchMethod:
        def run(texts: Sequence[str]) -> np.ndarray:
            if broken.is_set():
                raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
            return method(texts)

        return run

    with serving(text_app(tiny_zimage, wrap_texts=fail_when_broken)) as client:
        assert client.post("/embed/text", json={"text": "fine"}).status_code == 200
        broken.set()
        with caplog.at_level(logging.ERROR):
            for attempt in range(3):
                response = client.post("/embed/text", json={"text": f"attempt {attempt}"})
                error = assert_error(response, 500, "internal_error")
                assert "illegal memory access" not in response.text and "Traceback" not in response.text
                assert response.headers["x-request-id"] in error["message"]  # the id to find it in the log
        health = client.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "unhealthy"}
        assert_error(client.post("/embed/text", json={"text": "after"}), 503, "not_ready")
        assert "marking the service unhealthy" in caplog.text and "illegal memory access" in caplog.text


# --- out of memory: what the failed attempt held is released before anything else runs --------------------------


def test_the_halves_of_a_batch_that_ran_out_of_memory_run_without_its_activations(tiny_siglip: Path) -> None:
    """A forward hook raises torch's own OutOfMemoryError from inside the vision tower for any batch of more than
    one image; every activation the failed passes held must be gone before the next pass starts."""
    failed_activations: list[weakref.ref[torch.Tensor]] = []
    alive_at_each_pass: list[int] = []

    def oom_inside_the_tower(method: BatchMethod) -> BatchMethod:
        encoder = method.__self__  # type: ignore[attr-defined]

        def fail_big_batches(module: torch.nn.Module, args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.shape[0] > 1:
                failed_activations.extend(weakref.ref(t) for t in (hidden, *args) if isinstance(t, torch.Tensor))
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB (simulated)")

        encoder.model.vision_model.encoder.layers[0].register_forward_hook(fail_big_batches)

        def run(items: Sequence[Any]) -> np.ndarray:
            alive_at_each_pass.append(sum(ref() is not None for ref in failed_activations))
            return method(items)

        return run

    images = mixed_images()[:4]
    with serving(image_app(tiny_siglip, wrap_images=oom_inside_the_tower)) as client:
        alone = [np.asarray(client.post("/embed/image", files={"file": ("x", d)}).json()["embedding"]) for d in images]
        alive_at_each_pass.clear()
        answer = client.post("/embed/images", files=[("files", ("x", data)) for data in images])
        assert answer.status_code == 200, answer.text
        assert_same_vectors(answer.json()["embeddings"], alone)
    assert len(alive_at_each_pass) == 7  # 4 -> 2 + 2 -> 1 + 1 + 1 + 1
    assert len(failed_activations) >= 3 * 2
    assert alive_at_each_pass == [0] * 7, alive_at_each_pass


def _hooked_text_service(model: Path) -> tuple[Qwen3Service, list[weakref.ref[torch.Tensor]]]:
    """The text service on the tiny model, whose first layer runs out of memory on every pass."""
    settings = Qwen3Settings(model=str(model))
    encoder = Qwen3Encoder(str(model), torch.device("cpu"), torch.float32, settings.recipe())
    activations: list[weakref.ref[torch.Tensor]] = []

    def out_of_memory(module: torch.nn.Module, args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        activations.append(weakref.ref(hidden))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB (simulated)")

    encoder.model.layers[0].register_forward_hook(out_of_memory)
    return Qwen3Service(settings, encoder, "cpu"), activations


@pytest.mark.parametrize("texts", [["a cat"], ["a cat", "a dog on the sea"]], ids=["alone", "batch"])
def test_the_out_of_memory_error_holds_nothing_of_the_failed_pass(
    tiny_zimage: Path, texts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error the guard raises (the batcher's cue to split, or a lone item's 503) carries neither the model's
    frames nor, through ``__context__``, the original error: holding it holds no activation. And the device cache is
    emptied only once those activations are gone (emptying it while they are alive gives nothing back)."""
    service, activations = _hooked_text_service(tiny_zimage)
    alive_when_emptied: list[int] = []
    monkeypatch.setattr(
        "common.failures.empty_device_cache",
        lambda device: alive_when_emptied.append(sum(ref() is not None for ref in activations)),
    )
    guarded: Callable[[list[str]], Any] = service.runtime._guarded(service.text_encoder.embed_texts)
    try:
        with pytest.raises(Exception) as caught:
            guarded(texts)
        assert activations and all(ref() is None for ref in activations)
        assert caught.value.__context__ is None and caught.value.__cause__ is None
        if len(texts) == 1:
            assert isinstance(caught.value, OutOfMemory)
        assert alive_when_emptied == [0]
    finally:
        service.runtime.worker.shutdown()


def test_the_out_of_memory_path_empties_the_mps_cache(tiny_zimage: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On Apple silicon the memory a failed batch freed stays in the MPS allocator's cache unless it is emptied.
    (No MPS device here: the model runs on the CPU, and torch.mps.empty_cache is replaced to see it called.)"""
    service, _ = _hooked_text_service(tiny_zimage)
    emptied: list[str] = []
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: emptied.append("mps"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append("cuda"))
    service.runtime.device = torch.device("mps")  # what the service was loaded on

    def out_of_memory(texts: list[str]) -> np.ndarray:
        raise torch.OutOfMemoryError("MPS backend out of memory (simulated)")

    try:
        with pytest.raises(OutOfMemory):
            service.runtime._guarded(out_of_memory)(["a cat"])
        assert emptied == ["mps"]
    finally:
        service.runtime.worker.shutdown()


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API call",
    ],
    ids=["cublas", "cuda-runtime"],
)
def test_library_allocation_failures_are_out_of_memory_not_a_broken_device(tiny_zimage: Path, message: str) -> None:
    """A workspace a CUDA library could not allocate is a RuntimeError, not torch.OutOfMemoryError: it must still be
    split like an out-of-memory batch, a lone item that does not fit is a 503, and the service stays healthy."""

    def library_oom(method: BatchMethod) -> BatchMethod:
        def run(texts: Sequence[str]) -> np.ndarray:
            if len(texts) > 1 or "huge" in texts[0]:
                raise RuntimeError(message)
            return method(texts)

        return run

    texts = ["a cat", "a dog", "the sea", "a tree"]
    with serving(text_app(tiny_zimage, wrap_texts=library_oom)) as client:
        alone = [np.asarray(client.post("/embed/text", json={"text": t}).json()["embedding"]) for t in texts]
        answer = client.post("/embed/texts", json={"texts": texts})
        assert answer.status_code == 200, answer.text
        assert_same_vectors(answer.json()["embeddings"], alone)
        for attempt in range(FAILURES_BEFORE_UNHEALTHY + 1):
            assert_error(client.post("/embed/text", json={"text": f"huge {attempt}"}), 503, "out_of_memory")
        assert client.get("/health").status_code == 200


# --- vectors with NaN or infinity ----------------------------------------------------------------------------------


def test_a_vector_with_nan_or_infinity_is_never_returned(tiny_zimage: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An input that overflows in the model (NaN or inf in its vector) fails its own request with a 500 that names
    the request id, logged with that id; the rest of its batch is served from the same forward pass (rows are
    independent: no item runs twice, so such inputs cannot multiply the model's work), and the service stays
    healthy (a client sending such inputs must not be able to take it out of service)."""
    batches: list[list[str]] = []

    def overflow(method: BatchMethod) -> BatchMethod:
        def run(texts: Sequence[str]) -> np.ndarray:
            batches.append(list(texts))
            vectors = method(texts)
            for row, text in enumerate(texts):
                if "overflow" in text:
                    vectors[row][3] = np.nan if "nan" in text else np.inf
            return vectors

        return run

    with serving(text_app(tiny_zimage, wrap_texts=overflow, max_batch_wait_ms=100)) as client:
        expected = client.post("/embed/text", json={"text": "fine"}).json()["embedding"]
        batches.clear()
        with caplog.at_level(logging.ERROR), ThreadPoolExecutor(2) as pool:
            bad = pool.submit(client.post, "/embed/texts", json={"texts": ["overflow nan", "overflow inf", "a"]})
            fine = pool.submit(client.post, "/embed/texts", json={"texts": ["fine"]})
            error = assert_error(bad.result(), 500, "non_finite_vector")
            assert_same_vectors(fine.result().json()["embeddings"], [np.asarray(expected)])
        assert sorted(text for batch in batches for text in batch) == ["a", "fine", "overflow inf", "overflow nan"]
        assert caplog.text.count("the model returned NaN or infinity") == len(batches)  # once a pass, not a split
        request_id = bad.result().headers["x-request-id"]
        assert request_id in error["message"] and "Traceback" not in bad.result().text
        assert request_id in caplog.text and "NaN or infinity" in caplog.text
        for _ in range(FAILURES_BEFORE_UNHEALTHY + 1):
            assert_error(client.post("/embed/text", json={"text": "overflow nan"}), 500, "non_finite_vector")
        assert client.get("/health").status_code == 200
        assert client.post("/embed/text", json={"text": "fine"}).status_code == 200
