"""Lending the text encoder to the image generator: ``POST /embed/tokens`` gives the per-token states Z-Image's
diffusers pipeline conditions on, checked against the real ``ZImagePipeline`` on a tiny Z-Image-Turbo folder (every
component, random weights), and ``embed_client.zimage.prompt_embeds`` feeds a pipeline loaded without its text
encoder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline
from diffusers.utils import logging as diffusers_logging
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load as load_safetensors

from embed_client import EmbedClient, WrongService
from embed_client.zimage import RecipeMismatch, check_service, prompt_embeds
from qwen3_embed import Qwen3Encoder, Qwen3Service, Qwen3Settings
from qwen3_embed import build_app as build_text_app
from tests.doc_examples import claimed_blocks
from tests.helpers import CPU, assert_error, ready_client, serve_in_thread, wait_loaded
from tests.tiny_generator import build_tiny_zimage_pipeline

PROMPTS = [
    "a cat",
    "A photo of the red sun over the sea, with a tree on the left and a blue dog in front of it. " * 3,
    "一只猫在晒太阳，旁边有一棵树",
    "",  # the pipelines' default negative prompt
    "the " * 700 + "end",  # past 512 tokens with the template: truncated
]


@pytest.fixture(scope="module", autouse=True)
def quiet_diffusers() -> Iterator[None]:
    diffusers_logging.disable_progress_bar()
    yield
    diffusers_logging.enable_progress_bar()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_zimage_pipeline(tmp_path_factory.mktemp("generator") / "Z-Image-Turbo-tiny")


def pipeline(folder: Path, dtype: torch.dtype, *, with_encoder: bool = True) -> ZImagePipeline:
    components: dict[str, Any] = {} if with_encoder else {"text_encoder": None, "tokenizer": None}
    pipe = ZImagePipeline.from_pretrained(folder, dtype=dtype, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_states(folder: Path, prompts: Sequence[str], dtype: torch.dtype) -> list[torch.Tensor]:
    """The pipeline's own encoding: its chat template, padded to 512, hidden_states[-2], the real tokens."""
    with torch.no_grad():
        states, _ = pipeline(folder, dtype).encode_prompt(list(prompts), do_classifier_free_guidance=False)
    return [rows.float() for rows in states]


def text_service(folder: Path, dtype: torch.dtype = torch.float32, wrap_encode: Any = None, **overrides: Any) -> Any:
    """The text service on ``folder`` on the CPU in ``dtype`` (bfloat16: the numbers a GPU's service gives), its
    text batches' method optionally wrapped."""
    settings = Qwen3Settings(model=str(folder), **overrides)

    def load() -> Qwen3Service:
        encoder = Qwen3Encoder(str(folder), CPU, dtype, settings.recipe())
        if wrap_encode is not None:
            encoder.encode = wrap_encode(encoder.encode)  # type: ignore[method-assign]
        return Qwen3Service(settings, encoder, "cpu")

    return build_text_app(settings, load=load)


@pytest.fixture(scope="module")
def client(folder: Path) -> Iterator[TestClient]:
    yield from ready_client(text_service(folder, max_batch_wait_ms=20))


def states_of(response: Any) -> list[torch.Tensor]:
    assert response.status_code == 200, response.text
    tensors = load_safetensors(response.content)
    return [tensors[str(index)] for index in range(len(tensors))]


def metadata_of(response: Any) -> dict[str, str]:
    length = int.from_bytes(response.content[:8], "little")
    metadata: dict[str, str] = json.loads(response.content[8 : 8 + length])["__metadata__"]
    return metadata


# --- the states are the pipeline's -----------------------------------------------------------------------------------


def test_states_equal_the_pipelines_own_encoding_in_float32(client: TestClient, folder: Path) -> None:
    """One text, a batch of mixed lengths, Chinese text, an empty string and a text past 512 tokens: each equals
    diffusers' encode_prompt to float rounding, alone or in a batch."""
    expected = pipeline_states(folder, PROMPTS, torch.float32)
    batch = states_of(client.post("/embed/tokens", json={"texts": PROMPTS}))
    alone = [states_of(client.post("/embed/tokens", json={"text": prompt}))[0] for prompt in PROMPTS]
    for got_batch, got_alone, reference in zip(batch, alone, expected, strict=True):
        assert got_batch.dtype == torch.float32 and got_batch.shape == reference.shape
        torch.testing.assert_close(got_batch, reference, atol=1e-6, rtol=0)
        torch.testing.assert_close(got_alone, reference, atol=1e-6, rtol=0)
    assert batch[-1].shape[0] == 512  # truncated where the pipeline truncates


