"""The text service's vectors equal a reference computed directly with transformers on the same tiny models:
padding to 512 as Z-Image does, ``output_hidden_states=True``, then pooling over the real tokens."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModel, AutoTokenizer

from qwen3_embed import Pooling, Qwen3Encoder, Qwen3Recipe, Qwen3Settings, Template, build_app
from tests.helpers import ready_client

MIN_COSINE = 0.9999
TEXTS = [
    "a cat",
    "A photo of the red sun over the sea, with a tree on the left and a blue dog in front of it. " * 3,
    "x",
    "猫が日向ぼっこをしている 🐈",
    "the " * 700 + "end",  # longer than 512 tokens: truncated
]


def reference(root: Path, texts: list[str], layer: int, pooling: str, template: str) -> np.ndarray:
    subfolders = ("text_encoder", "tokenizer") if (root / "text_encoder").is_dir() else (None, None)
    model = AutoModel.from_pretrained(root, subfolder=subfolders[0] or "").eval()
    tokenizer = AutoTokenizer.from_pretrained(root, subfolder=subfolders[1] or "")
    tokenizer.padding_side = "right"
    if template == "zimage":
        texts = [
            str(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True, enable_thinking=True
                )
            )
            for t in texts
        ]
    batch = tokenizer(texts, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[layer]
    mask = batch["attention_mask"]
    if pooling == "last":
        pooled = hidden[torch.arange(len(texts)), mask.sum(1) - 1]
    else:
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    vectors = pooled.numpy()
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def cosines(actual: object, expected: np.ndarray) -> np.ndarray:
    got = np.asarray(actual, dtype=np.float64).reshape(expected.shape)
    return np.sum(got / np.linalg.norm(got, axis=-1, keepdims=True) * expected, axis=-1)


def encoder(root: Path, **recipe: Any) -> Qwen3Encoder:
    return Qwen3Encoder(str(root), torch.device("cpu"), torch.float32, Qwen3Recipe(**recipe))


@pytest.fixture(scope="module")
def client(tiny_zimage: Path) -> Iterator[TestClient]:
    yield from ready_client(build_app(Qwen3Settings(model=str(tiny_zimage), max_batch_wait_ms=20)))


def test_default_recipe_over_http_matches_zimage_reference(client: TestClient, tiny_zimage: Path) -> None:
    expected = reference(tiny_zimage, TEXTS, layer=-2, pooling="mean", template="zimage")
    single = [client.post("/embed/text", json={"text": text}).json()["embedding"] for text in TEXTS]
    assert np.all(cosines(single, expected) >= MIN_COSINE)
    for route in ("/embed/texts", "/embed/text"):
        body = client.post(route, json={"texts": TEXTS}).json()
        assert np.all(cosines(body["embeddings"], expected) >= MIN_COSINE), route
        np.testing.assert_allclose(np.linalg.norm(body["embeddings"], axis=-1), 1.0, atol=1e-5)


def test_concurrent_requests_match_reference(client: TestClient, tiny_zimage: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    expected = reference(tiny_zimage, TEXTS, layer=-2, pooling="mean", template="zimage")
    jobs = list(range(len(TEXTS))) * 6
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: client.post("/embed/text", json={"text": TEXTS[i]}).json(), jobs))
    for index, body in zip(jobs, results, strict=True):
        assert cosines([body["embedding"]], expected[index : index + 1])[0] >= MIN_COSINE


@pytest.mark.parametrize(
    ("layer", "pooling", "template"), list(itertools.product([-2, -1, 1], ["mean", "last"], ["zimage", "none"]))
)
def test_every_option_combination_on_both_layouts(
    tiny_zimage: Path, tiny_qwen3: Path, layer: int, pooling: Pooling, template: Template
) -> None:
    for root in (tiny_zimage, tiny_qwen3):
        expected = reference(root, TEXTS, layer=layer, pooling=pooling, template=template)
        model = encoder(root, layer=layer, pooling=pooling, template=template)
        got = model.embed_texts(TEXTS)
        assert np.all(cosines(got, expected) >= MIN_COSINE), (root.name, layer, pooling, template)


def test_mixed_length_batches_equal_one_by_one(tiny_zimage: Path) -> None:
    model = encoder(tiny_zimage)
    together = model.embed_texts(TEXTS)
    alone = np.concatenate([model.embed_texts([text]) for text in TEXTS])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)


def test_a_texts_batch_cost_bounds_its_tokens(tiny_zimage: Path) -> None:
    """The batch cost the batcher reckons without the tokenizer is never below the tokens the model reads: the
    template's, and at most max_length."""
    model = encoder(tiny_zimage, max_length=48)
    texts = [*TEXTS, "", "猫" * 40, "word " * 60, "naïve café ﬁ ℃ 🙂" * 3, "<|im_end|> a", "\u00e9" * 10]
    for text, tokens in zip(texts, model.token_counts(texts), strict=True):
        assert tokens <= model.token_bound(text) <= 48, text
    assert model.token_bound("") == model.token_counts([""])[0] == model.template_tokens


