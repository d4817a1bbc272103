"""Image decoding and resizing: bytes in, a uint8 H x W x 3 array at the model's input size out.

This runs in a thread pool (``common.decoding``), never on the event loop and never in the GPU worker. Rescaling and
normalisation happen later, on the model's device, on the whole batch at once.

Decoding is two steps: ``open_image`` reads the header and refuses, before any pixel is decoded, an image that would
cost too much (the pixel limits); ``finish_image`` decodes, orients, converts and resizes. Between the two the pool
can wait for room in its budget of pixels being decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from common.config import DEFAULT_MAX_DECODED_PIXELS, limit_hint
from common.errors import EmbedError, ImageTooLarge, InvalidImage, UnsupportedImage
from common.libtiff import route_libtiff_messages
from embed_client.formats import ALLOWED_FORMATS, sniff_image_type
from embed_client.formats import DESCRIPTION as FORMATS_DESCRIPTION

try:  # HEIC/HEIF/AVIF from phones, where the wheel is available
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - pillow-heif is in requirements.txt
    pass

# Our own pixel limit (ImageSpec.max_pixels) replaces PIL's global one, which would reject real panoramas.
Image.MAX_IMAGE_PIXELS = None

# PIL can open many more formats than a photo library holds (EPS would even run Ghostscript on the upload), and
# each one is attack surface: only ALLOWED_FORMATS are opened, everything else is 400 unsupported_image.
# (Multi-picture JPEGs from cameras open through the JPEG opener and report the format "MPO".)

# Register every plugin now: Image.open(formats=...) looks the names up without loading plugins itself.
Image.init()
route_libtiff_messages()  # the libtiff PIL loaded writes to stderr otherwise
_OPEN_FORMATS = tuple(name for name in ALLOWED_FORMATS if name in Image.OPEN)  # HEIF only with pillow-heif

# An image whose decode holds at most this many pixels is cheap (under about 100 MB) and never waits for the pool's
# budget of pixels being decoded, so that small requests are not held up by large images.
SMALL_IMAGE_PIXELS = 4_000_000
# PIL decodes a few formats in Python; of the accepted ones, BMP with RLE compression, at up to 100 ns a pixel (a
# 9 KB RLE bitmap can claim 200 M pixels: 30 s of CPU). Such images are refused above this size (0.4 s at worst).
PYTHON_DECODER_MAX_PIXELS = 4_000_000
# Every scan of a progressive JPEG is a pass over the coefficients of the whole image, at whatever scale it is
# decoded (about 1 ns a pixel): a 95-byte scan repeated a thousand times costs a minute for a 64 MP image. Real
# JPEGs have 1 to 3 scans, or about 10 when progressive; scans x pixels may be at most 20 scans of 200 MP (4 s).
JPEG_MAX_SCAN_PIXELS = 4_000_000_000

_DATA_URI = re.compile(r"^data:(?P<mime>[\w/+.-]*)(?:;[\w=.+-]*)*;base64,", re.IGNORECASE)
_16BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


@dataclass(frozen=True)
class ImageSpec:
    """How a model wants its images: read from the checkpoint's preprocessor config, never hard-coded."""

    height: int
    width: int
    resample: Image.Resampling
    max_pixels: int
    # Let libjpeg decode large JPEGs at 1/2, 1/4 or 1/8 scale, staying at least 2x the target size.
    jpeg_draft: bool = True
    # Pixels one decode may hold (see decode_cost); every format but JPEG is decoded at full size.
    max_decoded_pixels: int = DEFAULT_MAX_DECODED_PIXELS


class DecodeCancelled(Exception):
    """The request this decode belongs to has failed or gone: nobody wants the result."""


class _CancellableBytes(io.BytesIO):
    """The encoded image, as PIL reads it (in chunks of 64 KB for most formats): once the request is cancelled, the
    next read stops the decode."""

    def __init__(self, data: bytes, cancelled: threading.Event | None) -> None:
        super().__init__(data)
        self._cancelled = cancelled

    def read(self, size: int | None = -1, /) -> bytes:
        if self._cancelled is not None and self._cancelled.is_set():
            raise DecodeCancelled
        return super().read(size)


class OpenedImage:
    """An image whose header has been read and accepted; ``pixels`` is what decoding and resizing it will hold."""

    def __init__(self, image: Image.Image, data: bytes, pixels: int) -> None:
        self._image: Image.Image | None = image
        self.data = data
        self.pixels = pixels

    def take(self) -> Image.Image:
        """The image, once: the caller owns its (large) decoded pixels and frees them when it is done."""
        image, self._image = self._image, None
        if image is None:
            raise RuntimeError("this image was already taken")
        return image