def test_states_in_bfloat16_differ_from_the_pipelines_by_rounding_only(folder: Path) -> None:
    """The service in bfloat16 (as on a GPU) against the pipeline in bfloat16: at most one bfloat16 step of the
    values' size apart (measured: equal in a batch padded as the pipeline pads, 3e-5 at a scale of 0.017 alone)."""
    expected = pipeline_states(folder, PROMPTS, torch.bfloat16)
    with TestClient(text_service(folder, torch.bfloat16)) as client:
        wait_loaded(client)
        answer = client.post("/embed/tokens", json={"texts": PROMPTS})
        alone = [states_of(client.post("/embed/tokens", json={"text": prompt}))[0] for prompt in PROMPTS[:3]]
    assert metadata_of(answer)["dtype"] == "bfloat16"
    for got, reference in zip([*states_of(answer), *alone], [*expected, *expected[:3]], strict=True):
        assert got.dtype == torch.bfloat16
        step = 2.0**-8 * float(reference.abs().max())  # bfloat16 keeps 8 significant bits
        assert float((got.float() - reference).abs().max()) <= step


def test_their_mean_is_the_vector(client: TestClient) -> None:
    """Pooling the states gives /embed/texts's vector before normalisation (the default recipe's mean)."""
    texts = PROMPTS[:3]
    states = states_of(client.post("/embed/tokens", json={"texts": texts}))
    vectors = client.post("/embed/texts", json={"texts": texts, "normalize": False}).json()["embeddings"]
    for rows, vector in zip(states, vectors, strict=True):
        np.testing.assert_allclose(rows.mean(dim=0).numpy(), vector, atol=1e-6)


def test_the_answer_names_model_recipe_and_tokens(client: TestClient) -> None:
    answer = client.post("/embed/tokens", json={"texts": ["a cat", "一只猫"]})
    metadata = metadata_of(answer)
    tokens = [rows.shape[0] for rows in states_of(answer)]
    assert json.loads(metadata["tokens"]) == tokens
    assert metadata["model"] == "Z-Image-Turbo-tiny-text-encoder" and metadata["version"] == "1.0"
    assert (metadata["layer"], metadata["template"], metadata["max_length"]) == ("-2", "zimage", "512")
    assert (metadata["dimension"], metadata["dtype"]) == ("32", "float32")
    assert answer.headers["content-type"] == "application/octet-stream"


def test_json_for_curl_and_the_dtype_asked_for(client: TestClient) -> None:
    binary = states_of(client.post("/embed/tokens", json={"texts": ["a cat", ""]}))
    body = client.post("/embed/tokens", json={"texts": ["a cat", ""], "format": "json"}).json()
    assert body["tokens"] == [rows.shape[0] for rows in binary] and body["dimension"] == 32
    assert (body["layer"], body["template"], body["max_length"], body["dtype"]) == (-2, "zimage", 512, "float32")
    for rows, reference in zip(body["states"], binary, strict=True):
        np.testing.assert_allclose(np.asarray(rows, dtype=np.float32), reference.numpy(), rtol=0, atol=0)
    rounded = states_of(client.post("/embed/tokens", json={"text": "a cat", "dtype": "bfloat16"}))[0]
    assert rounded.dtype == torch.bfloat16
    torch.testing.assert_close(rounded, binary[0].to(torch.bfloat16), atol=0, rtol=0)


