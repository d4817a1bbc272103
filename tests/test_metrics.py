"""/metrics parses as Prometheus text and its counters move with traffic."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from siglip2_embed import Siglip2Settings, build_app
from tests.helpers import image_bytes, photo_like, ready_client


@pytest.fixture(scope="module")
def client(tiny_siglip: Path) -> Iterator[TestClient]:
    yield from ready_client(build_app(Siglip2Settings(model=str(tiny_siglip), api_key="k")))


def samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")  # open like /health: no key needed
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(all_samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return all_samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_move(client: TestClient) -> None:
    auth = {"Authorization": "Bearer k"}
    before = samples(client)
    png = image_bytes(photo_like(20, 20))
    client.post("/embed/images", files=[("files", ("a.png", png)), ("files", ("b.png", png))], headers=auth)
    client.post("/embed/texts", json={"texts": ["a", "b", "c"]}, headers=auth)
    client.post("/embed/texts", json={"texts": []}, headers=auth)
    client.post("/embed/texts", json={"texts": ["a"]})  # no key: 401
    after = samples(client)

    assert value(after, "embed_requests_total", route="/embed/images", status="200") == (
        value(before, "embed_requests_total", route="/embed/images", status="200") + 1
    )
    assert (
        value(after, "embed_items_total", batcher="images") - value(before, "embed_items_total", batcher="images") == 2
    )
    assert value(after, "embed_items_total", batcher="texts") - value(before, "embed_items_total", batcher="texts") == 3
    assert value(after, "embed_errors_total", route="/embed/texts", code="invalid_request") >= 1
    assert value(after, "embed_errors_total", route="/embed/texts", code="invalid_api_key") >= 1
    assert value(after, "embed_batch_size_count", batcher="texts") > value(
        before, "embed_batch_size_count", batcher="texts"
    )
    assert value(after, "embed_queue_wait_seconds_count", batcher="images") >= 2
    assert value(after, "embed_request_seconds_count", route="/embed/texts") >= 3
    assert value(after, "embed_ready") == 1.0 and value(after, "embed_model_load_seconds") > 0
    assert value(after, "embed_queue_depth", batcher="images") == 0
    # unknown paths share one label instead of growing the label set
    client.get("/does/not/exist/123")
    assert value(samples(client), "embed_requests_total", route="unmatched", status="404") >= 1


def test_each_route_and_status_counts_its_own_requests(client: TestClient) -> None:
    """The access log keeps each route's and status's counters at hand: every request still counts once, under its
    own route and status (and error code), and its latency under its route."""
    auth = {"Authorization": "Bearer k"}
    before = samples(client)
    bodies: list[dict[str, list[str]]] = [
        {"texts": ["a"]},
        {"texts": []},
        {"texts": ["b"]},
        {"texts": []},
        {"texts": ["c"]},
    ]
    for body in bodies:
        client.post("/embed/texts", json=body, headers=auth)
    client.post("/embed/text", json={"text": "a"}, headers=auth)
    after = samples(client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("embed_requests_total", route="/embed/texts", status="200") == 3
    assert moved("embed_requests_total", route="/embed/texts", status="422") == 2
    assert moved("embed_errors_total", route="/embed/texts", code="invalid_request") == 2
    assert moved("embed_requests_total", route="/embed/text", status="200") == 1
    assert moved("embed_errors_total", route="/embed/text", code="invalid_request") == 0
    assert moved("embed_request_seconds_count", route="/embed/texts") == 5
    assert moved("embed_request_seconds_count", route="/embed/text") == 1
