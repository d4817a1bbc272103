"""A model's identity is its weights, not its folder: the fingerprint (the same for the same weights in any folder,
another for other weights, cheap to take), the names of known checkpoints read from their config, and a wake that
finds other weights in the folder than the ones loaded at start: it refuses (503 ``model_changed``) instead of
serving them under the old name and version."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
import torch
from transformers import SiglipConfig

from bench.models import SO400M_512
from common.identity import known_siglip_name, weights_fingerprint
from common.tiny_models import build_tiny_siglip, build_tiny_zimage
from embed_client import EmbedClient, IndexMismatch, index_folder
from qwen3_embed import Qwen3Settings
from qwen3_embed import build_app as build_text_app
from siglip2_embed import Siglip2Settings
from siglip2_embed import build_app as build_image_app
from tests.helpers import assert_error, image_bytes, photo_like, serve_in_thread

# --- the fingerprint --------------------------------------------------------------------------------------------------


def test_the_same_weights_in_any_folder_have_one_fingerprint(tiny_siglip: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_siglip, tmp_path / "renamed")
    assert weights_fingerprint([copy]) == weights_fingerprint([tiny_siglip])
    other_seed = build_tiny_siglip(tmp_path / "other-seed", seed=7)
    wider = build_tiny_siglip(tmp_path / "wider", hidden_size=64)
    fingerprints = {weights_fingerprint([folder]) for folder in (tiny_siglip, other_seed, wider)}
    assert len(fingerprints) == 3 and all(len(f) == 16 for f in fingerprints)


def test_a_changed_tensor_or_config_changes_the_fingerprint(tiny_siglip: Path, tmp_path: Path) -> None:
    """A fine-tune changes tensors' bytes (here one tensor of many); a config change changes the numbers too. The
    keys that only say where or by what a file was saved do not count."""
    from safetensors.torch import load_file, save_file

    before = weights_fingerprint([tiny_siglip])
    tuned = shutil.copytree(tiny_siglip, tmp_path / "tuned")
    weights = load_file(tuned / "model.safetensors")
    name = sorted(weights)[len(weights) // 2]
    weights[name] = weights[name] + 0.01
    save_file(weights, tuned / "model.safetensors", metadata={"format": "pt"})
    assert weights_fingerprint([tuned]) != before
    resaved = shutil.copytree(tiny_siglip, tmp_path / "resaved")
    config = json.loads((resaved / "config.json").read_text())
    (resaved / "config.json").write_text(
        json.dumps({**config, "_name_or_path": "/elsewhere", "transformers_version": "9"})
    )
    assert weights_fingerprint([resaved]) == before
    (resaved / "config.json").write_text(json.dumps({**config, "projection_size": 7}))
    assert weights_fingerprint([resaved]) != before


def test_the_fingerprint_reads_a_sample_not_the_weights(tmp_path: Path) -> None:
    """A checkpoint of 400 MB: its fingerprint takes a fraction of a second (two pages a tensor, not the file)."""
    from safetensors.torch import save_file

    folder = tmp_path / "large"
    folder.mkdir()
    save_file({f"layer{i}.weight": torch.zeros(1000, 1000) for i in range(100)}, folder / "model.safetensors")
    (folder / "config.json").write_text("{}")
    started = time.perf_counter()
    weights_fingerprint([folder])
    assert time.perf_counter() - started < 1.0


def test_known_checkpoints_are_named_by_their_config() -> None:
    """SigLIP2 so400m-patch16-512 is siglip2-so400m-patch16-512 whatever its folder; SigLIP (1) by its vocabulary;
    a checkpoint of another shape has no known name (its folder names it)."""
    assert known_siglip_name(SiglipConfig(**SO400M_512)) == "siglip2-so400m-patch16-512"
    v1 = {**SO400M_512, "text_config": {**SO400M_512["text_config"], "vocab_size": 32000}}
    v1["vision_config"] = {**SO400M_512["vision_config"], "patch_size": 14, "image_size": 384}
    assert known_siglip_name(SiglipConfig(**v1)) == "siglip-so400m-patch14-384"
    tiny = SiglipConfig(vision_config={"hidden_size": 32, "num_hidden_layers": 2}, text_config={"vocab_size": 300})
    assert known_siglip_name(tiny) is None


def test_health_and_info_show_the_fingerprint(image_client: Any, tiny_siglip: Path) -> None:
    expected = weights_fingerprint([tiny_siglip])
    assert image_client.get("/health").json()["fingerprint"] == expected
    assert image_client.get("/info").json()["fingerprint"] == expected


# --- a wake finds other weights ---------------------------------------------------------------------------------------


def replace_folder(folder: Path, build: Any) -> None:
    """What updating the generator's model folder does: the same path, other files."""
    shutil.rmtree(folder)
    build(folder)


def health(url: str) -> dict[str, Any]:
    body: dict[str, Any] = requests.get(url + "/health", timeout=10).json()
    return body


