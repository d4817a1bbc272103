"""Property-based fuzzing of both services' OpenAPI schemas with schemathesis: valid and invalid bodies, headers and
parameters for every operation (the multipart/JSON route /embed/images included), never a 5xx.

Derandomised (the same examples on every run) and bounded so that both services take well under 30 s on CI.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.python import asgi

from tests.helpers import image_app, text_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models; OpenMP threads would only spin

EXAMPLES_PER_OPERATION = 25
IMAGE_OPERATIONS = [
    "GET /health",
    "GET /info",
    "GET /metrics",
    "POST /embed/image",
    "POST /embed/image/base64",
    "POST /embed/images",
    "POST /embed/text",
    "POST /embed/texts",
    "POST /similarity",
    "POST /rank",
    "POST /v1/embeddings",
]
TEXT_OPERATIONS = ["GET /info", "POST /embed/text", "POST /embed/texts", "POST /v1/embeddings", "POST /embed/tokens"]
# Both services; fuzzed last, sleep before wake: a generated {"hold": true} would otherwise leave the embedding
# routes answering 503 "asleep" for the rest of the run.
ADMIN_OPERATIONS = ["POST /admin/sleep", "POST /admin/wake"]


def small_image_app(model: Path) -> FastAPI:
    # Small limits, so that generated bodies also hit them (413 is an answer, 5xx never is).
    return image_app(model, max_items_per_request=4, max_image_bytes=100_000, max_body_bytes=1_000_000)


def small_text_app(model: Path) -> FastAPI:
    # An answer of /embed/tokens of a few texts' states at most.
    return text_app(
        model, max_items_per_request=4, max_text_chars=200, max_body_bytes=100_000, max_token_states_bytes=20_000
    )


def fuzz(app: FastAPI, operations: list[str]) -> dict[str, list[int]]:
    """Positive and negative examples of every operation; returns the statuses seen per operation.

    schemathesis runs the app's lifespan (the model loads) and its pytest plugin ends it after each test, so one
    test fuzzes all operations of one app.
    """
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    seen: dict[str, list[int]] = {}
    with asgi.get_client(app) as client:  # type: ignore[arg-type]  # a FastAPI app is an ASGI app
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.02)
        for operation in operations:
            seen[operation] = fuzz_operation(schema, operation, client)
    return seen


def fuzz_operation(schema: Any, operation: str, client: Any) -> list[int]:
    method, path = operation.split(" ")
    endpoint = schema[path][method]
    cases = st.one_of(endpoint.as_strategy(GenerationMode.POSITIVE), endpoint.as_strategy(GenerationMode.NEGATIVE))
    statuses: list[int] = []

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases)
    def run(case: Any) -> None:
        response = case.call(session=client)
        statuses.append(response.status_code)
        case.validate_response(response, checks=[not_a_server_error])

    run()
    return statuses


def documented_operations(app: FastAPI) -> set[str]:
    return {f"{method.upper()} {path}" for path, item in app.openapi()["paths"].items() for method in item}


def test_the_schemas_document_every_route(tiny_siglip: Path, tiny_zimage: Path) -> None:
    image = small_image_app(tiny_siglip)
    assert documented_operations(image) == {*IMAGE_OPERATIONS, *ADMIN_OPERATIONS}
    text = small_text_app(tiny_zimage)
    assert documented_operations(text) == {"GET /health", "GET /metrics", *TEXT_OPERATIONS, *ADMIN_OPERATIONS}
    # /embed/images reads its body itself; its schema says both forms so that fuzzers and clients see them.
    body = image.openapi()["paths"]["/embed/images"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}


def test_image_service_never_answers_5xx(tiny_siglip: Path) -> None:
    seen = fuzz(small_image_app(tiny_siglip), IMAGE_OPERATIONS + ADMIN_OPERATIONS)
    assert all(statuses and max(statuses) < 500 for statuses in seen.values()), seen
    assert 413 in seen["POST /embed/images"] and 422 in seen["POST /embed/images"]  # both forms were fuzzed
    assert all(200 in seen[operation] for operation in ADMIN_OPERATIONS), seen  # the model slept and woke


def test_text_service_never_answers_5xx(tiny_zimage: Path) -> None:
    seen = fuzz(small_text_app(tiny_zimage), TEXT_OPERATIONS + ADMIN_OPERATIONS)
    assert all(statuses and max(statuses) < 500 for statuses in seen.values()), seen
    # valid and invalid bodies both ran ({"text"} xor {"texts"} is not in the schema: /embed/text gets few 200s)
    assert all(422 in seen[operation] for operation in TEXT_OPERATIONS[1:]), seen
    assert 200 in seen["POST /embed/texts"] and 200 in seen["POST /v1/embeddings"], seen
    assert 200 in seen["POST /embed/tokens"] and 413 in seen["POST /embed/tokens"], seen  # its size bound too
    assert all(200 in seen[operation] for operation in ADMIN_OPERATIONS), seen
