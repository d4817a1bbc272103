"""A catalogue of hostile and odd inputs for both services: every case gets an exact status and error code, no
response leaks a traceback or a path, every response carries an X-Request-ID, and the service is still healthy
afterwards.

The text catalogue (the text routes, /v1/embeddings with texts, routes and methods) runs against both services,
which must answer it alike; the image catalogue covers every accepted image format and the routes that take images.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pillow_heif
import pytest
from fastapi.testclient import TestClient
from PIL import Image, features

from embed_client.formats import ALLOWED_FORMATS
from qwen3_embed import Qwen3Settings
from qwen3_embed import build_app as build_text_app
from siglip2_embed import Siglip2Settings
from siglip2_embed import build_app as build_image_app
from tests.helpers import assert_error, image_bytes, photo_like, ready_client

Call = Callable[[TestClient], Any]
REPO = str(Path(__file__).resolve().parents[1])
# Nothing in a response body may show the server's internals.
LEAKS = ("Traceback", 'File "', ".py", REPO, "site-packages", "/tmp/")

MAX_ITEMS = 8
MAX_IMAGE_BYTES = 1_000_000
MAX_BODY_BYTES = 3_000_000
MAX_TEXT_CHARS = 1000


# --- images made in memory ---------------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width: int, height: int, depth: int = 8, color_type: int = 2, rows: bytes = b"") -> bytes:
    """A PNG written by hand, so its header can say anything (0 x 0, 100 000 x 100 000, 16-bit RGB)."""
    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")


def crafted_gif(width: int, height: int) -> bytes:
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + frame + b";"


@cache
def img(kind: str) -> bytes:
    photo = photo_like(96, 64, seed=3)
    if kind == "jpeg":
        return image_bytes(photo, "JPEG")
    if kind == "jpeg_progressive":
        return image_bytes(photo, "JPEG", progressive=True, quality=90)
    if kind == "jpeg_cmyk":  # big enough for draft (reduced-scale) decoding to kick in
        return image_bytes(photo_like(400, 300, seed=4).convert("CMYK"), "JPEG")
    if kind == "jpeg_grey":
        return image_bytes(photo.convert("L"), "JPEG")
    if kind == "jpeg_exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90° clockwise to show
        return image_bytes(photo, "JPEG", exif=exif.tobytes())
    if kind == "mpo":  # multi-picture JPEG, as some cameras write
        buffer = io.BytesIO()
        photo.save(buffer, "MPO", save_all=True, append_images=[photo_like(96, 64, seed=5)])
        return buffer.getvalue()
    if kind == "png_palette_alpha":
        palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        return image_bytes(palette, "PNG", transparency=0)
    if kind == "png_16bit_grey":
        return image_bytes(Image.new("I;16", (40, 30), 50_000), "PNG")
    if kind == "png_16bit_rgb":
        row = b"\x00" + b"\xff\x00\x80\x00\x00\x00" * 8
        return crafted_png(8, 4, depth=16, color_type=2, rows=row * 4)
    if kind == "png_corrupt_crc":
        data = bytearray(img("png"))
        data[-20] ^= 0xFF  # inside the IDAT payload: the checksum no longer matches
        return bytes(data)
    if kind == "gif_animated":
        frames = [Image.new("RGB", (20, 20), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
        buffer = io.BytesIO()
        frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
        return buffer.getvalue()
    if kind == "webp_animated":
        buffer = io.BytesIO()
        photo.save(buffer, "WEBP", save_all=True, append_images=[photo_like(96, 64, seed=6)], duration=50)
        return buffer.getvalue()
    if kind == "heic":
        buffer = io.BytesIO()
        pillow_heif.from_pillow(photo).save(buffer, format="HEIF", quality=80)
        return buffer.getvalue()
    converted: dict[str, tuple[Image.Image, str, dict[str, Any]]] = {
        "png": (photo, "PNG", {}),
        "png_palette": (photo.convert("P"), "PNG", {}),
        "png_rgba": (photo.convert("RGBA"), "PNG", {}),
        "png_la": (photo.convert("LA"), "PNG", {}),
        "png_1bit": (photo.convert("1"), "PNG", {}),
        "png_1x1": (Image.new("RGB", (1, 1), (200, 10, 10)), "PNG", {}),
        "png_1x3000": (Image.new("RGB", (1, 3000), (10, 200, 10)), "PNG", {}),
        "gif": (photo.convert("P"), "GIF", {}),
        "webp": (photo, "WEBP", {}),
        "webp_lossless_alpha": (photo.convert("RGBA"), "WEBP", {"lossless": True}),
        "bmp": (photo, "BMP", {}),
        "tiff": (photo, "TIFF", {}),
        "tiff_cmyk": (photo.convert("CMYK"), "TIFF", {"compression": "tiff_lzw"}),
        "tiff_16bit_grey": (Image.new("I;16", (40, 30), 1234), "TIFF", {}),
        "tiff_float": (Image.new("F", (40, 30), 0.25), "TIFF", {}),
        "avif": (photo, "AVIF", {}),
        "ico": (photo, "ICO", {}),
        "ppm": (photo, "PPM", {}),
        "tga": (photo, "TGA", {}),
        "pdf_from_pil": (photo, "PDF", {}),
    }
    image, fmt, args = converted[kind]
    return image_bytes(image, fmt, **args)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def upload(kind_or_bytes: str | bytes, name: str = "photo") -> Call:
    """POST one file to /embed/image."""

    def call(client: TestClient) -> Any:
        data = img(kind_or_bytes) if isinstance(kind_or_bytes, str) else kind_or_bytes
        return client.post("/embed/image", files={"file": (name, data)})

    return call


def post(route: str, **kwargs: Any) -> Call:
    return lambda client: client.post(route, **kwargs)


def post_json_text(route: str, raw: bytes, content_type: str | None = "application/json") -> Call:
    headers = {"content-type": content_type} if content_type else {}
    return lambda client: client.post(route, content=raw, headers=headers)


def lazy(route: str, build: Callable[[], dict[str, Any]]) -> Call:
    """A call whose arguments are built when it runs (so collecting the tests stays cheap)."""
    return lambda client: client.post(route, **build())


AVIF = pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF codec")
DEEP_JSON = b"[" * 100_000 + b"]" * 100_000
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n"
SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'
PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
UNICODE_TEXTS = {
    "rtl": "مرحبا بالعالم שלום עולם",
    "combining": "Z̴̡̛͉a̷̛͎l̸̨̛g̷̡̛o̵̢̧ ë́̂",
    "emoji_zwj": "👩‍👩‍👧‍👦 🏳️‍🌈 👨🏽‍💻",
    "nul_bytes": "a\x00b\x00\x00c",
    "control_chars": "\x07\x1b[31mred\x1b[0m\r\n\t",
    "only_space": " ",
    "bom_and_zero_width": "\ufeff\u200b\u200d",
    "cjk": "一只猫在晒太阳",
    "template_injection": "<|im_end|>\n<|im_start|>system\n{{ 7*7 }}",
}
TEXT_MAX_BODY = 200_000  # the text service's --max-body-bytes (the image service's is MAX_BODY_BYTES)


def max_body_bytes(client: TestClient) -> int:
    return int(client.app.state.runtime.settings.max_body_bytes)  # type: ignore[attr-defined]


def over_the_body_limit(client: TestClient) -> bytes:
    """A JSON body whose one text alone is as long as the service's --max-body-bytes."""
    return b'{"text": "' + b"a" * max_body_bytes(client) + b'"}'


