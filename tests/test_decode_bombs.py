"""Images that cost far more to decode than their size suggests (decompression bombs): each is refused from its
header, before any pixel is decoded; a request that fails or is abandoned stops its other decodes; large images
share a budget of pixels being decoded, so a burst of them neither runs the machine out of memory nor holds up a
small request; the memory a decode took goes back to the system. Real large images (a 120 MP panorama JPEG, 60 MP
PNG and TIFF scans) still embed.

The bombs are built in memory in a few milliseconds; the comments give what each cost before the limits.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageFile

from common.decoding import PixelBudget
from siglip2_embed import Siglip2Settings, build_app
from tests.helpers import assert_error, image_bytes, photo_like, ready_client, wait_ready

REPO = Path(__file__).resolve().parents[1]
SMALL_JPEG = image_bytes(photo_like(64, 48, seed=1), "JPEG")


# --- bombs -------------------------------------------------------------------------------------------------------


def bmp_rle8_bomb(width: int = 100_000, height: int = 2_000) -> bytes:
    """9 KB: every row is one pixel and an end-of-line escape, which PIL's RLE decoder (Python code) pads one byte at
    a time. 100 000 x 2 000: 30 s of CPU and 4 GB."""
    palette = b"\x00\x00\x00\x00" * 256
    rle = b"\x01\x00\x00\x00" * height + b"\x00\x01"
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(rle), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(rle), 0, 0, offset) + info + palette + rle


def gif_screen_bomb(width: int, height: int) -> bytes:
    """35 bytes: a 1 x 1 frame on a huge logical screen, which PIL decodes and converts whole. 16 000 x 12 500:
    4 GB."""
    screen = struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + frame + b";"


def webp_canvas_bomb(width: int, height: int) -> bytes:
    """140 bytes: an animated WebP of two 16 x 16 frames on a huge canvas, which libwebp composes whole. 16 383 x
    12 000: 17 s and 5.3 GB (a lossless still of the same size is 7.5 KB and costs about as much)."""
    frames = [Image.new("RGBA", (16, 16), (255, 0, 0, 255)), Image.new("RGBA", (16, 16), (0, 255, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"VP8X"  # the extended header holds the canvas size, minus one, in 24 bits each
    data[24:27] = (width - 1).to_bytes(3, "little")
    data[27:30] = (height - 1).to_bytes(3, "little")
    return bytes(data)


def tiff16_bomb(width: int, height: int, rows_per_strip: int = 56) -> bytes:
    """4 KB: a 16-bit greyscale deflate TIFF whose strips all point at the same compressed strip of zeros.
    14 000 x 14 000: 2.7 GB."""
    strips = -(-height // rows_per_strip)
    strip = zlib.compress(bytes(rows_per_strip * width * 2), 9)
    long_, short = 4, 3
    entries = [(256, long_, 1, width), (257, long_, 1, height), (258, short, 1, 16), (259, short, 1, 8)]
    entries += [(262, short, 1, 1), (273, long_, strips, 0), (277, short, 1, 1), (278, long_, 1, rows_per_strip)]
    entries += [(279, long_, strips, 0)]
    offsets_at = 8 + 2 + 12 * len(entries) + 4
    counts_at = offsets_at + 4 * strips
    strip_at = counts_at + 4 * strips
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = {273: offsets_at, 279: counts_at}.get(tag, value)
        ifd += struct.pack(
            "<HHII" if kind == long_ else "<HHIHH", tag, kind, count, value, *([] if kind == long_ else [0])
        )
    ifd += b"\x00\x00\x00\x00"
    arrays = struct.pack(f"<{strips}I", *[strip_at] * strips) + struct.pack(f"<{strips}I", *[len(strip)] * strips)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + arrays + strip


def png_header(width: int, height: int, color_type: int = 2) -> bytes:
    """A PNG whose header says width x height (8-bit); what PIL allocates before it reads any pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    rows = zlib.compress(bytes(1 + width * 3) * min(height, 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def jpeg_scan_bomb(width: int = 4_000, height: int = 4_000, extra_scans: int = 1_000) -> bytes:
    """A progressive JPEG whose last refinement scan (95 bytes) is repeated: every scan is a pass over the
    coefficients of the whole image, whatever scale it is decoded at. 4 000 x 4 000 with 1 000 more scans (190 KB):
    16 s of CPU; 8 000 x 8 000 (660 KB): 67 s."""
    data = image_bytes(Image.new("RGB", (width, height), (30, 60, 90)), "JPEG", progressive=True, quality=90)
    end = data.rindex(b"\xff\xd9")
    last_scan = data[data.rindex(b"\xff\xda") : end]
    return data[:end] + last_scan * extra_scans + data[end:]


# Every one of these passed the 200 M pixel limit (the PNG at exactly 200 M pixels), and cost seconds and gigabytes.
BOMBS = {
    "bmp-rle8-100000x2000": (bmp_rle8_bomb, "PYTHON"),
    "webp-canvas-16383x12000": (lambda: webp_canvas_bomb(16_383, 12_000), "max_decoded_pixels"),
    "gif-screen-16000x12500": (lambda: gif_screen_bomb(16_000, 12_500), "max_decoded_pixels"),
    "tiff-16bit-14000x14000": (lambda: tiff16_bomb(14_000, 14_000), "max_decoded_pixels"),
    # 4 GB, then MemoryError: PIL keeps a pointer per row, and the resize's first pass is 512 x 200 M pixels.
    "png-1x200000000": (lambda: png_header(1, 200_000_000), "max_decoded_pixels"),
    "jpeg-1000-scans-4000x4000": (jpeg_scan_bomb, "scans"),
    # 100 M pixels, within the limit, but the resize's first pass would be (model width) x 50 000 000.
    "png-2x50000000": (lambda: png_header(2, 50_000_000), "max_decoded_pixels"),
}


@pytest.fixture(scope="module")
def client(tiny_siglip: Path) -> Iterator[TestClient]:
    """The default limits, on the tiny model."""
    yield from ready_client(build_app(Siglip2Settings(model=str(tiny_siglip))))


@pytest.mark.parametrize("name", list(BOMBS))
def test_bombs_are_refused_from_their_header(client: TestClient, name: str) -> None:
    build, limit = BOMBS[name]
    data = build()
    assert len(data) < 200_000
    started = time.perf_counter()
    error = assert_error(client.post("/embed/image", files={"file": ("bomb", data)}), 413, "image_too_large")
    assert time.perf_counter() - started < 5.0  # measured: a few milliseconds; before the limits, seconds or minutes
    expected = {"PYTHON": "decoded by slow code", "scans": "scans"}.get(limit, "--max-decoded-pixels")
    assert expected in error["message"], error
    assert client.get("/health").json()["status"] == "ok"


def test_eight_bombs_in_one_request_are_refused_at_once(client: TestClient) -> None:
    """Eight WebPs of 140 bytes in one request: 6.45 GB at the peak before the limits."""
    files = [("files", (f"b{i}.webp", webp_canvas_bomb(16_383, 12_000))) for i in range(8)]
    started = time.perf_counter()
    assert_error(client.post("/embed/images", files=files), 413, "image_too_large")
    assert time.perf_counter() - started < 5.0


def test_real_large_images_still_embed(client: TestClient) -> None:
    """A 120 MP panorama JPEG (decoded at reduced scale), and 60 MP PNG and TIFF scans (decoded whole)."""
    panorama = image_bytes(gradient(20_000, 6_000), "JPEG", quality=80)
    scan = gradient(9_000, 6_700)
    png = image_bytes(scan, "PNG", compress_level=1)
    tiff = image_bytes(scan, "TIFF", compression="tiff_adobe_deflate")
    del scan
    files = [("files", ("panorama.jpg", panorama)), ("files", ("scan.png", png)), ("files", ("scan.tif", tiff))]
    started = time.perf_counter()
    response = client.post("/embed/images", files=files)
    assert response.status_code == 200, response.text
    assert len(response.json()["embeddings"]) == 3
    assert time.perf_counter() - started < 60.0  # measured: about 2 s on two busy cores


def gradient(width: int, height: int) -> Image.Image:
    """A greyscale gradient, built without a float copy (one byte a pixel)."""
    x = np.linspace(0, 127, width).astype(np.uint8)
    y = np.linspace(0, 127, height).astype(np.uint8)
    return Image.fromarray(x[None, :] + y[:, None])


def _count_large_loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every image of over 4 M pixels whose pixels PIL decodes, from now on (any decode path calls ImageFile.load)."""
    loads: list[tuple[int, int]] = []
    original = ImageFile.ImageFile.load

    def load(self: ImageFile.ImageFile) -> Any:
        if self.size[0] * self.size[1] > 4_000_000 and not hasattr(self, "_counted"):  # once per image
            self._counted = True  # type: ignore[attr-defined]
            loads.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return loads


def test_a_failed_request_stops_its_other_decodes(tiny_siglip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A junk file first and six large images after: the 400 used to come at once while the six kept decoding, and
    the next request waited for them (15 s)."""
    settings = Siglip2Settings(model=str(tiny_siglip), decode_threads=1)
    with TestClient(build_app(settings)) as client:
        wait_ready(client)
        loads = _count_large_loads(monkeypatch)
        files = [("files", ("junk.png", b"junk"))]
        files += [("files", (f"big{i}.webp", webp_canvas_bomb(9_000, 9_000))) for i in range(6)]  # 81 MP: allowed
        assert_error(client.post("/embed/images", files=files), 400, "unsupported_image")
        started = time.perf_counter()
        assert client.post("/embed/image", files={"file": ("small.jpg", SMALL_JPEG)}).status_code == 200
        waited = time.perf_counter() - started
        assert loads == [], "the failed request's other images were still decoded"
        assert waited < 10.0  # measured: 20 ms (the six decodes took 19 s before)


def test_a_small_request_is_not_held_up_by_large_images(tiny_siglip: Path) -> None:
    """Requests of large images that are allowed (81 MP each) keep coming while a small one is sent: the large ones
    share the decoding budget, one at a time, and leave the other threads to small images."""
    settings = Siglip2Settings(model=str(tiny_siglip), decode_threads=2)
    with TestClient(build_app(settings)) as client:
        wait_ready(client)
        big = [("files", (f"big{i}.gif", gif_screen_bomb(9_000, 9_000))) for i in range(4)]
        senders = [
            threading.Thread(target=client.post, args=("/embed/images",), kwargs={"files": big}) for _ in range(3)
        ]
        for sender in senders:
            sender.start()
        time.sleep(0.5)  # the large decodes are under way
        started = time.perf_counter()
        assert client.post("/embed/image", files={"file": ("small.jpg", SMALL_JPEG)}).status_code == 200
        waited = time.perf_counter() - started
        for sender in senders:
            sender.join()
        assert waited < 10.0  # measured: about 0.1 s


def test_a_request_whose_client_disconnects_stops_its_decodes(
    tiny_siglip: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The request is cancelled when its client goes away: its queued decodes never start, and the access log says
    499."""
    settings = Siglip2Settings(model=str(tiny_siglip), decode_threads=1)
    with TestClient(build_app(settings)) as client:
        wait_ready(client)
        loads = _count_large_loads(monkeypatch)
        boundary = "bombs"
        parts = b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="b{i}.webp"\r\n\r\n'.encode()
            + webp_canvas_bomb(9_000, 9_000)
            + b"\r\n"
            for i in range(6)
        )
        body = parts + f"--{boundary}--\r\n".encode()
        sent: list[dict[str, Any]] = []

        async def call() -> None:
            gone = asyncio.Event()
            request_sent = False

            async def receive() -> dict[str, Any]:
                nonlocal request_sent
                if not request_sent:
                    request_sent = True
                    asyncio.get_running_loop().call_later(0.3, gone.set)  # the client gives up after 0.3 s
                    return {"type": "http.request", "body": body, "more_body": False}
                await gone.wait()
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": "/embed/images",
                "raw_path": b"/embed/images",
                "query_string": b"",
                "root_path": "",
                "headers": [(b"content-type", f"multipart/form-data; boundary={boundary}".encode())],
                "client": ("127.0.0.1", 1),
                "server": ("testserver", 80),
            }
            await client.app(scope, receive, send)  # type: ignore[arg-type]

        started = time.perf_counter()
        assert client.portal is not None
        with caplog.at_level(logging.INFO, logger="embed.access"):
            client.portal.call(call)
        assert "POST /embed/images 499" in caplog.text
        assert time.perf_counter() - started < 10.0  # returns once the client is gone, not after six decodes
        assert len(loads) <= 1, loads  # at most the decode that had started (WebP decodes cannot be interrupted)
        small = client.post("/embed/image", files={"file": ("small.jpg", SMALL_JPEG)})
        assert small.status_code == 200
        assert len(loads) <= 1, loads  # and nothing ran later either


def test_the_pixel_budget_is_first_come_first_served() -> None:
    async def scenario() -> tuple[list[str], int]:
        budget = PixelBudget(100)
        order: list[str] = []
        release_a = asyncio.Event()

        async def take(name: str, pixels: int, until: asyncio.Event | None = None) -> None:
            await budget.acquire(pixels)
            order.append(name)
            assert budget.in_use <= budget.capacity
            if until is not None:
                await until.wait()
            budget.release(pixels)

        a = asyncio.ensure_future(take("a", 70, release_a))
        await asyncio.sleep(0)
        b = asyncio.ensure_future(take("b", 60))  # does not fit next to "a": waits
        gone = asyncio.ensure_future(take("gone", 100))  # waits, then its request is cancelled
        c = asyncio.ensure_future(take("c", 20))  # would fit, but waits its turn behind "b"
        await asyncio.sleep(0.01)
        assert order == ["a"]
        gone.cancel()
        await asyncio.sleep(0.01)
        assert order == ["a"]
        release_a.set()
        await asyncio.gather(a, b, c, gone, return_exceptions=True)
        return order, budget.in_use

    assert asyncio.run(scenario()) == (["a", "b", "c"], 0)


# --- memory, measured in a fresh process -------------------------------------------------------------------------

_MEMORY_PROBE = """
import json, sys, time
from fastapi.testclient import TestClient
from PIL import Image
from siglip2_embed import Siglip2Settings, build_app
from tests.helpers import image_bytes, photo_like, wait_ready

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith(key))

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

settings = Siglip2Settings(model=sys.argv[1], max_decoded_pixels=20_000_000, decode_threads=8)
# 19 M pixels each, allowed; half-transparent, so decoding goes through the alpha composite (16 bytes a pixel).
png = image_bytes(Image.new("RGBA", (4_400, 4_400), (10, 20, 30, 128)), "PNG")
one = [("files", ("a.png", png))]
eight = one * 8
# Cut short: decoding fails after PIL has allocated the image and filled half of it.
broken = [("files", ("cut.png", png[: len(png) // 2]))] * 8
result = {}
with TestClient(build_app(settings)) as client:
    wait_ready(client)
    small = image_bytes(photo_like(64, 48), "JPEG")
    for _ in range(3):
        assert client.post("/embed/image", files={"file": ("s.jpg", small)}).status_code == 200
    result["baseline"] = status("VmRSS")
    for name, files, status_code in (("one", one, 200), ("eight", eight, 200), ("broken", broken, 400)):
        reset_peak()
        response = client.post("/embed/images", files=files)
        assert response.status_code == status_code, response.text
        result[name + "_peak"] = status("VmHWM")
        # A request that failed has answered while its running decode finishes: give that up to 10 s.
        for _ in range(100):
            if status("VmRSS") - result["baseline"] < 100:
                break
            time.sleep(0.1)
        result[name + "_after"] = status("VmRSS")
print(json.dumps(result))
"""


def test_decode_memory_is_bounded_and_returned(tiny_siglip: Path) -> None:
    """Eight large images in one request are decoded one at a time (the budget), not eight at once; afterwards the
    process is back within 100 MB of where it started (glibc used to keep the freed memory)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to measure peak memory")
    run = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(tiny_siglip)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    memory = json.loads(run.stdout.strip().splitlines()[-1])
    baseline = memory["baseline"]
    one = memory["one_peak"] - baseline
    assert one > 100, memory  # the probe does decode a large image
    assert memory["eight_peak"] - baseline < 2 * one + 100, memory
    assert memory["one_after"] - baseline < 100, memory
    assert memory["eight_after"] - baseline < 100, memory
    assert memory["broken_after"] - baseline < 100, memory
