"""Where a model comes from: a local folder, the local hub cache, or (when online) the hub itself.

A model that can be found nowhere is one clear paragraph that says how to download it, not a traceback.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


class ModelNotFound(Exception):
    pass


def display_name(source: str) -> str:
    """The last path component: "google/siglip2-so400m-patch16-512" -> "siglip2-so400m-patch16-512"."""
    return Path(source.rstrip("/")).name or source


def _looks_like_hub_id(source: str) -> bool:
    return not source.startswith(("/", ".", "~")) and source.count("/") == 1


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def resolve_model_source(
    source: str,
    *,
    download_help: str,
    download: bool = False,
    select_files: Callable[[list[str]], list[str] | None] | None = None,
) -> str:
    """A local folder for ``source``: the folder itself, or the hub id's snapshot in the local Hugging Face cache.

    With ``download`` (main() does this once, before serving) a hub id that is not cached is downloaded first;
    ``select_files`` picks which of the repository's files are needed (Z-Image-Turbo's text encoder is 8 GB of a
    30 GB repository). Anything that fails is ModelNotFound with the download instructions, never a traceback.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path)
    reason = "is not a local folder"
    if _looks_like_hub_id(source):
        from huggingface_hub import list_repo_files, snapshot_download  # heavy imports, only for hub ids

        try:
            return str(snapshot_download(source, local_files_only=True))  # already in the HF cache
        except Exception:  # noqa: BLE001 - any failure means "not in the cache"
            reason = "is neither a local folder nor in the local Hugging Face cache"
        if download and not _offline():
            try:
                patterns = select_files(list_repo_files(source)) if select_files else None
                logger.info("downloading %s from the Hugging Face hub (%s)", source, patterns or "all files")
                return str(snapshot_download(source, allow_patterns=patterns))
            except Exception as exc:  # noqa: BLE001 - no network, no such repo, no access: all need the same help
                reason += f", and downloading it failed ({type(exc).__name__})"
        elif _offline():
            reason += " (HF_HUB_OFFLINE is set, so nothing is downloaded)"
    raise ModelNotFound(
        f"Model not found: {source!r} {reason}. Download it first, for example:\n\n{download_help}\n\n"
        "then start the service with --model PATH (or the environment variable named in --help). "
        "To try the API without any weights, run ./start_all.sh --tiny."
    )
