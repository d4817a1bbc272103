"""--dtype auto: bfloat16 where the hardware computes it natively (CUDA; a CPU with AVX-512 BF16, AMX or Arm's BF16),
float32 elsewhere, decided once at start-up from what torch reports of the CPU, logged and shown in /info; and the
bfloat16 path's answers against float32's on every route, on the tiny models.

The suite itself runs in float32 (tests/conftest.py pins EMBED_DTYPE); the tests here choose their dtype explicitly,
or take auto's choice from a fixed description of a CPU, so they mean the same on every machine."""

from __future__ import annotations

import json
import logging
import platform
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from safetensors.torch import load as load_safetensors

import common.precision
from common.precision import NATIVE_BFLOAT16, pick_dtype
from qwen3_embed import Qwen3Settings
from qwen3_embed import build_app as build_text_app
from siglip2_embed import Siglip2Settings
from siglip2_embed import build_app as build_image_app
from tests.helpers import CPU, MIXED_TEXTS, image_bytes, photo_like, wait_ready

DTYPES = ("float32", "bfloat16")

# CPUs as torch.cpu.get_capabilities() describes them (only the keys the choice reads, and the CPU's name).
AVX2_ONLY = {"architecture": "x86_64", "cpu_name": "AMD EPYC", "avx2": True, "avx512_f": False, "avx512_bf16": False}
AVX512_WITHOUT_BF16 = {"architecture": "x86_64", "cpu_name": "Intel Xeon", "avx2": True, "avx512_f": True}
ZEN4 = {"architecture": "x86_64", "cpu_name": "AMD EPYC 9654", "avx512_f": True, "avx512_bf16": True}
SAPPHIRE_RAPIDS = {"architecture": "x86_64", "avx512_f": True, "avx512_bf16": True, "amx_bf16": True}
NEOVERSE_V1 = {"architecture": "arm64", "neon": True, "sve": True, "bf16": True}
NEOVERSE_N1 = {"architecture": "arm64", "cpu_name": "Neoverse-N1", "neon": True, "bf16": False}
POWER9 = {"architecture": "ppc64"}


@pytest.mark.parametrize(
    ("capabilities", "onednn", "dtype", "words"),
    [
        (AVX2_ONLY, True, torch.float32, ["AMD EPYC, x86_64 with AVX2", "no AVX-512 BF16 or AMX", "emulated"]),
        (AVX512_WITHOUT_BF16, True, torch.float32, ["x86_64 with AVX-512", "no AVX-512 BF16 or AMX"]),
        (ZEN4, True, torch.bfloat16, ["natively (AVX-512 BF16)"]),
        (SAPPHIRE_RAPIDS, True, torch.bfloat16, ["natively (AVX-512 BF16, AMX)"]),
        (NEOVERSE_V1, True, torch.bfloat16, ["natively (the Arm BF16 extension)"]),
        (NEOVERSE_N1, True, torch.float32, ["Neoverse-N1, arm64 with NEON", "no the Arm BF16 extension"]),
        (POWER9, True, torch.float32, ["ppc64", "no bfloat16 instructions torch knows of"]),
        (ZEN4, False, torch.float32, ["has AVX-512 BF16 but this torch is built without oneDNN"]),
    ],
)
def test_auto_on_a_cpu_is_bfloat16_only_where_it_is_native(
    capabilities: Mapping[str, Any], onednn: bool, dtype: torch.dtype, words: list[str]
) -> None:
    choice = pick_dtype("auto", CPU, capabilities, onednn)
    assert choice.dtype == dtype
    assert choice.reason.startswith(f"auto: {choice.name}")
    for word in words:
        assert word in choice.reason, choice.reason


def test_an_explicit_dtype_or_another_device_does_not_look_at_the_cpu() -> None:
    for requested in ("float32", "bfloat16", "float16"):
        choice = pick_dtype(requested, CPU, ZEN4, True)  # a CPU with native bfloat16: --dtype float32 still wins
        assert (choice.name, choice.reason) == (requested, f"{requested} was asked for (--dtype {requested})")
    assert pick_dtype("auto", torch.device("cuda", 0), AVX2_ONLY, False).dtype == torch.bfloat16
    assert pick_dtype("auto", torch.device("mps"), ZEN4, True).dtype == torch.float32