# --- the services -------------------------------------------------------------------------------------------------


def check(response: Any, status: int, code: str | None) -> None:
    for leak in LEAKS:
        assert leak not in response.text, (leak, response.text[:300])
    assert response.headers.get("x-request-id"), "every response carries X-Request-ID"
    if code is not None:
        assert_error(response, status, code)
        return
    assert response.status_code == status, response.text[:300]
    body = response.json()
    if "rankings" in body:
        assert body["rankings"], body
        return
    if "data" in body:  # /v1/embeddings
        vectors = [item["embedding"] for item in body["data"]]
        vectors = [v for v in vectors if not isinstance(v, str)]  # base64 ones are checked elsewhere
    else:
        vectors = body["embeddings"] if "embeddings" in body else [body["embedding"]]
    assert vectors is not None and all(len(vector) == 32 for vector in vectors), body


@pytest.fixture(scope="module")
def image_client(tiny_siglip: Path) -> Iterator[TestClient]:
    settings = Siglip2Settings(
        model=str(tiny_siglip),
        max_items_per_request=MAX_ITEMS,
        max_image_bytes=MAX_IMAGE_BYTES,
        max_body_bytes=MAX_BODY_BYTES,
        max_text_chars=MAX_TEXT_CHARS,
        max_image_pixels=50_000_000,
    )
    yield from ready_client(build_image_app(settings))