def decode_base64_image(text: str, max_bytes: int) -> bytes:
    """Raw base64 or a ``data:image/...;base64,`` URI -> bytes."""
    match = _DATA_URI.match(text)
    if match:
        mime = match.group("mime").lower()
        if mime and not mime.startswith("image/"):
            raise InvalidImage(f"data URI has media type {mime!r}; expected image/*")
        text = text[match.end() :]
    elif text.startswith("data:"):
        raise InvalidImage("data URI must be base64 encoded: data:image/<type>;base64,<data>")
    # 4 base64 characters carry 3 bytes: check the limit before decoding anything.
    if len(text) * 3 // 4 > max_bytes:
        raise ImageTooLarge(f"image is larger than {limit_hint('max_image_bytes', max_bytes)}")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage("image_base64 is not valid base64") from None
    if not data:
        raise InvalidImage("image is empty")
    return data


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, as a viewer would show it; a large image makes as few full-size copies as it can."""
    if image.mode == "RGB":
        return image
    if image.mode in _16BIT_MODES or image.mode in ("I", "F"):
        # 16-bit or 32-bit greyscale: scale the full range to 8 bits instead of clipping at 255 (in place, in
        # float32: the same numbers as the plain expression, without its three temporary arrays).
        values = np.asarray(image).astype(np.float32)
        peak = 65535.0 if image.mode != "F" and values.max(initial=0) > 255 else 255.0
        if image.mode == "F":
            peak = 1.0 if values.max(initial=0) <= 1.0 else 255.0
        values /= peak
        values *= 255.0
        values += 0.5
        np.clip(values, 0, 255, out=values)
        return Image.fromarray(values.astype(np.uint8)).convert("RGB")
    if image.mode == "P" and not image.has_transparency_data:
        return image.convert("RGB")  # what the alpha path below gives for an opaque palette, for a quarter the memory
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        # Transparent pixels have arbitrary colour underneath: show them over white, as a viewer does.
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        composite = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return composite.convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _python_decoded(image: Image.Image) -> bool:
    """Whether PIL decodes this image with a decoder written in Python (registered in ``Image.DECODERS``)."""
    tiles = image.tile if isinstance(image, ImageFile.ImageFile) else []
    return any(tile.codec_name in Image.DECODERS for tile in tiles)


def decode_cost(image: Image.Image, spec: ImageSpec, header_pixels: int) -> int:
    """Pixels that decoding and resizing ``image`` holds, after any reduced-scale JPEG set-up: the decoded image,
    or, for an image narrower than the model's input, the resize's first (horizontal) pass, model width x height
    (for a 1 x 100 000 000 PNG, 50 G pixels). A progressive JPEG keeps the coefficients of the whole image, about as
    much memory as decoding a quarter of its ``header_pixels``, whatever the scale it is decoded at."""
    width, height = image.size
    pixels = max(width * height, spec.width * max(width, height))
    if image.format in ("JPEG", "MPO") and image.info.get("progressive"):
        pixels = max(pixels, header_pixels // 4)
    return pixels


@contextmanager
def _decoder_errors(data: bytes) -> Iterator[None]:
    """Whatever a decoder raises on a bad file (OSError, ValueError, struct.error, RuntimeError from pillow-heif,
    MemoryError, ...) is the client's 400, never a 500; our own errors pass through."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns about odd EXIF; the image is still usable
            yield
    except UnidentifiedImageError:
        # A file that starts like an accepted format but does not open is a broken image, not an unsupported one
        # (e.g. a PNG header that says 0 x 0 pixels).
        if sniff_image_type(data) is None:
            raise UnsupportedImage(f"not an image in a supported format ({FORMATS_DESCRIPTION})") from None
        raise InvalidImage("image could not be decoded (the header is invalid, e.g. zero width or height)") from None
    except (EmbedError, DecodeCancelled):
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a broken file (see the docstring)
        raise InvalidImage(f"image could not be decoded ({type(exc).__name__}: truncated or corrupt?)") from None


