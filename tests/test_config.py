"""Settings come from flags, then SERVICE_* variables, then EMBED_* variables, then defaults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.config import load_settings
from common.loading import pick_device
from common.precision import pick_dtype
from siglip2_embed import HUB_ID, Siglip2Settings, main


def test_flags_beat_service_env_beats_shared_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGLIP2_PORT", "7001")
    monkeypatch.setenv("EMBED_MAX_BATCH_SIZE", "5")
    monkeypatch.setenv("SIGLIP2_MAX_BATCH_SIZE", "6")
    monkeypatch.setenv("EMBED_HOST", "0.0.0.0")
    monkeypatch.setenv("PORT", "1")  # a generic PORT from the environment must not leak in
    settings = load_settings(Siglip2Settings, ["--model", "/models/x", "--device", "cpu", "--dtype", "float32"])
    assert (settings.model, settings.port, settings.max_batch_size, settings.host) == ("/models/x", 7001, 6, "0.0.0.0")
    assert load_settings(Siglip2Settings, ["--port", "7002"]).port == 7002


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(Siglip2Settings, [])
    assert settings.port == 6010 and settings.host == "127.0.0.1" and settings.model == HUB_ID
    assert settings.api_key is None and settings.device == "auto"


def test_force_cpu_and_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORCE_CPU", "1")
    settings = load_settings(Siglip2Settings, ["--device", "auto"])
    assert settings.force_cpu and pick_device(settings) == torch.device("cpu")
    assert pick_dtype("auto", torch.device("cuda", 0)).dtype == torch.bfloat16
    assert (
        pick_dtype("float16", torch.device("cpu")).dtype == torch.float16
    )  # auto on a CPU: tests/test_dtype_choice.py


def test_bad_value_is_a_short_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_settings(Siglip2Settings, ["--device", "gpu"])
    assert exit_info.value.code == 2
    assert "device" in capsys.readouterr().err


def test_missing_model_explains_how_to_download(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", str(tmp_path / "nowhere")]) == 1
    message = capsys.readouterr().err
    assert "nowhere" in message and "hf download google/siglip2-so400m-patch16-512" in message
    assert "modelscope download" in message and "Traceback" not in message


def test_uncached_hub_id_offline_is_a_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    assert main(["--model", "google/siglip2-so400m-patch16-512"]) == 1
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE" in err and "hf download" in err and "Traceback" not in err


def test_only_the_text_encoder_of_z_image_is_downloaded() -> None:
    from qwen3_embed import text_encoder_files

    zimage = ["model_index.json", "text_encoder/model.safetensors", "transformer/x.safetensors", "vae/config.json"]
    assert text_encoder_files(zimage) == ["text_encoder/*", "tokenizer/*", "model_index.json"]
    assert text_encoder_files(["config.json", "model.safetensors", "tokenizer.json"]) is None


def test_compile_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(Siglip2Settings, ["--compile"]).compile
    monkeypatch.setenv("EMBED_COMPILE", "true")
    assert load_settings(Siglip2Settings, []).compile


def test_a_siglip_start_logs_no_warning_about_transformers_default_text_config(tiny_siglip: Path) -> None:
    """transformers builds its default SiglipTextConfig (whose token ids lie outside its vocabulary) whenever it
    prints a SigLIP config: every start warned "eos_token_id must be None or an integer within the vocabulary"."""
    code = (
        "import sys; from common.server import configure_logging; configure_logging('info'); "
        "from transformers import AutoConfig; AutoConfig.from_pretrained(sys.argv[1])"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code, str(tiny_siglip)], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "within the vocabulary" not in result.stderr


def test_building_a_tiny_siglip_logs_no_warning_about_transformers_default_text_config(tmp_path: Path) -> None:
    """A container's --tiny start builds its tiny SigLIP in a process of its own, before any logging is set up: it
    printed the same warning twice."""
    code = "import sys, pathlib, common.tiny_models as t; t.build_tiny_siglip(pathlib.Path(sys.argv[1]))"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "tiny")], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "within the vocabulary" not in result.stderr
