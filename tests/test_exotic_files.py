"""Broken files of the accepted formats: whatever a decoder raises on them (pillow-heif raises RuntimeError) is a
400 ``invalid_image``, never a 500; and libtiff's complaints about a broken TIFF go to the log, not to stderr."""

from __future__ import annotations

import contextlib
import io
import logging
import random
import struct
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pillow_heif
import pytest
from fastapi.testclient import TestClient
from PIL import Image, features

from common.errors import EmbedError
from common.images import ImageSpec, prepare_image
from siglip2_embed import Siglip2Settings, build_app
from tests.helpers import assert_error, image_bytes, photo_like, ready_client

SPEC = ImageSpec(height=32, width=32, resample=Image.Resampling.BILINEAR, max_pixels=200_000_000)
AVIF = pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF codec")


@cache
def valid(kind: str) -> bytes:
    photo = photo_like(64, 48, seed=5)
    if kind == "heic":
        buffer = io.BytesIO()
        pillow_heif.from_pillow(photo).save(buffer, format="HEIF", quality=80)
        return buffer.getvalue()
    args = {"tiff_lzw": {"compression": "tiff_lzw"}, "tiff_deflate": {"compression": "tiff_adobe_deflate"}}
    args |= {"tiff_jpeg": {"compression": "jpeg"}}
    fmt = {"avif": "AVIF", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP"}.get(kind, "TIFF")
    return image_bytes(photo.convert("P") if kind == "gif" else photo, fmt, **args.get(kind, {}))


def patch_box(data: bytes, box: bytes, offset: int, value: int, fmt: str) -> bytes:
    """Overwrite a field of the first ISO-BMFF box of a type (``offset`` from the box's start)."""
    start = data.index(box) - 4
    patched = bytearray(data)
    struct.pack_into(fmt, patched, start + offset, value)
    return bytes(patched)


# The primary item id (pitm: size, type, version and flags, then the id) names an item that does not exist.
def avif_primary_item_missing() -> bytes:
    return patch_box(valid("avif"), b"pitm", 12, 0x999, ">H")


# The image's declared width (ispe: size, type, version and flags, width, height) is 2^31 - 1.
def heic_huge_ispe_width() -> bytes:
    return patch_box(valid("heic"), b"ispe", 12, 2**31 - 1, ">I")


def heic_huge_ispe_height() -> bytes:
    return patch_box(valid("heic"), b"ispe", 16, 2**31 - 1, ">I")


@pytest.fixture(scope="module")
def client(tiny_siglip: Path) -> Iterator[TestClient]:
    yield from ready_client(build_app(Siglip2Settings(model=str(tiny_siglip))))


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(avif_primary_item_missing, id="avif-primary-item-missing", marks=AVIF),
        pytest.param(heic_huge_ispe_width, id="heic-ispe-width-2^31-1"),
        pytest.param(heic_huge_ispe_height, id="heic-ispe-height-2^31-1"),
    ],
)
def test_broken_heif_and_avif_are_400(client: TestClient, build: object) -> None:
    """pillow-heif raised RuntimeError for these, which was a 500."""
    data = build()  # type: ignore[operator]
    assert_error(client.post("/embed/image", files={"file": ("x", data)}), 400, "invalid_image")
    assert client.get("/health").json()["status"] == "ok"


def flipped(data: bytes, seed: int, count: int) -> Iterator[bytes]:
    """``count`` copies of ``data`` with 1 to 8 random bytes changed each (the same ones on every run)."""
    rng = random.Random(seed)
    for _ in range(count):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        yield bytes(damaged)


KINDS = ["heic", "jpeg", "png", "webp", "gif", "bmp", "tiff_lzw", "tiff_deflate", "tiff_jpeg"]


@pytest.mark.parametrize("kind", [*KINDS, pytest.param("avif", marks=AVIF)], ids=[*KINDS, "avif"])
def test_damaged_files_are_embedded_or_refused_never_an_unexpected_error(kind: str) -> None:
    """Byte flips in a valid file: each either decodes or raises one of our client errors (a 4xx)."""
    count = 300 if kind in ("heic", "avif") else 100
    outcomes: dict[str, int] = {}
    for data in flipped(valid(kind), seed=sum(map(ord, kind)), count=count):
        try:
            prepare_image(data, SPEC)
            outcome = "decoded"
        except EmbedError as exc:
            assert 400 <= exc.status < 500, exc
            outcome = exc.code
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert sum(outcomes.values()) == count, outcomes


def test_damaged_files_over_http_are_never_a_5xx(client: TestClient) -> None:
    files = [data for kind in ("heic", "tiff_lzw") for data in flipped(valid(kind), seed=7, count=15)]
    if features.check("avif"):
        files += list(flipped(valid("avif"), seed=7, count=15))
    for data in files:
        response = client.post("/embed/image", files={"file": ("x", data)})
        assert response.status_code in (200, 400, 413), response.text
    assert client.get("/health").json()["status"] == "ok"


def test_libtiff_messages_go_to_the_log_not_to_stderr(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """libtiff printed 40-160 bytes on stderr (the console log, never rotated) for each malformed TIFF."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    # Collected here only: the root logger's handlers belong to whichever test configured logging last.
    logger = logging.getLogger("common.libtiff")
    monkeypatch.setattr(logger, "propagate", False)
    monkeypatch.setattr(logger, "disabled", False)  # a logging.config call elsewhere may have disabled it
    level = logger.level
    logger.setLevel(logging.DEBUG)  # setLevel, not the attribute: the logger caches what is enabled
    handler = Collect()
    logger.addHandler(handler)
    damaged = [data for kind in ("tiff_lzw", "tiff_deflate") for data in flipped(valid(kind), seed=11, count=40)]
    capfd.readouterr()
    try:
        for data in damaged:
            with contextlib.suppress(EmbedError):
                prepare_image(data, SPEC)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert capfd.readouterr().err == ""
    assert any(message.startswith("libtiff: ") for message in messages), messages  # the same messages, in the log
