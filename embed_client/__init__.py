"""A Python client for the embedding services, and a bulk indexer for a photo folder.

    from embed_client import EmbedClient

    with EmbedClient("http://127.0.0.1:6010", api_key=None) as client:
        images = client.embed_images(["cat.jpg", "dog.png"])   # (2, 1152) float32, L2-normalised
        texts = client.embed_texts(["a photo of a cat"])      # (1, 1152), same space on port 6010

    python -m embed_client index PHOTO_DIR --out vectors.parquet [--url http://127.0.0.1:6010] [--concurrency 4]
                                 [--reindex] [--follow-links]

The client speaks ``POST /v1/embeddings`` with ``encoding_format="base64"`` (vectors come back as little-endian
float32, several times smaller and faster to parse than JSON floats) and images as ``data:image/...;base64,`` URIs.
It falls back to the native ``/embed/images`` and ``/embed/texts`` routes when a server answers 404 for
``/v1/embeddings``. Requests are split to the server's ``limits.max_items_per_request`` and ``max_body_bytes``
(read once from ``GET /info``). 429 and 503 (queue full, model loading), 502 and 504 and connection errors are
retried with exponential backoff and jitter, honouring ``Retry-After``; a 500 (what a request in flight on a dying
Ray Serve replica gets; embedding is idempotent) is retried the same way, at most twice; other errors raise
``ServiceError`` at once. Images sent
to a service whose ``/info`` says it does not embed them raise ``WrongService`` before anything is sent.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from embed_client.client import (
    EmbedClient,
    EmbedClientError,
    ServiceError,
    ServiceUnreachable,
    WrongService,
    decode_vector,
    split_requests,
)

if TYPE_CHECKING:
    from embed_client.__main__ import build_parser, main
    from embed_client.files import PhotoFile, Scan, scan_folder, scan_photos
    from embed_client.indexer import (
        IndexMismatch,
        IndexRefused,
        IndexSummary,
        OutputLocked,
        ParquetIndex,
        embed_chunk,
        index_folder,
        index_schema,
        write_parquet_atomically,
    )

# Imported on first use: the indexer needs pyarrow and tqdm, which a program that only embeds does not install.
_LAZY = {
    "IndexMismatch": "embed_client.indexer",
    "IndexRefused": "embed_client.indexer",
    "IndexSummary": "embed_client.indexer",
    "OutputLocked": "embed_client.indexer",
    "Scan": "embed_client.files",
    "scan_folder": "embed_client.files",
    "ParquetIndex": "embed_client.indexer",
    "PhotoFile": "embed_client.files",
    "embed_chunk": "embed_client.indexer",
    "index_folder": "embed_client.indexer",
    "index_schema": "embed_client.indexer",
    "scan_photos": "embed_client.files",
    "write_parquet_atomically": "embed_client.indexer",
    "build_parser": "embed_client.__main__",
    "main": "embed_client.__main__",
}

__all__ = [
    "EmbedClient",
    "EmbedClientError",
    "IndexMismatch",
    "IndexRefused",
    "IndexSummary",
    "OutputLocked",
    "ParquetIndex",
    "PhotoFile",
    "Scan",
    "ServiceError",
    "ServiceUnreachable",
    "WrongService",
    "build_parser",
    "decode_vector",
    "embed_chunk",
    "index_folder",
    "index_schema",
    "main",
    "scan_folder",
    "scan_photos",
    "split_requests",
    "write_parquet_atomically",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
