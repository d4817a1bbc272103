"""libtiff's messages, which go to the process's stderr, routed into logging.

libtiff (which PIL uses for compressed TIFFs) prints its warnings and errors on stderr: 40-160 bytes for each
malformed TIFF a client sends, into the console log that is never rotated. Its library-wide handlers are replaced
by one that logs them at debug level (the client gets its 400 anyway). Pillow offers no option for this, so the
handlers are set through ctypes on the libtiff that PIL has loaded, found in /proc/self/maps (Linux only).
"""

from __future__ import annotations

import ctypes
import logging

logger = logging.getLogger(__name__)

# libtiff's handler type: (module, printf format, va_list). On the 64-bit ABIs Linux runs on, a va_list argument
# arrives as a pointer, which vsnprintf takes as it is.
_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)
_libc: ctypes.CDLL | None = None


def _log_message(module: bytes | None, fmt: bytes | None, args: int | None) -> None:
    buffer = ctypes.create_string_buffer(512)
    if fmt is not None and _libc is not None:
        _libc.vsnprintf(buffer, len(buffer), fmt, ctypes.c_void_p(args))
    text = buffer.value.decode("utf-8", "replace")
    logger.debug("libtiff: %s: %s", (module or b"").decode("utf-8", "replace"), text)


_handler = _HANDLER(_log_message)  # kept alive for as long as libtiff may call it


def route_libtiff_messages() -> bool:
    """Send the messages of every libtiff loaded so far (import PIL's core first) to this module's logger. Returns
    whether there was one."""
    global _libc
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {fields[-1] for fields in map(str.split, maps) if fields and "/libtiff" in fields[-1]}
        libraries = [ctypes.CDLL(path) for path in sorted(paths)]
        _libc = ctypes.CDLL(None)
        _libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
    except (OSError, AttributeError):  # no /proc (not Linux), or not the C library we know
        return False
    for library in libraries:
        for setter in (library.TIFFSetErrorHandler, library.TIFFSetWarningHandler):
            setter.restype = ctypes.c_void_p
            setter.argtypes = [_HANDLER]
            setter(_handler)
    return bool(libraries)