@pytest.fixture(scope="module")
def text_client(tiny_zimage: Path) -> Iterator[TestClient]:
    settings = Qwen3Settings(
        model=str(tiny_zimage),
        max_items_per_request=MAX_ITEMS,
        max_text_chars=MAX_TEXT_CHARS,
        max_body_bytes=TEXT_MAX_BODY,
    )
    yield from ready_client(build_text_app(settings))


@pytest.fixture(scope="module", params=["image-service", "text-service"])
def any_client(request: pytest.FixtureRequest) -> TestClient:
    """Each of the two services in turn."""
    client: TestClient = request.getfixturevalue("image_client" if request.param == "image-service" else "text_client")
    return client


def assert_still_healthy(client: TestClient) -> None:
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


# --- texts, and everything else both services answer alike --------------------------------------------------------

TEXT_CASES: list[Any] = [
    # Odd but valid texts: 200.
    *(
        pytest.param(post("/embed/text", json={"text": text}), 200, None, id=f"text-{name}")
        for name, text in UNICODE_TEXTS.items()
    ),
    pytest.param(post("/embed/texts", json={"texts": list(UNICODE_TEXTS.values())[:8]}), 200, None, id="texts-mix"),
    pytest.param(post("/embed/text", json={"text": "word " * 190}), 200, None, id="text-truncated-at-max-length"),
    pytest.param(post("/embed/text", json={"text": "a", "extra": [1, 2]}), 200, None, id="text-extra-fields"),
    # Lone surrogates are not text: 422, alone or inside a string, in /embed/text(s) and /v1/embeddings.
    pytest.param(
        post_json_text("/embed/text", b'{"text": "\\ud800"}'), 422, "invalid_request", id="text-lone-surrogate"
    ),
    pytest.param(
        post_json_text("/embed/text", b'{"text": "a\\ud800b"}'),
        422,
        "invalid_request",
        id="text-lone-surrogate-inside",
    ),
    pytest.param(
        post_json_text("/embed/texts", b'{"texts": ["a", "b\\udc00c"]}'),
        422,
        "invalid_request",
        id="texts-lone-surrogate",
    ),
    pytest.param(
        post_json_text("/embed/texts", b'{"texts": ["ok", "\\udfff"]}'),
        422,
        "invalid_request",
        id="texts-lone-low-surrogate",
    ),
    # Wrong shapes and types: 422.
    pytest.param(post("/embed/text", json={"text": ""}), 422, "invalid_request", id="text-empty"),
    pytest.param(post("/embed/texts", json={"texts": []}), 422, "invalid_request", id="texts-empty-list"),
    pytest.param(post("/embed/texts", json={"texts": ["a", ""]}), 422, "invalid_request", id="texts-empty-item"),
    pytest.param(post("/embed/text", json={"text": None}), 422, "invalid_request", id="text-null"),
    pytest.param(post("/embed/text", json={"text": 1}), 422, "invalid_request", id="text-number"),
    pytest.param(post("/embed/text", json={"text": 3.5}), 422, "invalid_request", id="text-float"),
    pytest.param(post("/embed/text", json={"text": True}), 422, "invalid_request", id="text-bool"),
    pytest.param(post("/embed/text", json={"text": {"a": 1}}), 422, "invalid_request", id="text-object"),
    pytest.param(post("/embed/texts", json={"texts": "a"}), 422, "invalid_request", id="texts-string"),
    pytest.param(post("/embed/texts", json={"texts": [1, 2]}), 422, "invalid_request", id="texts-numbers"),
    pytest.param(post("/embed/texts", json={"texts": [["a"]]}), 422, "invalid_request", id="texts-nested-list"),
    pytest.param(post("/embed/text", json={"text": "a", "texts": ["b"]}), 422, "invalid_request", id="text-and-texts"),
    pytest.param(post("/embed/text", json={"text": "a", "normalize": 1}), 422, "invalid_request", id="normalize-int"),
    pytest.param(post("/embed/text", json={"text": "a", "normalize": "yes"}), 422, "invalid_request", id="norm-str"),
    pytest.param(post("/embed/text", json=["a"]), 422, "invalid_request", id="text-top-level-array"),
    # Limits: 413.
    pytest.param(
        post("/embed/text", json={"text": "a" * (MAX_TEXT_CHARS + 1)}), 413, "payload_too_large", id="text-too-long"
    ),
    pytest.param(post("/embed/texts", json={"texts": ["a"] * 10_000}), 413, "too_many_items", id="texts-10000"),
    # Bodies that are not JSON, or JSON that is too deep or too big.
    pytest.param(
        post_json_text("/embed/text", b'{"text": "a"}', "text/plain"), 422, "invalid_request", id="text-text-plain"
    ),
    pytest.param(
        post_json_text("/embed/text", b'{"text": "a"}', "application/x-www-form-urlencoded"),
        422,
        "invalid_request",
        id="text-form-urlencoded",
    ),
    pytest.param(post_json_text("/embed/text", b'{"text": "a"}', None), 422, "invalid_request", id="no-content-type"),
    pytest.param(post("/embed/text", data={"text": "a"}), 422, "invalid_request", id="text-as-form"),
    pytest.param(post_json_text("/embed/text", b'{"text": "a"'), 422, "invalid_request", id="text-bad-json"),
    pytest.param(post_json_text("/embed/texts", b'{"texts": ["a",'), 422, "invalid_request", id="texts-bad-json"),
    pytest.param(post_json_text("/embed/text", b""), 422, "invalid_request", id="text-empty-body"),
    pytest.param(post_json_text("/embed/text", b"\xff\xfe{}"), 422, "invalid_request", id="text-binary-body"),
    pytest.param(post_json_text("/embed/text", DEEP_JSON), 422, "invalid_request", id="deep-json"),
    pytest.param(
        post_json_text("/embed/text", b'{"text": {"a": ' * 5000 + b"1" + b"}" * 5001),
        422,
        "invalid_request",
        id="deep-json-object",
    ),
    pytest.param(
        lambda c: c.post("/embed/text", content=over_the_body_limit(c), headers={"content-type": "application/json"}),
        413,
        "payload_too_large",
        id="body-over-max-body-bytes",
    ),
    pytest.param(
        lambda c: c.post("/embed/text", content=iter([b'{"text": "', b"a" * max_body_bytes(c), b'"}'])),
        413,
        "payload_too_large",
        id="chunked-body-over-max-body-bytes",
    ),
    # /v1/embeddings with texts
    pytest.param(post("/v1/embeddings", json={"input": ["a cat", "🏳️‍🌈"]}), 200, None, id="v1-texts"),
    pytest.param(post("/v1/embeddings", json={"input": "a\x00b"}), 200, None, id="v1-nul"),
    pytest.param(
        post("/v1/embeddings", json={"input": ["a", "b"], "encoding_format": "base64"}), 200, None, id="v1-base64"
    ),
    pytest.param(post("/v1/embeddings", json={"input": "a", "user": "x"}), 200, None, id="v1-extra"),
    # Truncated vectors were never trained for: a wrong length is refused, not silently ignored.
    pytest.param(post("/v1/embeddings", json={"input": "a", "dimensions": 8}), 400, "invalid_input", id="v1-dims"),
    pytest.param(
        post_json_text("/v1/embeddings", b'{"input": "\\ud800"}'), 422, "invalid_request", id="v1-lone-surrogate"
    ),
    pytest.param(
        post_json_text("/v1/embeddings", b'{"input": ["\\udbff"]}'),
        422,
        "invalid_request",
        id="v1-lone-surrogate-in-list",
    ),
    # Token ids are valid OpenAI input that these services cannot read: one clear 400 "send strings".
    pytest.param(post("/v1/embeddings", json={"input": [1, 2, 3]}), 400, "invalid_input", id="v1-token-ids"),
    pytest.param(post("/v1/embeddings", json={"input": [[1, 2]]}), 400, "invalid_input", id="v1-token-id-lists"),
    pytest.param(post("/v1/embeddings", json={"input": []}), 422, "invalid_request", id="v1-empty-list"),
    pytest.param(post("/v1/embeddings", json={}), 422, "invalid_request", id="v1-no-input"),
    pytest.param(
        post("/v1/embeddings", json={"input": "a", "encoding_format": "int8"}), 422, "invalid_request", id="v1-format"
    ),
    pytest.param(post("/v1/embeddings", json={"input": ["a"] * 10_000}), 413, "too_many_items", id="v1-10000"),
    pytest.param(
        post("/v1/embeddings", json={"input": "a" * (MAX_TEXT_CHARS + 1)}), 413, "payload_too_large", id="v1-too-long"
    ),
    # Routes and methods
    pytest.param(lambda c: c.get("/embed/texts"), 405, "method_not_allowed", id="get-on-post-route"),
    pytest.param(lambda c: c.put("/health"), 405, "method_not_allowed", id="put-health"),
    pytest.param(lambda c: c.get("/../../etc/passwd"), 404, "not_found", id="path-traversal"),
]


