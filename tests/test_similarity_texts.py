"""The ``texts`` form field of ``/similarity``: a JSON array of strings, repeated plain fields, or one plain text.
Nothing a client puts there is a 500: a value that is not JSON is a text, a JSON value that is not an array of
strings is a 422."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from siglip2_embed import Siglip2Settings, build_app
from tests.helpers import assert_error, image_bytes, photo_like, ready_client

JPEG = image_bytes(photo_like(64, 48, seed=1), "JPEG")


@pytest.fixture(scope="module")
def client(tiny_siglip: Path) -> Iterator[TestClient]:
    yield from ready_client(build_app(Siglip2Settings(model=str(tiny_siglip))))


def similarity(client: TestClient, texts: str | list[str]) -> object:
    return client.post("/similarity", files=[("files", ("a.jpg", JPEG))], data={"texts": texts})


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("[" * 1000, id="1000-open-brackets"),  # was RecursionError -> 500
        pytest.param("[" * 100_000, id="100000-open-brackets"),
        pytest.param("[1" + "0" * 5000 + "]", id="5000-digit-number"),  # was ValueError (int digit limit) -> 500
        pytest.param("[1e999]", id="infinite-number"),
        pytest.param('["a", ' + "[" * 5000 + "]" * 5000 + "]", id="deep-array-inside"),
        pytest.param("[" * 1000 + "]" * 1000, id="1000-nested-arrays"),
        pytest.param('{"a": ' * 3000 + "1" + "}" * 3000, id="deep-object"),
        pytest.param('["\\ud800"]', id="lone-surrogate-in-json"),
        pytest.param("[\x00]", id="nul"),
    ],
)
def test_no_texts_value_is_a_server_error(client: TestClient, value: str) -> None:
    response = similarity(client, value)
    assert response.status_code in (200, 413, 422), response.text  # type: ignore[attr-defined]
    if response.status_code != 200:  # type: ignore[attr-defined]
        assert_error(response, response.status_code, response.json()["error"]["code"])  # type: ignore[attr-defined]
    assert client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("value", ["[draft] a cat", "[sic] a dog", "[", "[a photo", "[1, 2] photos of cats", "  [x]  "])
def test_a_text_that_starts_with_a_bracket_is_a_text(client: TestClient, value: str) -> None:
    response = similarity(client, value)
    assert response.status_code == 200, response.text  # type: ignore[attr-defined]
    assert response.json()["texts"] == [value]  # type: ignore[attr-defined]


def test_a_json_array_of_strings_is_many_texts(client: TestClient) -> None:
    body = similarity(client, '["a cat", "[draft] a dog"]').json()  # type: ignore[attr-defined]
    assert body["texts"] == ["a cat", "[draft] a dog"]


@pytest.mark.parametrize("value", ["[1, 2]", '["a", 1]', "[]", '[""]', '[["a"]]', '["a", "b"'])
def test_json_that_is_not_an_array_of_texts_is_a_422(client: TestClient, value: str) -> None:
    assert_error(similarity(client, value), 422, "invalid_request")