def proc_cpuinfo_flags() -> set[str] | None:
    """The first CPU's flags (x86) or Features (Arm) in /proc/cpuinfo; None without that file."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def test_torch_reports_what_the_choice_reads_and_the_kernel_agrees() -> None:
    """The choice reads torch.cpu.get_capabilities(): on x86 and Arm the architecture under the name the choice
    expects and every key it reads, with the values /proc/cpuinfo's flags have (a torch that renamed or dropped
    one would silently keep every CPU on float32). This machine's own choice follows from them."""
    capabilities = torch.cpu.get_capabilities()
    expected = {"x86_64": "x86_64", "AMD64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine())
    if expected is None:
        pytest.skip(f"no bfloat16 instructions are read on {platform.machine()}")  # pick_dtype: float32 there
    assert capabilities["architecture"] == expected
    keys = NATIVE_BFLOAT16[expected]
    assert set(keys) <= set(capabilities), sorted(capabilities)
    flags = proc_cpuinfo_flags()
    if flags is not None:  # Linux: the kernel's own list
        assert {key: capabilities[key] for key in keys} == {key: key in flags for key in keys}
    native = any(capabilities[key] for key in keys) and torch.backends.mkldnn.is_available()
    assert pick_dtype("auto", CPU).dtype == (torch.bfloat16 if native else torch.float32)


# --- the services: the choice in /info and the log --------------------------------------------------------------


@pytest.fixture
def cpu_like(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Makes the services see a CPU of the given description (the hardware cannot be changed; the choice is)."""
    monkeypatch.delenv("EMBED_DTYPE", raising=False)  # the suite's pin: these tests are about auto

    def pretend(capabilities: Mapping[str, Any]) -> None:
        monkeypatch.setattr(common.precision, "cpu_capabilities", lambda: capabilities)

    return pretend


SIGLIP_KEEPS_FLOAT32 = "auto: float32, although this CPU computes bfloat16 natively (AVX-512 BF16): SigLIP's pair"


@pytest.mark.parametrize(
    ("capabilities", "image_dtype", "image_reason", "text_dtype", "text_reason"),
    [
        (
            ZEN4,
            "float32",
            SIGLIP_KEEPS_FLOAT32,
            "bfloat16",
            "auto: bfloat16, this CPU computes it natively (AVX-512 BF16)",
        ),
        (
            AVX2_ONLY,
            "float32",
            "auto: float32, this CPU (AMD EPYC, x86_64 with AVX2) has no AVX-512 BF16 or AMX",
            "float32",
            "auto: float32, this CPU (AMD EPYC, x86_64 with AVX2) has no AVX-512 BF16 or AMX",
        ),
    ],
)
def test_both_services_show_and_log_the_dtype_and_why(
    capabilities: Mapping[str, Any],
    image_dtype: str,
    image_reason: str,
    text_dtype: str,
    text_reason: str,
    cpu_like: Any,
    tiny_siglip: Path,
    tiny_zimage: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """auto's choice (the default: no --dtype, no EMBED_DTYPE) at start-up, in /info and in the start-up log line;
    the embedding version is the float32 one either way (bfloat16 rounds the same space, it is not another). The
    image service keeps float32 on a CPU even where bfloat16 is native: its pair probabilities would not hold."""
    if text_dtype == "bfloat16" and not torch.backends.mkldnn.is_available():
        pytest.fail("this torch has no oneDNN: auto never picks bfloat16 on its CPU")
    cpu_like(capabilities)
    caplog.set_level(logging.INFO, logger="common.loading")
    apps = [
        (build_image_app(Siglip2Settings(model=str(tiny_siglip), device="cpu")), image_dtype, image_reason),
        (build_text_app(Qwen3Settings(model=str(tiny_zimage), device="cpu")), text_dtype, text_reason),
    ]
    for app, dtype, reason in apps:
        with TestClient(app) as client:
            wait_ready(client)
            info = client.get("/info").json()
            assert (info["dtype"], info["version"]) == (dtype, "1.0")  # 1.0: the version of float32's vectors
            assert info["dtype_reason"].startswith(reason), info["dtype_reason"]
            assert client.post("/embed/text", json={"text": "a cat"}).status_code == 200
    loaded = [record.getMessage() for record in caplog.records if record.getMessage().startswith("loading ")]
    assert len(loaded) == 2
    assert f" as {image_dtype} ({image_reason}" in loaded[0] and f" as {text_dtype} ({text_reason}" in loaded[1]


def test_the_suite_runs_in_float32(image_client: TestClient) -> None:
    """The pin of tests/conftest.py reaches the services: asked for, not auto's choice of this CPU."""
    info = image_client.get("/info").json()
    assert (info["dtype"], info["dtype_reason"]) == ("float32", "float32 was asked for (--dtype float32)")


# --- bfloat16 against float32 on every route, on the tiny models ------------------------------------------------

# What the tiny random models give here, on these inputs (hidden size 32: few values to average the rounding over,
# so noisier than the full-size models, whose figures are in bench/RESULTS.md): images >= 0.99989, SigLIP texts
# >= 0.99996, Qwen3 texts >= 0.99998, token states >= 0.99996; /similarity's probabilities within 6.2e-4 and /rank's
# scores within 2.6e-4. The bounds leave room for another CPU's kernels, which round differently.
MIN_COSINE = {"images": 0.9998, "siglip texts": 0.9999, "qwen3 texts": 0.9999, "token states": 0.9999}
PROBABILITIES_WITHIN = 1e-3


def cosines(got: Any, expected: Any) -> np.ndarray:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return np.sum(got * expected, axis=-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(expected, axis=-1)


@pytest.fixture(scope="module")
def image_clients(tiny_siglip: Path) -> Iterator[tuple[TestClient, TestClient]]:
    """The image service on the tiny model in float32 and in bfloat16 (emulated on a CPU without it: slow, but the
    numbers are the same as native)."""
    yield from loaded_one_after_the_other(
        [build_image_app(Siglip2Settings(model=str(tiny_siglip), device="cpu", dtype=d)) for d in DTYPES]
    )


@pytest.fixture(scope="module")
def text_clients(tiny_zimage: Path) -> Iterator[tuple[TestClient, TestClient]]:
    yield from loaded_one_after_the_other(
        [build_text_app(Qwen3Settings(model=str(tiny_zimage), device="cpu", dtype=d)) for d in DTYPES]
    )


def loaded_one_after_the_other(apps: list[FastAPI]) -> Iterator[tuple[TestClient, TestClient]]:
    """Clients of two apps, the second started once the first has loaded: transformers sets torch's default dtype
    for the whole process while it builds a model, so two models of different dtypes built at once in one process
    could get each other's (a service is a process of its own, and loads one model)."""
    with ExitStack() as stack:
        clients = []
        for app in apps:
            clients.append(stack.enter_context(TestClient(app)))
            wait_ready(clients[-1])
        yield clients[0], clients[1]


def both(clients: tuple[TestClient, TestClient], path: str, **request: Any) -> list[Any]:
    """The float32 and the bfloat16 service's JSON answers to one request."""
    answers = [client.post(path, **request) for client in clients]
    for answer in answers:
        assert answer.status_code == 200, answer.text
    assert [client.get("/info").json()["dtype"] for client in clients] == list(DTYPES)
    return [answer.json() for answer in answers]


PHOTOS = [("files", (f"{seed}.jpg", image_bytes(photo_like(640, 480, seed=seed), "JPEG"))) for seed in range(8)]


def test_image_routes_in_bfloat16_give_float32_s_vectors_and_probabilities(
    image_clients: tuple[TestClient, TestClient],
) -> None:
    """/embed/images, /embed/texts, /similarity (its probabilities use the checkpoint's float32 scalars in every
    dtype, so only the cosines move them) and /rank: per vector the cosine to float32's."""
    images = both(image_clients, "/embed/images", files=PHOTOS)
    assert cosines(images[1]["embeddings"], images[0]["embeddings"]).min() >= MIN_COSINE["images"]
    texts = both(image_clients, "/embed/texts", json={"texts": MIXED_TEXTS})
    assert cosines(texts[1]["embeddings"], texts[0]["embeddings"]).min() >= MIN_COSINE["siglip texts"]
    pairs = both(image_clients, "/similarity", files=PHOTOS, data={"texts": json.dumps(MIXED_TEXTS)})
    probabilities = [np.asarray(answer["similarities"]) for answer in pairs]
    assert probabilities[0].shape == (len(MIXED_TEXTS), len(PHOTOS))
    assert np.abs(probabilities[1] - probabilities[0]).max() <= PROBABILITIES_WITHIN
    ranked = both(image_clients, "/rank", files=PHOTOS, data={"query": "a photo of a cat"})
    scores = [{item["index"]: item["score"] for item in answer["rankings"]} for answer in ranked]
    assert max(abs(scores[1][index] - scores[0][index]) for index in scores[0]) <= PROBABILITIES_WITHIN


def test_text_routes_in_bfloat16_give_float32_s_vectors_and_states(
    text_clients: tuple[TestClient, TestClient],
) -> None:
    """Qwen3's /embed/texts and /v1/embeddings (pooled in float32 from bfloat16 states) and /embed/tokens, whose
    states come in the model's dtype unless asked otherwise: bfloat16 from the bfloat16 model, per token the cosine
    to float32's."""
    texts = both(text_clients, "/embed/texts", json={"texts": MIXED_TEXTS})
    assert cosines(texts[1]["embeddings"], texts[0]["embeddings"]).min() >= MIN_COSINE["qwen3 texts"]
    openai = both(text_clients, "/v1/embeddings", json={"input": MIXED_TEXTS})
    vectors = [[item["embedding"] for item in answer["data"]] for answer in openai]
    assert cosines(vectors[1], vectors[0]).min() >= MIN_COSINE["qwen3 texts"]
    answers = [client.post("/embed/tokens", json={"texts": MIXED_TEXTS}) for client in text_clients]
    states = [load_safetensors(answer.content) for answer in answers]
    for index in range(len(MIXED_TEXTS)):
        float32, bfloat16 = states[0][str(index)], states[1][str(index)]
        assert (float32.dtype, bfloat16.dtype) == (torch.float32, torch.bfloat16)
        assert cosines(bfloat16.float().numpy(), float32.numpy()).min() >= MIN_COSINE["token states"]
