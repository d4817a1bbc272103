"""Image decoding and resizing: bytes in, a uint8 H x W x 3 array at the model's input size out.

This runs in a thread pool, never on the event loop and never in the GPU worker. Rescaling and normalisation happen
later, on the model's device, on the whole batch at once.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common.config import limit_hint
from common.errors import ImageTooLarge, InvalidImage, UnsupportedImage
from common.formats import ALLOWED_FORMATS, sniff_image_type
from common.formats import DESCRIPTION as FORMATS_DESCRIPTION

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
_OPEN_FORMATS = tuple(name for name in ALLOWED_FORMATS if name in Image.OPEN)  # HEIF only with pillow-heif

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
    """Any PIL mode -> RGB, as a viewer would show it."""
    if image.mode == "RGB":
        return image
    if image.mode in _16BIT_MODES or image.mode in ("I", "F"):
        # 16-bit or 32-bit greyscale: scale the full range to 8 bits instead of clipping at 255.
        values = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if image.mode != "F" and values.max(initial=0) > 255 else 255.0
        if image.mode == "F":
            peak = 1.0 if values.max(initial=0) <= 1.0 else 255.0
        grey = np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "P" or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        # Transparent pixels have arbitrary colour underneath: show them over white, as a viewer does.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_image(data: bytes, spec: ImageSpec) -> Image.Image:
    """Bytes -> RGB image, EXIF orientation applied. Raises InvalidImage / UnsupportedImage / ImageTooLarge."""
    if not data:
        raise InvalidImage("image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns about odd EXIF; the image is still usable
            image: Image.Image = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
            width, height = image.size
            if width <= 0 or height <= 0:
                raise InvalidImage("image has zero width or height")
            if width * height > spec.max_pixels:
                raise ImageTooLarge(
                    f"image has {width}x{height} = {width * height} pixels, more than "
                    f"{limit_hint('max_image_pixels', spec.max_pixels)}"
                )
            if spec.jpeg_draft and image.format in ("JPEG", "MPO"):
                # DCT scaling: decoding at 1/2..1/8 scale is several times faster and the result is still
                # at least twice the model's input size, so the final resize is nearly unaffected.
                image.draft("RGB", (spec.width * 2, spec.height * 2))
            image.load()  # the first frame of an animation
            ImageOps.exif_transpose(image, in_place=True)  # a copy would cost as much as the decode
            return _to_rgb(image)
    except UnidentifiedImageError:
        # A file that starts like an accepted format but does not open is a broken image, not an unsupported one
        # (e.g. a PNG header that says 0 x 0 pixels).
        if sniff_image_type(data) is not None:
            raise InvalidImage(
                "image could not be decoded (the header is invalid, e.g. zero width or height)"
            ) from None
        raise UnsupportedImage(f"not an image in a supported format ({FORMATS_DESCRIPTION})") from None
    except (ImageTooLarge, InvalidImage):
        raise
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error, MemoryError) as exc:
        raise InvalidImage(f"image could not be decoded ({type(exc).__name__}: truncated or corrupt?)") from None


def resize_image(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """RGB image -> uint8 array of the model's input size (a plain resize: SigLIP does not crop)."""
    resized = image.resize((spec.width, spec.height), resample=spec.resample)
    return np.asarray(resized, dtype=np.uint8)


def prepare_encoded_image(item: bytes | str, spec: ImageSpec, max_bytes: int) -> np.ndarray:
    """What the decoding pool runs for one uploaded image: raw bytes, or base64 text (raw or a data URI)."""
    if isinstance(item, str):
        data = decode_base64_image(item, max_bytes)
    elif len(item) > max_bytes:
        raise ImageTooLarge(f"image has {len(item)} bytes; the limit is {limit_hint('max_image_bytes', max_bytes)}")
    else:
        data = item
    return prepare_image(data, spec)


def prepare_image(data: bytes, spec: ImageSpec) -> np.ndarray:
    """One image file's bytes -> the model's input: decode, orient, convert, resize."""
    return resize_image(decode_image(data, spec), spec)