def test_another_recipe_gives_its_own_states_and_says_so(folder: Path) -> None:
    """With --layer -1 --template none the states are that recipe's: the final normed layer of the raw text."""
    from transformers import AutoModel, AutoTokenizer

    with TestClient(text_service(folder, layer=-1, template="none", max_length=16)) as client:
        wait_loaded(client)
        answer = client.post("/embed/tokens", json={"text": "a red cat on the sea and a dog in the tree"})
    model = AutoModel.from_pretrained(folder, subfolder="text_encoder").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")
    ids = tokenizer(["a red cat on the sea and a dog in the tree"], truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        expected = model(**ids, output_hidden_states=True).hidden_states[-1][0]
    torch.testing.assert_close(states_of(answer)[0], expected, atol=1e-6, rtol=0)
    metadata = metadata_of(answer)
    assert (metadata["layer"], metadata["template"], metadata["max_length"]) == ("-1", "none", "16")
    assert metadata["version"] != "1.0"


# --- the generator ---------------------------------------------------------------------------------------------------


def generate(pipe: ZImagePipeline, **inputs: Any) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    output = pipe(
        height=32, width=32, num_inference_steps=3, guidance_scale=0.0, generator=generator, output_type="np", **inputs
    )
    return np.asarray(output.images)


def test_a_pipeline_without_its_encoder_generates_from_the_services_states(folder: Path) -> None:
    """A pipeline loaded with text_encoder=None, tokenizer=None, fed by prompt_embeds: its images equal the full
    pipeline's when the service computes in bfloat16 as the pipeline does; a float32 service's differ from them by
    exactly what rounding the full pipeline's own float32 encoding to bfloat16 makes (measured: 0.0098 at most,
    0.0013 on average, on pixels in [0, 1])."""
    prompts = ["a red cat on the sea", "一只猫在晒太阳"]
    full = pipeline(folder, torch.bfloat16)
    own = generate(full, prompt=list(prompts))
    borrowed = pipeline(folder, torch.bfloat16, with_encoder=False)
    assert borrowed.text_encoder is None and borrowed.tokenizer is None
    for dtype in (torch.bfloat16, torch.float32):
        with serve_in_thread(text_service(folder, dtype)) as url:
            embeds = prompt_embeds(url, prompts, pipeline=borrowed)
        assert [rows.dtype for rows in embeds] == [torch.bfloat16] * 2
        images = generate(borrowed, prompt_embeds=embeds)
        if dtype == torch.bfloat16:
            np.testing.assert_array_equal(images, own)
        else:
            rounded = [rows.to(torch.bfloat16) for rows in pipeline_states(folder, prompts, torch.float32)]
            rounding_alone = generate(full, prompt_embeds=rounded)
            np.testing.assert_array_equal(images, rounding_alone)
            assert 0 < np.abs(images - own).max() < 0.05


def test_the_client_decodes_every_dtype_to_float32(folder: Path) -> None:
    with serve_in_thread(text_service(folder, torch.bfloat16)) as url, EmbedClient(url) as client:
        states = client.embed_tokens(["a cat", "", "一只猫"])
        expected = [rows.float().numpy() for rows in pipeline_states(folder, ["a cat", "", "一只猫"], torch.bfloat16)]
        assert client.embed_tokens([]) == []
    for rows, reference in zip(states, expected, strict=True):
        assert rows.dtype == np.float32
        np.testing.assert_allclose(rows, reference, atol=2.0**-8 * float(np.abs(reference).max()), rtol=0)


def test_the_client_splits_so_that_no_answer_passes_the_bound(folder: Path) -> None:
    """A bound of two full-length texts: twelve texts go in requests of two, and every state comes back in order."""
    bound = 2 * 512 * 32 * 4
    with serve_in_thread(text_service(folder, max_token_states_bytes=bound)) as url, EmbedClient(url) as client:
        texts = [f"{'a cat on the sea ' * index}{index}" for index in range(12)]
        states = client.embed_tokens(texts)
        assert client.requests_sent == 6
        singles = [client.embed_tokens([text])[0] for text in texts]
    for rows, single in zip(states, singles, strict=True):
        np.testing.assert_allclose(rows, single, atol=1e-6, rtol=0)


def test_prompt_embeds_refuses_a_service_of_another_recipe_or_width(folder: Path) -> None:
    refused = pytest.raises(RecipeMismatch, match=r"layer=-1 \(Z-Image: -2\).*--layer -2")
    with serve_in_thread(text_service(folder, layer=-1)) as url, refused:
        prompt_embeds(url, ["a cat"])
    recipe = {"layer": -2, "template": "zimage", "max_length": 512}
    info: dict[str, Any] = {"model": "m", "dimension": 32, "recipe": recipe}
    check_service(info, cap_feat_dim=32)
    with pytest.raises(RecipeMismatch, match=r"32-d states.*cap_feat_dim=2560"):
        check_service(info, cap_feat_dim=2560)
    with pytest.raises(RecipeMismatch, match="template='none'"):
        check_service({**info, "recipe": {**recipe, "template": "none"}})


def test_prompt_embeds_waits_out_a_hold(folder: Path) -> None:
    """A generator's script asks while the model is held asleep: it is answered once the model is woken."""
    with serve_in_thread(text_service(folder)) as url, EmbedClient(url, backoff_s=0.01) as client:
        client.sleep(hold=True)

        def wake_while_waiting(_seconds: float) -> None:  # the hold ends while the client waits out Retry-After
            client.wake()

        client._sleep = wake_while_waiting
        embeds = prompt_embeds(client, ["a cat"], dtype=torch.float32)
        assert embeds[0].shape == (21, 32) and client.info(refresh=True)["sleep"]["state"] == "awake"


def test_the_generator_recipe_runs(folder: Path, tmp_path: Path) -> None:
    """docs/generator.md's recipe as written, on the tiny pipeline: the folder, the device, the service's port and
    the image size are the test's (a 1024 x 1024 image takes minutes on the CPU)."""
    (block,) = claimed_blocks("tests/test_zimage_tokens.py::test_the_generator_recipe_runs")
    with serve_in_thread(text_service(folder)) as url:
        replace = {
            '"/mnt/hdd/models/Z-Image-Turbo"': repr(str(folder)),
            '.to("cuda")': '.to("cpu")',
            '"http://127.0.0.1:6011"': repr(url),
            "height=1024, width=1024": "height=32, width=32",
        }
        code = block.body
        for old, new in replace.items():
            assert old in code, f"{block.where}: the recipe no longer has {old}"
            code = code.replace(old, new)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this clone's embed_client
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(tmp_path / "fox.png").size == (32, 32)


# --- the same machinery as /embed/texts -----------------------------------------------------------------------------


def test_a_batch_mixes_both_routes_and_every_answer_is_right(folder: Path) -> None:
    """Vectors and states requested at once share forward passes (one batch here), and each gets its own rows."""
    texts = ["a cat", "the sea and the sun " * 4, "一只猫", "x"]
    with TestClient(text_service(folder)) as client:
        wait_loaded(client)
        alone_vectors = [client.post("/embed/text", json={"text": t}).json()["embedding"] for t in texts]
        alone_states = [states_of(client.post("/embed/tokens", json={"text": t}))[0] for t in texts]
    batches: list[list[Any]] = []
    seen = threading.Lock()

    def recording(encode: Any) -> Any:
        def run(items: list[Any]) -> Any:
            with seen:
                batches.append(list(items))
            return encode(items)

        return run

    with TestClient(text_service(folder, wrap_encode=recording, max_batch_wait_ms=300)) as client:
        wait_loaded(client)
        batches.clear()
        with ThreadPoolExecutor(8) as pool:
            vectors = [pool.submit(client.post, "/embed/text", json={"text": t}) for t in texts]
            states = [pool.submit(client.post, "/embed/tokens", json={"text": t}) for t in texts]
            got_vectors = [future.result().json()["embedding"] for future in vectors]
            got_states = [states_of(future.result())[0] for future in states]
    assert any(
        any(isinstance(item, str) for item in batch) and any(not isinstance(item, str) for item in batch)
        for batch in batches
    ), batches
    np.testing.assert_allclose(got_vectors, alone_vectors, atol=1e-6)
    for got, alone in zip(got_states, alone_states, strict=True):
        torch.testing.assert_close(got, alone, atol=1e-6, rtol=0)


# --- bad input, and the checks every route has ------------------------------------------------------------------------


def test_too_large_answers_are_refused_before_any_work(folder: Path) -> None:
    """The bound counts the answer (tokens x dimension x bytes a value, a JSON value at 16): refused with a 413 that
    names it, without a forward pass; the same texts fit in the binary format."""
    calls: list[int] = []

    def counting(encode: Any) -> Any:
        def run(items: list[Any]) -> Any:
            calls.append(len(items))
            return encode(items)

        return run

    bound = 512 * 32 * 4  # one full-length text in float32
    app = text_service(folder, wrap_encode=counting, max_token_states_bytes=bound, max_items_per_request=4)
    with TestClient(app) as client:
        wait_loaded(client)
        long_text = "the " * 700
        error = assert_error(client.post("/embed/tokens", json={"texts": [long_text, "a"]}), 413, "payload_too_large")
        assert f"max_token_states_bytes={bound}" in error["message"] and "tokens x 32 values" in error["message"]
        error = assert_error(
            client.post("/embed/tokens", json={"text": long_text, "format": "json"}), 413, "payload_too_large"
        )
        assert "x 16 bytes" in error["message"]
        too_many = client.post("/embed/tokens", json={"texts": ["a"] * 5})
        assert_error(too_many, 413, "too_many_items")
        assert calls == []
        assert client.post("/embed/tokens", json={"text": long_text}).status_code == 200
        assert client.post("/embed/tokens", json={"text": long_text, "dtype": "bfloat16"}).status_code == 200
        assert client.get("/info").json()["limits"]["max_token_states_bytes"] == bound


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, "invalid_request"),
        ({"text": "a", "texts": ["b"]}, "invalid_request"),
        ({"texts": []}, "invalid_request"),
        ({"texts": ["a", 3]}, "invalid_request"),
        ({"text": "a", "format": "npy"}, "invalid_request"),
        ({"text": "a", "dtype": "float16"}, "invalid_request"),
        ({"text": "\ud800"}, "invalid_request"),
    ],
)
def test_malformed_requests_are_422_in_the_envelope(client: TestClient, body: dict[str, Any], code: str) -> None:
    raw = json.dumps(body)  # ASCII: a lone surrogate travels escaped, as a client's JSON encoder sends it
    assert_error(client.post("/embed/tokens", content=raw, headers={"Content-Type": "application/json"}), 422, code)