def open_image(data: bytes, spec: ImageSpec, cancelled: threading.Event | None = None) -> OpenedImage:
    """Read the header and refuse what would cost too much, before any pixel is decoded. Raises InvalidImage,
    UnsupportedImage or ImageTooLarge."""
    if not data:
        raise InvalidImage("image is empty")
    with _decoder_errors(data):
        image: Image.Image = Image.open(_CancellableBytes(data, cancelled), formats=_OPEN_FORMATS)
        width, height = image.size
        if width <= 0 or height <= 0:
            raise InvalidImage("image has zero width or height")
        if width * height > spec.max_pixels:
            raise ImageTooLarge(
                f"image has {width}x{height} = {width * height} pixels, more than "
                f"{limit_hint('max_image_pixels', spec.max_pixels)}"
            )
        if width * height > PYTHON_DECODER_MAX_PIXELS and _python_decoded(image):
            raise ImageTooLarge(
                f"image has {width}x{height} pixels; {image.format} files with this compression are decoded by slow "
                f"code and are accepted up to {PYTHON_DECODER_MAX_PIXELS} pixels (save it as PNG)"
            )
        if image.format in ("JPEG", "MPO"):
            scans = data.count(b"\xff\xda")  # start-of-scan markers: entropy-coded data never holds these bytes
            if scans * width * height > JPEG_MAX_SCAN_PIXELS:
                raise ImageTooLarge(
                    f"JPEG of {width}x{height} pixels has {scans} scans, each a pass over the whole image: more "
                    f"than {JPEG_MAX_SCAN_PIXELS // 10**9} G scans x pixels (real JPEGs have up to about 10 scans)"
                )
        if spec.jpeg_draft and image.format in ("JPEG", "MPO"):
            # DCT scaling: decoding at 1/2..1/8 scale is several times faster and the result is still
            # at least twice the model's input size, so the final resize is nearly unaffected.
            image.draft("RGB", (spec.width * 2, spec.height * 2))
        pixels = decode_cost(image, spec, width * height)
        if pixels > spec.max_decoded_pixels:
            decoded_width, decoded_height = image.size
            shape = "" if pixels == decoded_width * decoded_height else f" (with the resize: {pixels})"
            raise ImageTooLarge(
                f"image has {width}x{height} pixels, decoded at {decoded_width}x{decoded_height}"
                f"{shape}: more than {limit_hint('max_decoded_pixels', spec.max_decoded_pixels)}"
            )
        return OpenedImage(image, data, pixels)


def finish_image(opened: OpenedImage, spec: ImageSpec, cancelled: threading.Event | None = None) -> np.ndarray:
    """Decode an opened image, orient, convert and resize it: the model's input."""
    if cancelled is not None and cancelled.is_set():
        raise DecodeCancelled
    image = opened.take()
    with _decoder_errors(opened.data):
        return resize_image(_load_rgb(image), spec)


def _load_rgb(image: Image.Image) -> Image.Image:
    image.load()  # the first frame of an animation
    ImageOps.exif_transpose(image, in_place=True)  # a copy would cost as much as the decode
    return _to_rgb(image)


def decode_image(data: bytes, spec: ImageSpec) -> Image.Image:
    """Bytes -> RGB image, EXIF orientation applied. Raises InvalidImage / UnsupportedImage / ImageTooLarge."""
    opened = open_image(data, spec)
    with _decoder_errors(data):
        return _load_rgb(opened.take())


def resize_image(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """RGB image -> uint8 array of the model's input size (a plain resize: SigLIP does not crop)."""
    resized = image.resize((spec.width, spec.height), resample=spec.resample)
    return np.asarray(resized, dtype=np.uint8)


def encoded_bytes(item: bytes | str, max_bytes: int) -> bytes:
    """An uploaded image as bytes: raw bytes, or base64 text (raw or a data URI), within the size limit."""
    if isinstance(item, str):
        return decode_base64_image(item, max_bytes)
    if len(item) > max_bytes:
        raise ImageTooLarge(f"image has {len(item)} bytes; the limit is {limit_hint('max_image_bytes', max_bytes)}")
    return item


def open_encoded_image(
    item: bytes | str, spec: ImageSpec, max_bytes: int, cancelled: threading.Event | None = None
) -> OpenedImage:
    """What the decoding pool runs first for one uploaded image: its bytes, its header, the limits."""
    if cancelled is not None and cancelled.is_set():
        raise DecodeCancelled
    return open_image(encoded_bytes(item, max_bytes), spec, cancelled)


def prepare_image(data: bytes, spec: ImageSpec) -> np.ndarray:
    """One image file's bytes -> the model's input: decode, orient, convert, resize."""
    return finish_image(open_image(data, spec), spec)
