"""Where a model comes from and where it runs: its local folder (a folder, the Hugging Face cache, or a download
from the hub), the device and the dtype (chosen in ``common.precision``).

A model that can be found nowhere is one clear paragraph that says how to download it, not a traceback; so is a
weights file that is truncated or corrupt (an interrupted download or copy), and a model file that this process may
not read (a file of mode 0600 owned by another user, typical of a folder mounted into a container): that one is
whole, and re-downloading it would not help.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from common.config import ServiceSettings
from common.precision import DTypeChoice, pick_dtype

logger = logging.getLogger(__name__)


# transformers' own default SiglipTextConfig (vocabulary 32000, bos 49406, eos 49407) fails its own token check;
# it is built whenever a SigLIP config is printed (transformers prints every config it loads, into an f-string, at
# any log level) or made, so every start of the image service, and every build of a tiny SigLIP (a container's
# --tiny start), warned that "eos_token_id must be None or an integer within the vocabulary", about a config it never
# uses: the model's own ids are checked when its config is loaded.
DEFAULT_SIGLIP_TEXT_IDS = re.compile(
    r"_token_id must be .* within the vocabulary \(between 0 and 31999\), got 4940[67]\."
)


def not_about_default_siglip_text_config(record: logging.LogRecord) -> bool:
    return DEFAULT_SIGLIP_TEXT_IDS.search(record.getMessage()) is None


def hide_the_default_siglip_text_config_warning() -> None:
    """Drop that warning from transformers' log (once per process, however often called)."""
    config_logger = logging.getLogger("transformers.configuration_utils")
    if not_about_default_siglip_text_config not in config_logger.filters:
        config_logger.addFilter(not_about_default_siglip_text_config)


class ModelNotFound(Exception):
    pass


class WrongModel(ValueError):
    """The folder holds a model of another kind than the service serves; the message says what was found."""


# A file the tiny random-weight test models carry in their folder, so a service (and everything that reads its
# /health or /info) can say that its vectors are meaningless. Real checkpoints never have it.
RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS.txt"


def has_random_weights(source: str) -> bool:
    return (Path(source) / RANDOM_WEIGHTS_MARKER).is_file()


def mark_random_weights(folder: Path) -> None:
    (folder / RANDOM_WEIGHTS_MARKER).write_text(
        "Tiny random-weight model for tests and trying the API: its vectors are meaningless.\n"
    )


def read_config(source: str, subfolder: str | None, expected_type: str, what: str) -> Any:
    """The model's transformers config, or WrongModel with a message that says what the folder holds instead."""
    from transformers import AutoConfig

    folder = Path(source) / (subfolder or "")
    if folder.is_dir() and not (folder / "config.json").is_file():
        found = "a diffusers pipeline (model_index.json)" if (Path(source) / "model_index.json").is_file() else None
        raise WrongModel(
            f"{source} has no {Path(subfolder or '') / 'config.json'}"
            + (f"; it is {found}" if found else "")
            + f". This service needs {what}."
        )
    config = AutoConfig.from_pretrained(source, **({"subfolder": subfolder} if subfolder else {}))
    if config.model_type != expected_type:
        raise WrongModel(f"{source} holds a {config.model_type!r} model. This service needs {what}.")
    return config


class BrokenWeights(Exception):
    """A weights file of the model does not load: truncated or corrupt."""


class UnreadableModelFile(Exception):
    """A file or folder of the model exists but this process may not read it: its owner or mode, not its content."""


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
    how = "Download it first"
    if _looks_like_hub_id(source):
        from huggingface_hub import constants, list_repo_files, snapshot_download  # heavy imports, only for hub ids

        from common.hub import fail_fast_when_unreachable, unreachable_reason

        try:
            return str(snapshot_download(source, local_files_only=True))  # already in the HF cache
        except Exception:  # noqa: BLE001 - any failure means "not in the cache"
            reason = "is neither a local folder nor in the local Hugging Face cache"
        if download and not _offline():
            fail_fast_when_unreachable()  # no network: the first failed connection says so, not five retries later
            try:
                patterns = select_files(list_repo_files(source)) if select_files else None
                logger.info("downloading %s from the Hugging Face hub (%s)", source, patterns or "all files")
                return str(snapshot_download(source, allow_patterns=patterns))
            except Exception as exc:  # noqa: BLE001 - no network, no such repo, no access: all need the same help
                unreachable = unreachable_reason(exc)
                if unreachable is None:
                    reason += f", and downloading it failed ({type(exc).__name__})"
                else:
                    reason += (
                        f", and the Hugging Face hub could not be reached to download it (no network? "
                        f"{constants.ENDPOINT}: {unreachable})"
                    )
                    how = "Download it on a machine with network access and copy the folder to this one"
        elif _offline():
            reason += " (HF_HUB_OFFLINE is set, so nothing is downloaded)"
    raise ModelNotFound(
        f"Model not found: {source!r} {reason}. {how}, for example:\n\n{download_help}\n\n" + _where_to_put_it()
    )


def _where_to_put_it() -> str:
    """The end of the "not found" message: how to point the service at a downloaded model, and at none."""
    # The container image sets this: there the model must be mounted, and --tiny is an argument of the image.
    mount = os.environ.get("EMBED_MODELS_MOUNT")
    if mount:
        return (
            f"This runs in a container, which sees only what is mounted: mount the folder that holds the model at "
            f"{mount} (docker run -v /path/on/the/host:{mount}:ro ...) and start the service with "
            f"--model {mount}/FOLDER (or the environment variable named in --help). "
            "To try the API without any weights, add --tiny to the image's arguments (IMAGE siglip2 --tiny)."
        )
    return (
        "then start the service with --model PATH (or the environment variable named in --help). "
        "To try the API without any weights, run ./start_all.sh --tiny."
    )


