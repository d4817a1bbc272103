"""Image decoding on images made in memory: modes, orientation, formats, limits, bad input."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from common.errors import ImageTooLarge, InvalidImage, UnsupportedImage
from common.images import ImageSpec, decode_base64_image, decode_image, prepare_image
from tests.helpers import image_bytes, photo_like

SPEC = ImageSpec(height=32, width=32, resample=Image.Resampling.BILINEAR, max_pixels=10_000_000)


def test_exif_orientation_is_applied() -> None:
    # A 40x20 landscape image stored with "rotate 90" orientation is shown (and embedded) as 20x40 portrait.
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    decoded = decode_image(image_bytes(image, "JPEG", exif=exif, quality=95), SPEC)
    assert decoded.size == (20, 40)
    top = np.asarray(decoded)[5, 10]
    assert top[2] > 200 and top[0] < 60  # the blue half is now on top


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("P", "PNG"),
        ("L", "PNG"),
        ("1", "PNG"),
        ("CMYK", "JPEG"),
        ("RGB", "WEBP"),
        ("RGB", "BMP"),
        ("RGB", "TIFF"),
        ("RGB", "GIF"),
    ],
)
def test_modes_and_formats_become_rgb(mode: str, fmt: str) -> None:
    decoded = decode_image(image_bytes(photo_like(48, 40, seed=3, mode=mode), fmt), SPEC)
    assert decoded.mode == "RGB" and decoded.size == (48, 40)


def test_transparent_pixels_are_shown_over_white() -> None:
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    assert np.asarray(decode_image(image_bytes(image), SPEC)).min() == 255
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.info["transparency"] = 0
    assert np.asarray(decode_image(image_bytes(palette), SPEC)).min() == 255


def test_16_bit_greyscale_uses_the_full_range() -> None:
    values = np.array([[0, 32768], [65535, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    decoded = np.asarray(decode_image(image_bytes(image), SPEC))[..., 0]
    assert decoded[0, 0] == 0 and 120 <= decoded[0, 1] <= 135 and decoded[1, 0] == 255


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (10, 10), color) for color in [(255, 0, 0), (0, 255, 0)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    pixel = np.asarray(decode_image(buffer.getvalue(), SPEC))[5, 5]
    assert pixel[0] > 200 and pixel[1] < 50


def test_prepare_image_resizes_to_model_input() -> None:
    pixels = prepare_image(image_bytes(photo_like(100, 30)), SPEC)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8


def test_bad_bytes_are_client_errors() -> None:
    good = image_bytes(photo_like(64, 64), "JPEG")
    with pytest.raises(InvalidImage):
        decode_image(b"", SPEC)
    with pytest.raises(UnsupportedImage):
        decode_image(b"this is not an image at all", SPEC)
    with pytest.raises(InvalidImage):
        decode_image(good[: len(good) // 2], SPEC)  # truncated
    with pytest.raises(InvalidImage):
        decode_image(image_bytes(photo_like(64, 64))[:60], SPEC)  # PNG header only


def test_pixel_limit_is_checked_before_decoding() -> None:
    # A 20000 x 20000 PNG of one colour is tiny on disk but 400 MP decoded.
    bomb = image_bytes(Image.new("L", (20000, 20000)))
    assert len(bomb) < 2_000_000
    with pytest.raises(ImageTooLarge, match="max_image_pixels"):
        decode_image(bomb, SPEC)


def test_jpeg_draft_is_close_to_full_decode() -> None:
    """Draft decoding a 12 MP-class JPEG stays within 0.005 on the [-1, 1] scale (mean absolute difference)."""
    data = image_bytes(photo_like(2400, 1800, seed=7), "JPEG", quality=92)
    spec = ImageSpec(height=256, width=256, resample=Image.Resampling.BILINEAR, max_pixels=10**8)
    full = prepare_image(data, ImageSpec(256, 256, Image.Resampling.BILINEAR, 10**8, jpeg_draft=False))
    fast = prepare_image(data, spec)
    difference = np.abs(full.astype(np.float32) - fast.astype(np.float32)) / 127.5
    assert difference.mean() <= 0.005


def test_base64_forms() -> None:
    data = image_bytes(photo_like(8, 8))
    text = base64.b64encode(data).decode()
    assert decode_base64_image(text, 10**6) == data
    assert decode_base64_image(f"data:image/png;base64,{text}", 10**6) == data
    assert decode_base64_image(text[:20] + "\n" + text[20:], 10**6) == data  # line-wrapped base64
    with pytest.raises(InvalidImage, match="media type"):
        decode_base64_image(f"data:text/plain;base64,{text}", 10**6)
    with pytest.raises(InvalidImage, match="base64"):
        decode_base64_image("not base64 !!", 10**6)
    with pytest.raises(InvalidImage):
        decode_base64_image("data:image/png,rawdata", 10**6)
    with pytest.raises(ImageTooLarge):
        decode_base64_image(text, 10)
