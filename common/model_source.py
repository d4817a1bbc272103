"""Where a model comes from: a local folder, the local hub cache, or (when online) the hub itself.

A model that can be found nowhere is one clear paragraph that says how to download it, not a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path


class ModelNotFound(Exception):
    pass


def display_name(source: str) -> str:
    """The last path component: "google/siglip2-so400m-patch16-512" -> "siglip2-so400m-patch16-512"."""
    return Path(source.rstrip("/")).name or source


def _looks_like_hub_id(source: str) -> bool:
    return not source.startswith(("/", ".", "~")) and source.count("/") == 1


def resolve_model_source(source: str, *, download_help: str) -> str:
    """Return a local folder, or a hub id for transformers to download. Raises ModelNotFound with instructions."""
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path)
    if _looks_like_hub_id(source):
        from huggingface_hub import snapshot_download  # a heavy import, only needed for hub ids

        try:
            return snapshot_download(source, local_files_only=True)  # already in the HF cache
        except Exception:  # noqa: BLE001 - any failure means "not in the cache"
            if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes"):
                return source  # transformers downloads it on load
    raise ModelNotFound(
        f"Model not found: {source!r} is neither a local folder nor a hub id in the local Hugging Face cache"
        f"{' (HF_HUB_OFFLINE is set, so nothing is downloaded)' if _looks_like_hub_id(source) else ''}. "
        f"Download it first, for example:\n\n{download_help}\n\nthen start the service with --model PATH "
        "(or the environment variable named in --help). To try the API without any weights, run ./start_all.sh --tiny."
    )