def pick_device(settings: ServiceSettings) -> torch.device:
    """cuda -> mps -> cpu for "auto"; an explicit choice that is not available is an error, not a silent fallback."""
    if settings.force_cpu:
        return torch.device("cpu")
    requested = settings.device
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("--device mps was asked for, but torch sees no MPS device")
    return torch.device("cuda", 0) if requested == "cuda" else torch.device(requested)


def describe_device(device: torch.device) -> str:
    """ "cuda:0 (NVIDIA H100 80GB HBM3)" style label for logs."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def whole_folder(source: str) -> list[Path]:
    return [Path(source)]


def locate_model(
    settings: ServiceSettings, download_help: str, parts_read: Callable[[str], list[Path]] = whole_folder
) -> tuple[str, torch.device, DTypeChoice]:
    """What every loader starts with: the model's folder, the device and the dtype with its reason (logged).
    ``parts_read``: the folders of it the loader reads (the whole folder, unless the service uses only a part of a
    larger model)."""
    source = resolve_model_source(settings.model, download_help=download_help)
    for part in parts_read(source):
        raise_if_unreadable(part)  # before loading: the loaders would call such a file missing or corrupt
    device = pick_device(settings)
    dtype = pick_dtype(settings.dtype, device, cpu_float32_because=settings.cpu_float32_because)
    logger.info("loading %s on %s as %s (%s)", source, describe_device(device), dtype.name, dtype.reason)
    return source, device, dtype


def find_unreadable(folder: str | Path) -> Path | None:
    """The first file or folder under ``folder`` that this process may not read (permission denied), or None."""
    denied: list[Path] = []

    def note(error: OSError) -> None:
        if isinstance(error, PermissionError):
            denied.append(Path(error.filename))

    for root, dirs, files in os.walk(folder, onerror=note):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            try:
                path.open("rb").close()
            except PermissionError:
                return path
            except OSError:
                pass  # a dangling link, say: not a matter of permissions
        if denied:
            break
    return denied[0] if denied else None


def raise_if_unreadable(folder: str | Path) -> None:
    """UnreadableModelFile naming the first file of ``folder`` this process may not read, its owner and mode, and
    the user id the process runs as."""
    path = find_unreadable(folder)
    if path is None:
        return
    try:
        info = path.stat()
        owner = f"owned by user id {info.st_uid} (group id {info.st_gid}) with mode {info.st_mode & 0o7777:04o}"
    except OSError:
        owner = "in a folder this process may not enter"
    kind = "folder" if path.is_dir() else "file"
    raise UnreadableModelFile(
        f"Permission denied: the model {kind} {path} is {owner}, and this service runs as user id {os.getuid()} "
        f"(group id {os.getgid()}), which may not read it. The file is not damaged: do not download it again. "
        f"Make the model readable to that user, e.g. on the host: chmod -R a+rX {folder} "
        "(in a container, the files of a mounted folder keep their host owner and mode)."
    )


def find_broken_weights(folder: str | Path) -> tuple[Path, str] | None:
    """The first weights file in ``folder`` that is truncated or corrupt, and why; None if they all look whole.

    Reads only the headers: a safetensors header lists every tensor's byte range, so a file cut short anywhere no
    longer covers it; a PyTorch ``.bin`` is a zip archive whose directory sits at its very end."""
    from safetensors import safe_open  # the loaders' own dependency; imported when needed

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="numpy"):
                pass
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types, all meaning "broken"
            return path, str(exc)
    for path in sorted(Path(folder).glob("*.bin")):
        if not zipfile.is_zipfile(path):
            return path, "not a complete zip archive"
    return None


def read_checkpoint_floats(folder: str | Path, names: list[str]) -> dict[str, float]:
    """Scalars as the checkpoint stores them (float32 for SigLIP's), read from its safetensors files, single or
    sharded. A model loaded in bfloat16 has them rounded (SigLIP's logit scale 4.7 becomes 4.6875). A name not found
    in a safetensors file is left out."""
    import json

    from safetensors import safe_open

    root = Path(folder)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = {name: root / weight_map[name] for name in names if name in weight_map}
    else:
        files = {name: root / "model.safetensors" for name in names} if (root / "model.safetensors").is_file() else {}
    values: dict[str, float] = {}
    for name, path in files.items():
        with safe_open(str(path), framework="pt") as checkpoint:
            if name in checkpoint.keys():  # noqa: SIM118 - safe_open has keys(), no __contains__
                values[name] = float(checkpoint.get_tensor(name).float().item())
    return values


@contextmanager
def explain_broken_weights(folder: str | Path, download_help: str) -> Iterator[None]:
    """Around loading a model from ``folder``: if loading fails and a weights file there is broken, the error says
    which file and how to download it again (the loader's own error only says "incomplete metadata"); if one may
    not be read, it says that instead (safetensors calls such a file missing, which is no reason to download it)."""
    try:
        yield
    except Exception as exc:
        try:
            raise_if_unreadable(folder)
        except UnreadableModelFile as unreadable:
            raise unreadable from exc
        broken = find_broken_weights(folder)
        if broken is None:
            raise
        path, reason = broken
        raise BrokenWeights(
            f"The weights file {path} is truncated or corrupt ({reason}): an interrupted download or copy? "
            f"Delete it and re-download it, for example:\n\n{download_help}\n\n"
            "(for a file in the Hugging Face cache, add --force-download to the hf download command)."
        ) from exc