@pytest.mark.parametrize("service", ["qwen3", "siglip2"])
def test_a_wake_that_finds_other_weights_refuses_and_says_to_restart(
    service: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``unload`` mode (the CPU's default): while asleep, the folder gets another checkpoint (a 64-d SigLIP where a
    32-d one was loaded; a Qwen3 of the same shape, other weights). The wake refuses with 503 ``model_changed``,
    says a restart serves the new weights, logs it, never serves them; with the old weights back it wakes."""
    folder = tmp_path / "model"
    if service == "qwen3":
        build_tiny_zimage(folder)
        app = build_text_app(Qwen3Settings(model=str(folder), sleep_mode="unload"))
        other = lambda out: build_tiny_zimage(out, seed=5)  # noqa: E731
    else:
        build_tiny_siglip(folder)
        app = build_image_app(Siglip2Settings(model=str(folder), sleep_mode="unload"))
        other = lambda out: build_tiny_siglip(out, hidden_size=64)  # noqa: E731
    backup = shutil.copytree(folder, tmp_path / "backup")
    with serve_in_thread(app) as url:
        before = requests.post(url + "/embed/text", json={"text": "a cat"}, timeout=60).json()
        identity = health(url)
        assert requests.post(url + "/admin/sleep", timeout=60).json()["state"] == "asleep"
        replace_folder(folder, other)
        with caplog.at_level(logging.ERROR):
            for _ in range(2):  # every request tries the wake again, and is refused again
                error = assert_error(
                    requests.post(url + "/embed/text", json={"text": "a cat"}, timeout=60), 503, "model_changed"
                )
        assert "Restart the service" in error["message"] and identity["fingerprint"] in error["message"]
        assert "holds other weights" in caplog.text
        assert health(url) == {**identity, "state": "asleep"}  # the old identity, still: nothing else was served
        shutil.rmtree(folder)
        shutil.copytree(backup, folder)
        after = requests.post(url + "/embed/text", json={"text": "a cat"}, timeout=60).json()
        assert after["dimension"] == before["dimension"] == 32
        np.testing.assert_array_equal(after["embedding"], before["embedding"])


def test_offload_keeps_the_weights_it_had_whatever_the_folder_holds(tmp_path: Path) -> None:
    """``offload`` (the CUDA default) never reads the folder on a wake: the weights are the ones in host memory."""
    folder = build_tiny_zimage(tmp_path / "model")
    with serve_in_thread(build_text_app(Qwen3Settings(model=str(folder), sleep_mode="offload"))) as url:
        before = requests.post(url + "/embed/text", json={"text": "a cat"}, timeout=60).json()["embedding"]
        requests.post(url + "/admin/sleep", timeout=60)
        replace_folder(folder, lambda out: build_tiny_zimage(out, seed=5))
        after = requests.post(url + "/embed/text", json={"text": "a cat"}, timeout=60).json()["embedding"]
    np.testing.assert_array_equal(after, before)


# --- the indexer and the import record the weights ----------------------------------------------------------------


def index_with_service(model: Path, photos: Path, out: Path, **options: Any) -> Any:
    """The standalone indexer through the image service on ``model``."""
    with serve_in_thread(build_image_app(Siglip2Settings(model=str(model)))) as url, EmbedClient(url) as client:
        return index_folder(photos, out, client, progress=False, **options)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(3):
        (folder / f"p{index}.png").write_bytes(image_bytes(photo_like(40, 30, seed=index)))
    return folder


def test_the_indexer_keeps_an_index_of_the_same_weights_in_a_renamed_folder(
    tiny_siglip: Path, photos: Path, tmp_path: Path
) -> None:
    """The same weights copied to a folder of another name: the index is theirs (nothing embedded again), although
    the service names the model after its new folder; the rows carry the weights' fingerprint."""
    out = tmp_path / "vectors.parquet"
    assert index_with_service(tiny_siglip, photos, out).embedded == 3
    renamed = shutil.copytree(tiny_siglip, tmp_path / "siglip2")
    summary = index_with_service(renamed, photos, out)
    assert (summary.embedded, summary.skipped) == (0, 3)
    assert set(pq.read_table(out)["fingerprint"].to_pylist()) == {weights_fingerprint([tiny_siglip])}


def test_the_indexer_refuses_an_index_of_other_weights_under_the_same_name(photos: Path, tmp_path: Path) -> None:
    """Another checkpoint in a folder of the same name (the same model name, version and dimension): refused, with
    a message that says so, unless --reindex."""
    out = tmp_path / "vectors.parquet"
    model = build_tiny_siglip(tmp_path / "first" / "siglip2")
    index_with_service(model, photos, out)
    other = build_tiny_siglip(tmp_path / "second" / "siglip2", seed=9)
    with pytest.raises(IndexMismatch, match=r"made by other weights \(fingerprint \w+\).*--reindex"):
        index_with_service(other, photos, out)
    assert index_with_service(other, photos, out, reindex=True).embedded == 3


def test_an_index_from_before_fingerprints_carries_on(tiny_siglip: Path, photos: Path, tmp_path: Path) -> None:
    """Rows without a fingerprint are the service's when the model's name and version match, as before; the rows
    written from then on carry the fingerprint."""
    out = tmp_path / "vectors.parquet"
    index_with_service(tiny_siglip, photos, out)
    pq.write_table(pq.read_table(out).drop_columns(["fingerprint"]), out)  # an index written before fingerprints
    (photos / "new.png").write_bytes(image_bytes(photo_like(20, 20, seed=5)))
    summary = index_with_service(tiny_siglip, photos, out)
    assert (summary.embedded, summary.skipped) == (1, 3)
    fingerprints = dict(zip(*pq.read_table(out, columns=["path", "fingerprint"]).to_pydict().values(), strict=True))
    assert fingerprints["new.png"] == weights_fingerprint([tiny_siglip]) and fingerprints["p0.png"] is None
