"""A Hugging Face fast tokenizer keeps its padding and truncation settings as state that every call rewrites: two
threads tokenizing with different settings (a text batch on the model's worker, the OpenAI route counting tokens
in another thread) break each other's calls. Measured on the tiny SigLIP encoder: about one call in ten failed
while another thread counted tokens, which fails requests and, three times in a row, marks the device unhealthy.
So everything that touches an encoder runs on the model's one worker thread."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from qwen3_embed import Qwen3Encoder
from siglip2_embed import Siglip2Encoder
from tests.helpers import image_app, serving, text_app

CPU = torch.device("cpu")


def test_a_fast_tokenizer_keeps_its_call_settings_as_shared_state(tiny_siglip: Path) -> None:
    """Why the rule exists, shown without a race (a race only shows up now and then): each call rewrites the
    backend tokenizer's padding setting, which another thread's call in flight then reads. If a tokenizers release
    stops doing this, the rule may be relaxed."""
    encoder = Siglip2Encoder(str(tiny_siglip), CPU, torch.float32)
    backend = encoder.tokenizer._tokenizer
    assert backend is not None
    encoder.tokenize(["a cat"])
    assert backend.padding is not None and backend.padding["length"] == encoder.text_length
    encoder.count_tokens(["a cat"])
    assert backend.padding is None


def recording(method: Callable[..., Any], threads: list[str]) -> Callable[..., Any]:
    def wrapper(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return method(*args)

    return wrapper


@pytest.mark.parametrize("service", ["image", "text"])
def test_every_encoder_call_runs_on_the_model_worker(service: str, tiny_siglip: Path, tiny_zimage: Path) -> None:
    threads: list[str] = []
    app = image_app(tiny_siglip) if service == "image" else text_app(tiny_zimage)
    with serving(app) as client:
        encoder: Siglip2Encoder | Qwen3Encoder = app.state.runtime.model.encoder
        encoder.count_tokens = recording(encoder.count_tokens, threads)  # type: ignore[method-assign]
        for body in ({"input": ["a cat", "a dog"]}, {"input": "one text"}):
            assert client.post("/v1/embeddings", json=body).status_code == 200
    assert threads and all(name.startswith("model") for name in threads), threads