def test_the_image_service_has_no_such_route(image_client: TestClient, tiny_siglip: Path) -> None:
    assert_error(image_client.post("/embed/tokens", json={"text": "a cat"}), 404, "not_found")
    refused = pytest.raises(WrongService, match=r"no per-token states.*text service, port 6011")
    with serve_in_thread(image_client.app) as url, EmbedClient(url) as client, refused:  # type: ignore[arg-type]
        client.embed_tokens(["a cat"])


def test_a_layer_the_model_does_not_have_fails_at_start(folder: Path) -> None:
    with TestClient(text_service(folder, layer=-9)) as client:
        assert wait_loaded(client).json()["status"] == "unhealthy"


def test_key_host_origin_metrics_and_sleep_apply_to_it(folder: Path) -> None:
    """The API key, the Host and Origin checks, wake on request, the hold and the per-route metrics."""
    with TestClient(text_service(folder, api_key="k", allowed_hosts=["testserver"])) as client:
        wait_loaded(client)
        key = {"Authorization": "Bearer k"}
        assert_error(client.post("/embed/tokens", json={"text": "a"}), 401, "invalid_api_key")
        assert_error(
            client.post("/embed/tokens", json={"text": "a"}, headers={**key, "Host": "evil.example"}),
            400,
            "invalid_host",
        )
        assert_error(
            client.post("/embed/tokens", json={"text": "a"}, headers={**key, "Origin": "http://evil.example"}),
            403,
            "cross_origin",
        )
        expected = states_of(client.post("/embed/tokens", json={"text": "a cat"}, headers=key))[0]
        assert client.post("/admin/sleep", headers=key).json()["state"] == "asleep"
        woken = states_of(client.post("/embed/tokens", json={"text": "a cat"}, headers=key))[0]
        torch.testing.assert_close(woken, expected, atol=0, rtol=0)
        assert client.post("/admin/sleep", json={"hold": True}, headers=key).json()["state"] == "held"
        assert_error(client.post("/embed/tokens", json={"text": "a cat"}, headers=key), 503, "asleep")
        client.post("/admin/wake", headers=key)
        metrics = client.get("/metrics").text
        assert 'embed_requests_total{route="/embed/tokens",status="200"} 2.0' in metrics
        assert 'embed_requests_total{route="/embed/tokens",status="503"} 1.0' in metrics
