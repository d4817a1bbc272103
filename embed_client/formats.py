"""The image formats the services accept, recognised by their leading bytes. Standard library only. It lives in the
client's package, the one package a client installs, and the services import it from here: both sides accept the
same formats."""

from __future__ import annotations

# The formats a photo library holds, as PIL names them. Everything else is refused as unsupported.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF")
DESCRIPTION = "JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC, AVIF"

# Leading bytes -> media type.
_SIGNATURES = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)
# ISO base media files (HEIC, HEIF, AVIF) start with a "ftyp" box whose brand says which.
_AVIF_BRANDS = (b"avif", b"avis")
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1")


def sniff_image_type(data: bytes) -> str | None:
    """The media type of an encoded image in one of the accepted formats, from its first bytes; None otherwise."""
    for signature, media_type in _SIGNATURES:
        if data.startswith(signature):
            return media_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[4:8] == b"ftyp":
        if data[8:12] in _AVIF_BRANDS:
            return "image/avif"
        if data[8:12] in _HEIF_BRANDS:
            return "image/heic"
    return None


def is_image_data_uri(text: str) -> bool:
    """``data:image/...`` text: on the image service's OpenAI route such an input is an image, not a text."""
    return text[:11].lower() == "data:image/"