def test_dead_layers_are_not_kept(tiny_zimage: Path) -> None:
    penultimate = encoder(tiny_zimage, layer=-2)
    assert len(penultimate.model.layers) == penultimate.num_layers - 1
    assert isinstance(penultimate.model.norm, torch.nn.Identity)
    final = encoder(tiny_zimage, layer=-1)
    assert len(final.model.layers) == final.num_layers


def test_zimage_template_and_truncation(tiny_zimage: Path) -> None:
    model = encoder(tiny_zimage)
    assert model.format("a cat") == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    assert len(model.tokenize(["the " * 700])[0]) == 512


def test_qwen3_embedding_recipe_matches_its_official_usage(tiny_qwen3: Path) -> None:
    """--layer -1 --pooling last --template none: the tokenizer's appended <|endoftext|> is the pooled token, and
    the result equals Qwen3-Embedding's published recipe (left padding, last token, normalise)."""
    model = encoder(tiny_qwen3, layer=-1, pooling="last", template="none")
    eos = model.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert all(ids[-1] == eos for ids in model.tokenize(TEXTS))

    official_tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3, padding_side="left")
    official_model = AutoModel.from_pretrained(tiny_qwen3).eval()
    batch = official_tokenizer(TEXTS, padding=True, truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        last = official_model(**batch).last_hidden_state[:, -1]
    expected = torch.nn.functional.normalize(last, dim=-1).numpy()
    assert np.all(cosines(model.embed_texts(TEXTS), expected) >= MIN_COSINE)


def test_mean_text_pooling_leaves_out_only_the_template_tokens(tiny_zimage: Path) -> None:
    """--pooling mean_text: the mean of hidden_states[-2] over the text's own tokens, the chat template's head
    (<|im_start|>user\\n) and tail (<|im_end|>\\n<|im_start|>assistant\\n) left out; nothing else changes (same
    layer, same template in the model's input), and it is another embedding space (its own version)."""
    texts = TEXTS[:4]  # not truncated
    model = AutoModel.from_pretrained(tiny_zimage, subfolder="text_encoder").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_zimage, subfolder="tokenizer")
    head = len(tokenizer("<|im_start|>user\n")["input_ids"])
    tail = len(tokenizer("<|im_end|>\n<|im_start|>assistant\n")["input_ids"])
    expected = []
    for text in texts:
        prompt = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-2][0]
        expected.append(hidden[head : len(hidden) - tail].mean(0).numpy())
    reference_vectors = np.stack(expected) / np.linalg.norm(expected, axis=-1, keepdims=True)
    text_only = encoder(tiny_zimage, pooling="mean_text")
    assert np.all(cosines(text_only.embed_texts(texts), reference_vectors) >= MIN_COSINE)
    assert text_only.recipe.version() == "1.0+pooling=mean_text"
    # The default recipe is untouched, and differs: the template tokens did count there.
    default = encoder(tiny_zimage).embed_texts(texts)
    assert np.all(cosines(default, reference(tiny_zimage, texts, -2, "mean", "zimage")) >= MIN_COSINE)
    assert np.all(cosines(default, reference_vectors) < 0.999)
    # Without a template every token is the text's: the same vectors as the plain mean.
    no_template = encoder(tiny_zimage, pooling="mean_text", template="none").embed_texts(TEXTS)
    np.testing.assert_allclose(no_template, encoder(tiny_zimage, template="none").embed_texts(TEXTS), atol=1e-5)
    # A batch equals the texts one by one (the pooling masks follow the length-sorted chunks).
    alone = np.concatenate([text_only.embed_texts([text]) for text in TEXTS])
    np.testing.assert_allclose(text_only.embed_texts(TEXTS), alone, rtol=1e-4, atol=1e-5)


def test_the_pooling_reference_computation(tiny_zimage: Path) -> None:
    """bench/pooling_reference.py: the template tokens before the text have the same states for every text, and a
    massive activation on the first token squeezes the all-token cosines towards 1, not the text-only ones."""
    from bench.pooling_reference import pooling_reference

    result = pooling_reference(tiny_zimage, [0.0, 1000.0])
    assert result["prefix_tokens"] >= 3 and result["prefix_difference"] < 1e-5
    plain, massive = result["rows"]
    assert massive["all_tokens"].mean() > 0.99 > plain["all_tokens"].mean()
    np.testing.assert_allclose(massive["text_only"], plain["text_only"], atol=1e-6)
