"""Batching under concurrency: many clients at once, every request shape mixed (single, batch, base64, multipart,
/v1/embeddings with images between texts), and every response carries exactly its own rows, in order, equal to
what each input gets alone; and the micro-batcher really merged requests into shared forward passes."""

from __future__ import annotations

import base64
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from qwen3_embed import Qwen3Encoder
from tests.helpers import MIXED_TEXTS, assert_same_vectors, image_app, mixed_images, serving, text_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def mean_batch_size(client: TestClient, batcher: str) -> float:
    """From /metrics: items per forward pass, averaged."""
    lines = client.get("/metrics").text.splitlines()
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in lines
        if line.startswith(("embed_batch_size_sum", "embed_batch_size_count")) and f'batcher="{batcher}"' in line
    }
    total = values[f'embed_batch_size_sum{{batcher="{batcher}"}}']
    count = values[f'embed_batch_size_count{{batcher="{batcher}"}}']
    return total / count


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_concurrent_mixed_image_service_requests_keep_their_rows(tiny_siglip: Path) -> None:
    images = mixed_images()
    with serving(image_app(tiny_siglip, max_batch_size=16, max_batch_wait_ms=3)) as client:
        # One by one first: the vector each input gets alone.
        alone_images = [
            np.asarray(client.post("/embed/image", files={"file": ("x", data)}).json()["embedding"]) for data in images
        ]
        alone_texts = [
            np.asarray(client.post("/embed/text", json={"text": t}).json()["embedding"]) for t in MIXED_TEXTS
        ]

        rng = random.Random(6)
        jobs: list[tuple[str, list[int], list[int]]] = []  # (kind, image indices, text indices)
        kinds = ["image", "image_b64", "images_multipart", "images_json", "text", "texts", "v1", "v1_images"]
        for _ in range(320):
            kind = rng.choice(kinds)
            image_ids = [rng.randrange(len(images)) for _ in range(rng.randint(1, 5))]
            text_ids = [rng.randrange(len(MIXED_TEXTS)) for _ in range(rng.randint(1, 5))]
            jobs.append((kind, image_ids, text_ids))

        def run(job: tuple[str, list[int], list[int]]) -> tuple[list[Any], list[np.ndarray]]:
            kind, image_ids, text_ids = job
            encoded = [base64.b64encode(images[i]).decode() for i in image_ids]
            if kind == "image":
                body = client.post("/embed/image", files={"file": ("x", images[image_ids[0]])}).json()
                return [body["embedding"]], [alone_images[image_ids[0]]]
            if kind == "image_b64":
                body = client.post("/embed/image/base64", json={"image_base64": encoded[0]}).json()
                return [body["embedding"]], [alone_images[image_ids[0]]]
            if kind == "images_multipart":
                files = [("files", (f"{i}.img", images[i])) for i in image_ids]
                return client.post("/embed/images", files=files).json()["embeddings"], [
                    alone_images[i] for i in image_ids
                ]
            if kind == "images_json":
                body = client.post("/embed/images", json={"images_base64": encoded}).json()
                return body["embeddings"], [alone_images[i] for i in image_ids]
            if kind == "text":
                body = client.post("/embed/text", json={"text": MIXED_TEXTS[text_ids[0]]}).json()
                return [body["embedding"]], [alone_texts[text_ids[0]]]
            if kind == "texts":
                body = client.post("/embed/texts", json={"texts": [MIXED_TEXTS[i] for i in text_ids]}).json()
                return body["embeddings"], [alone_texts[i] for i in text_ids]
            # /v1/embeddings: texts, and on the image service data:image URIs mixed in between them
            inputs: list[str] = [MIXED_TEXTS[i] for i in text_ids]
            expected = [alone_texts[i] for i in text_ids]
            if kind == "v1_images":
                for position, i in enumerate(image_ids):
                    inputs.insert(position * 2, _data_uri(images[i]))
                    expected.insert(position * 2, alone_images[i])
            body = client.post("/v1/embeddings", json={"input": inputs}).json()
            assert [item["index"] for item in body["data"]] == list(range(len(inputs)))
            return [item["embedding"] for item in body["data"]], expected

        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(run, jobs))
        assert len(results) == len(jobs)  # none lost
        for got, expected in results:
            assert_same_vectors(got, expected)
        # and the batcher really merged requests (otherwise this test would prove nothing)
        assert mean_batch_size(client, "images") > 1.5 and mean_batch_size(client, "texts") > 1.5


def test_concurrent_text_service_requests_keep_their_rows(tiny_zimage: Path) -> None:
    # Texts of very different lengths, in batches that a budget of 256 padded tokens keeps to a few texts each.
    texts = [*MIXED_TEXTS, "word " * 60, "a b c " * 20, "猫" * 40]
    passes: list[list[str]] = []

    def recording(encode: Any) -> Any:
        def run(items: list[Any]) -> Any:
            passes.append(list(items))
            return encode(items)

        return run

    app = text_app(tiny_zimage, wrap_texts=recording, max_batch_size=24, max_batch_wait_ms=3, max_batch_tokens=256)
    with serving(app) as client:
        alone = [np.asarray(client.post("/embed/text", json={"text": t}).json()["embedding"]) for t in texts]
        rng = random.Random(7)
        jobs = [
            (rng.choice(["text", "texts", "v1"]), [rng.randrange(len(texts)) for _ in range(rng.randint(1, 6))])
            for _ in range(240)
        ]

        def run(job: tuple[str, list[int]]) -> tuple[list[Any], list[np.ndarray]]:
            kind, ids = job
            if kind == "text":
                return [client.post("/embed/text", json={"text": texts[ids[0]]}).json()["embedding"]], [alone[ids[0]]]
            if kind == "texts":
                body = client.post("/embed/texts", json={"texts": [texts[i] for i in ids]}).json()
                return body["embeddings"], [alone[i] for i in ids]
            body = client.post("/v1/embeddings", json={"input": [texts[i] for i in ids]}).json()
            return [item["embedding"] for item in body["data"]], [alone[i] for i in ids]

        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(run, jobs))
        assert len(results) == len(jobs)
        for got, expected in results:
            assert_same_vectors(got, expected)
        assert mean_batch_size(client, "texts") > 1.5
    # Every pass the model ran is a batch the batcher formed, padded within the budget.
    counter = Qwen3Encoder(str(tiny_zimage), torch.device("cpu"), torch.float32)
    for batch in passes:
        assert len(batch) == 1 or len(batch) * max(counter.token_counts(batch)) <= 256, batch