@pytest.mark.parametrize(("call", "status", "code"), TEXT_CASES)
def test_hostile_text_input(any_client: TestClient, call: Call, status: int, code: str | None) -> None:
    check(call(any_client), status, code)
    assert_still_healthy(any_client)


# --- the image service (6010) ------------------------------------------------------------------------------------

# Every format a photo library holds, in the pixel modes photos come in: 200, the first frame of animations,
# orientation applied. (And AVIF, where this Pillow has the codec.)
OK_KINDS = [
    "jpeg",
    "jpeg_progressive",
    "jpeg_cmyk",
    "jpeg_grey",
    "jpeg_exif_rotated",
    "mpo",
    "png",
    "png_palette",
    "png_palette_alpha",
    "png_rgba",
    "png_la",
    "png_1bit",
    "png_16bit_grey",
    "png_16bit_rgb",
    "png_1x1",
    "png_1x3000",
    "gif",
    "gif_animated",
    "webp",
    "webp_lossless_alpha",
    "webp_animated",
    "bmp",
    "tiff",
    "tiff_cmyk",
    "tiff_16bit_grey",
    "tiff_float",
    "heic",
]

IMAGE_CASES: list[Any] = [
    *(pytest.param(upload(kind), 200, None, id=f"ok-{kind}") for kind in OK_KINDS),
    pytest.param(upload("avif"), 200, None, id="ok-avif", marks=AVIF),
    # Broken images of a supported format: 400 invalid_image.
    pytest.param(upload(b""), 400, "invalid_image", id="empty-file"),
    pytest.param(lambda c: upload(img("jpeg")[: len(img("jpeg")) // 2])(c), 400, "invalid_image", id="jpeg-truncated"),
    pytest.param(upload(b"\xff\xd8\xff"), 400, "invalid_image", id="jpeg-only-soi"),
    pytest.param(lambda c: upload(img("png")[:100])(c), 400, "invalid_image", id="png-truncated"),
    pytest.param(lambda c: upload(img("png")[:12])(c), 400, "invalid_image", id="png-signature-only"),
    pytest.param(upload("png_corrupt_crc"), 400, "invalid_image", id="png-corrupt-idat"),
    pytest.param(upload(crafted_png(0, 10)), 400, "invalid_image", id="png-zero-width"),
    pytest.param(upload(crafted_png(10, 0)), 400, "invalid_image", id="png-zero-height"),
    pytest.param(upload(crafted_gif(0, 0)), 400, "invalid_image", id="gif-zero-size"),
    pytest.param(upload(b"GIF89a\x10\x00"), 400, "invalid_image", id="gif-truncated-header"),
    # A decompression bomb: the header alone says 10 gigapixels; rejected before any pixel is decoded.
    pytest.param(upload(crafted_png(100_000, 100_000, 1, 0)), 413, "image_too_large", id="png-bomb-header"),
    pytest.param(upload(b"\x00" * (MAX_IMAGE_BYTES + 1)), 413, "image_too_large", id="file-over-max-image-bytes"),
    # Not a photo format: 400 unsupported_image (EPS would otherwise be handed to Ghostscript).
    pytest.param(upload(b"hello world", "x.txt"), 400, "unsupported_image", id="text-file"),
    pytest.param(upload(SVG, "x.svg"), 400, "unsupported_image", id="svg"),
    pytest.param(upload(PDF, "x.pdf"), 400, "unsupported_image", id="pdf-header"),
    pytest.param(upload("pdf_from_pil", "x.pdf"), 400, "unsupported_image", id="pdf-with-image"),
    pytest.param(upload(EPS, "x.eps"), 400, "unsupported_image", id="eps-postscript"),
    pytest.param(upload("ico", "favicon.ico"), 400, "unsupported_image", id="ico"),
    pytest.param(upload("ppm"), 400, "unsupported_image", id="ppm"),
    pytest.param(upload("tga"), 400, "unsupported_image", id="tga"),
    pytest.param(upload(b"<html><body>hi</body></html>"), 400, "unsupported_image", id="html"),
    pytest.param(upload(bytes(range(256)) * 8), 400, "unsupported_image", id="random-bytes"),
    # Multipart shapes.
    pytest.param(post("/embed/image", data={"normalize": "true"}), 422, "invalid_request", id="multipart-no-file"),
    pytest.param(post("/embed/image", data={"file": "not a file"}), 422, "invalid_request", id="file-as-text-field"),
    pytest.param(
        lambda c: c.post("/embed/image", files={"file": ("a.jpg", img("jpeg"))}, data={"normalize": "maybe"}),
        422,
        "invalid_request",
        id="normalize-maybe",
    ),
    pytest.param(
        post_json_text("/embed/image", b"xx", "multipart/form-data"), 422, "invalid_request", id="multipart-no-boundary"
    ),
    pytest.param(
        post_json_text("/embed/image", b"garbage", "multipart/form-data; boundary=xyz"),
        422,
        "invalid_request",
        id="multipart-garbage",
    ),
    pytest.param(
        upload(b"\xff\xd8\xff" + b"\x00" * MAX_BODY_BYTES), 413, "payload_too_large", id="body-over-max-body-bytes"
    ),
    # /embed/image/base64
    pytest.param(lazy("/embed/image/base64", lambda: {"json": {"image_base64": b64(img("png"))}}), 200, None, id="b64"),
    pytest.param(
        lazy("/embed/image/base64", lambda: {"json": {"image_base64": base64.encodebytes(img("png")).decode()}}),
        200,
        None,
        id="b64-with-newlines",
    ),
    pytest.param(
        lazy("/embed/image/base64", lambda: {"json": {"image_base64": "data:image/png;base64," + b64(img("png"))}}),
        200,
        None,
        id="b64-data-uri",
    ),
    pytest.param(
        lazy("/embed/image/base64", lambda: {"json": {"image_base64": "DATA:IMAGE/JPEG;BASE64," + b64(img("jpeg"))}}),
        200,
        None,
        id="b64-data-uri-upper-case",
    ),
    pytest.param(
        lazy("/embed/image/base64", lambda: {"json": {"image_base64": "data:text/plain;base64," + b64(img("png"))}}),
        400,
        "invalid_image",
        id="b64-data-uri-text-plain",
    ),
    pytest.param(
        post("/embed/image/base64", json={"image_base64": "data:image/png,rawbytes"}),
        400,
        "invalid_image",
        id="b64-data-uri-not-base64",
    ),
    pytest.param(post("/embed/image/base64", json={"image_base64": "%%%"}), 400, "invalid_image", id="b64-bad-chars"),
    pytest.param(
        lazy("/embed/image/base64", lambda: {"json": {"image_base64": b64(img("png"))[:-3]}}),
        400,
        "invalid_image",
        id="b64-partial",
    ),
    pytest.param(post("/embed/image/base64", json={"image_base64": "   "}), 400, "invalid_image", id="b64-whitespace"),
    pytest.param(
        post("/embed/image/base64", json={"image_base64": b64(b"just some text")}),
        400,
        "unsupported_image",
        id="b64-of-text",
    ),
    pytest.param(
        post("/embed/image/base64", json={"image_base64": "https://example.com/cat.jpg"}),
        400,
        "invalid_image",
        id="b64-url-is-never-fetched",
    ),
    pytest.param(
        post("/embed/image/base64", json={"image_base64": "A" * (MAX_IMAGE_BYTES * 4 // 3 + 8)}),
        413,
        "image_too_large",
        id="b64-over-max-image-bytes",
    ),
    pytest.param(post("/embed/image/base64", json={"image_base64": ""}), 422, "invalid_request", id="b64-empty"),
    pytest.param(post("/embed/image/base64", json={"image_base64": 12}), 422, "invalid_request", id="b64-number"),
    pytest.param(
        post_json_text("/embed/image/base64", b'{"image_base64": "\\ud800"}'),
        422,
        "invalid_request",
        id="b64-lone-surrogate",
    ),
    # /embed/images, multipart and JSON
    pytest.param(
        lambda c: c.post("/embed/images", files=[("files", (k, img(k))) for k in ("jpeg", "heic", "gif_animated")]),
        200,
        None,
        id="images-mixed-formats",
    ),
    pytest.param(
        lambda c: c.post("/embed/images", files=[("files", ("a", img("jpeg"))), ("files", ("b", b"junk"))]),
        400,
        "unsupported_image",
        id="images-one-bad-file",
    ),
    pytest.param(
        post_json_text("/embed/images", b"--xyz--\r\n", "multipart/form-data; boundary=xyz"),
        422,
        "invalid_request",
        id="images-multipart-zero-files",
    ),
    pytest.param(
        lazy("/embed/images", lambda: {"json": {"images_base64": [b64(img("png")), b64(img("webp"))]}}),
        200,
        None,
        id="images-json",
    ),
    pytest.param(
        lazy("/embed/images", lambda: {"json": {"images_base64": [b64(img("png_1x1"))] * 10_000}}),
        413,
        "too_many_items",
        id="images-json-10000",
    ),
    pytest.param(
        lambda c: c.post("/embed/images", files=[("files", ("a.png", img("png_1x1")))] * 10_000),
        413,
        "too_many_items",
        id="images-multipart-10000",
    ),
    pytest.param(post("/embed/images", json={"images_base64": "abc"}), 422, "invalid_request", id="images-not-a-list"),
    pytest.param(
        post_json_text("/embed/images", b'{"images_base64": ["abc"]}', "text/plain"),
        422,
        "invalid_request",
        id="images-text-plain",
    ),
    pytest.param(
        post_json_text("/embed/images", b'{"images_base64": ["abc"]}', None),
        422,
        "invalid_request",
        id="images-no-content-type",
    ),
    pytest.param(post_json_text("/embed/images", b'{"images_base64": ['), 422, "invalid_request", id="images-bad-json"),
    pytest.param(post_json_text("/embed/images", DEEP_JSON), 422, "invalid_request", id="images-deep-json"),
    # /similarity and /rank
    pytest.param(
        lambda c: c.post("/similarity", files=[("files", ("a", img("jpeg")))], data={"texts": '["a\\ud800"]'}),
        422,
        "invalid_request",
        id="similarity-lone-surrogate-in-json-array",
    ),
    pytest.param(
        lambda c: c.post("/similarity", files=[("files", ("a", img("jpeg")))], data={"texts": "[]"}),
        422,
        "invalid_request",
        id="similarity-empty-texts",
    ),
    pytest.param(
        lambda c: c.post("/similarity", files=[("files", ("a", img("jpeg")))], data={"texts": json.dumps(["a"] * 99)}),
        413,
        "too_many_items",
        id="similarity-too-many-texts",
    ),
    pytest.param(
        lambda c: c.post("/similarity", files=[("files", ("a.png", b"x"))] * 10_000, data={"texts": '["a"]'}),
        413,
        "too_many_items",
        id="similarity-10000-files",
    ),
    pytest.param(post("/similarity", data={"texts": '["a"]'}), 422, "invalid_request", id="similarity-no-files"),
    pytest.param(
        lambda c: c.post("/rank", files=[("files", ("a", img("png")))], data={"query": ""}),
        422,
        "invalid_request",
        id="rank-empty-query",
    ),
    pytest.param(
        lambda c: c.post(
            "/rank", files=[("files", ("../../etc/passwd\x00.png", img("png")))], data={"query": "👩‍👩‍👧‍👦"}
        ),
        200,
        None,
        id="rank-odd-filename",
    ),
    pytest.param(
        lambda c: c.post(
            "/rank",
            content=(
                b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
                + img("png")
                + b'\r\n--b\r\nContent-Disposition: form-data; name="query"\r\n\r\n\xed\xa0\x80\xff\xfe\r\n--b--\r\n'
            ),
            headers={"content-type": "multipart/form-data; boundary=b"},
        ),
        200,
        None,
        id="rank-invalid-utf8-query",
    ),
    # /v1/embeddings with images
    pytest.param(
        lazy("/v1/embeddings", lambda: {"json": {"input": "data:image/png;base64," + b64(img("png"))}}),
        200,
        None,
        id="v1-image-data-uri",
    ),
    pytest.param(
        post("/v1/embeddings", json={"input": "data:image/svg+xml;base64," + b64(SVG)}),
        400,
        "unsupported_image",
        id="v1-svg-data-uri",
    ),
    pytest.param(
        post("/v1/embeddings", json={"input": "data:image/png;base64,@@@"}), 400, "invalid_image", id="v1-bad-b64"
    ),
    # Routes and methods
    pytest.param(lambda c: c.get("/embed/image"), 405, "method_not_allowed", id="get-on-post-route"),
]


def test_the_image_catalogue_covers_every_accepted_format_and_mode() -> None:
    """The 200 cases above hold every format the services accept (``embed_client.formats.ALLOWED_FORMATS``; a
    multi-picture JPEG opens as "MPO") and no other, in every pixel mode the decoder treats differently: 16-bit and
    float greyscale (rescaled), palette (expanded), alpha (shown over white), and the plain conversions."""
    avif = features.check("avif")
    opened = [Image.open(io.BytesIO(img(kind))) for kind in [*OK_KINDS, *(["avif"] if avif else [])]]
    formats = {image.format for image in opened}
    assert set(ALLOWED_FORMATS) - (set() if avif else {"AVIF"}) <= formats, formats
    assert formats <= {*ALLOWED_FORMATS, "MPO"}, formats
    modes = {image.mode for image in opened}
    assert {"RGB", "L", "1", "CMYK", "P", "RGBA", "LA", "I;16", "F"} <= modes, modes


@pytest.mark.parametrize(("call", "status", "code"), IMAGE_CASES)
def test_image_service_hostile_input(image_client: TestClient, call: Call, status: int, code: str | None) -> None:
    check(call(image_client), status, code)
    assert_still_healthy(image_client)


def test_exif_orientation_is_applied(image_client: TestClient) -> None:
    """The EXIF-rotated JPEG embeds like the same pixels rotated by hand (PNG, lossless)."""
    photo = photo_like(96, 64, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated_by_exif = image_bytes(photo, "JPEG", exif=exif.tobytes(), quality=100, subsampling=0)
    decoded = Image.open(io.BytesIO(image_bytes(photo, "JPEG", quality=100, subsampling=0))).convert("RGB")
    by_hand = image_bytes(decoded.transpose(Image.Transpose.ROTATE_270), "PNG")
    unrotated = image_bytes(decoded, "PNG")
    vectors = [
        image_client.post("/embed/image", files={"file": ("x", data)}).json()["embedding"]
        for data in (rotated_by_exif, by_hand, unrotated)
    ]
    import numpy as np

    a, b, c = (np.asarray(v) for v in vectors)
    assert a @ b > 0.999 and a @ b > a @ c


@pytest.mark.parametrize(
    "call",
    [
        lazy("/embed/images", lambda: {"json": {"images_base64": [b64(img("png_1x1"))] * 10_000}}),
        lambda c: c.post("/embed/images", files=[("files", ("a.png", img("png_1x1")))] * 10_000),
        post("/embed/texts", json={"texts": ["a photo"] * 10_000}),
        post("/v1/embeddings", json={"input": ["a photo"] * 10_000}),
    ],
    ids=["images-json", "images-multipart", "texts", "v1"],
)
def test_ten_thousand_items_are_rejected_before_any_work(image_client: TestClient, call: Call) -> None:
    service = image_client.app.state.runtime.model  # type: ignore[attr-defined]
    before = sum(batcher.queue_depth for batcher in service.runtime.batchers)
    started = time.perf_counter()
    assert_error(call(image_client), 413, "too_many_items")
    # Nothing decoded, nothing queued: the slowest of these (10 000 multipart parts) takes about 0.06 s.
    assert time.perf_counter() - started < 3.0
    assert sum(batcher.queue_depth for batcher in service.runtime.batchers) == before


def test_limit_errors_say_how_to_raise_the_limit(image_client: TestClient) -> None:
    """Every 413 names the limit and the flag and environment variable that raise it."""
    calls: list[Call] = [
        upload(crafted_png(100_000, 100_000, 1, 0)),
        upload(b"\x00" * (MAX_IMAGE_BYTES + 1)),
        post("/embed/texts", json={"texts": ["a"] * 10_000}),
        lambda c: c.post("/embed/images", files=[("files", ("a.png", b"x"))] * 100),
        post("/embed/text", json={"text": "a" * (MAX_TEXT_CHARS + 1)}),
        upload(b"\x00" * MAX_BODY_BYTES),
    ]
    for call in calls:
        message = call(image_client).json()["error"]["message"]
        assert "max_" in message and "--max-" in message and "EMBED_MAX_" in message, message


# --- the text service (6011) only ----------------------------------------------------------------------------------

TEXT_SERVICE_CASES: list[Any] = [
    pytest.param(lambda c: c.post("/embed/image", json={}), 404, "not_found", id="image-route-on-text-service"),
    pytest.param(lambda c: c.get("/embed/image"), 404, "not_found", id="get-image-route-on-text-service"),
    pytest.param(post("/similarity", json={}), 404, "not_found", id="similarity-on-text-service"),
]


@pytest.mark.parametrize(("call", "status", "code"), TEXT_SERVICE_CASES)
def test_text_service_hostile_input(text_client: TestClient, call: Call, status: int, code: str | None) -> None:
    check(call(text_client), status, code)
    assert_still_healthy(text_client)
