"""A model file or folder the service's user may not read (mode 0600 or 0700, owned by another user: what a folder
mounted into a container often looks like) is reported as exactly that, with the user id the service runs as,
never as "truncated or corrupt", which would send the user to download 8 GB again for nothing.

The service runs as a real process under an unprivileged user id (root reads every file), started as a user starts
it, so that what is checked is its own log and exit status."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import free_port, public_folder, readable_copy

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# Not the tests' own user: as root, run the service as "nobody"; as any other user, that user cannot read a file
# of mode 0000 that it owns.
AS_ROOT = os.getuid() == 0
SERVICE_UID = 65534 if AS_ROOT else os.getuid()
DENIED_FILE_MODE = 0o600 if AS_ROOT else 0o000
DENIED_FOLDER_MODE = 0o700 if AS_ROOT else 0o000


def as_service_user(command: list[str]) -> list[str]:
    """``command`` run as SERVICE_UID (util-linux's setpriv, where the tests run as root)."""
    if not AS_ROOT:
        return command
    return ["setpriv", f"--reuid={SERVICE_UID}", f"--regid={SERVICE_UID}", "--clear-groups", *command]


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A folder the service's user may enter."""
    with public_folder("model-permissions-") as folder:
        yield folder


def run_service(program: str, model: Path) -> subprocess.CompletedProcess[str]:
    home = model.parent / "home"
    home.mkdir(mode=0o777, exist_ok=True)
    home.chmod(0o777)
    env = {**os.environ, "HOME": str(home), "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("EMBED_MODELS_MOUNT", None)
    return subprocess.run(
        as_service_user([sys.executable, program, "--model", str(model), "--port", str(free_port())]),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


CASES: dict[str, tuple[str, str, str]] = {
    # case: (service program, fixture of the tiny model, the path to lock within it)
    "siglip-weights": ("siglip2_embed.py", "tiny_siglip", "model.safetensors"),
    "siglip-config": ("siglip2_embed.py", "tiny_siglip", "config.json"),
    "zimage-weights": ("qwen3_embed.py", "tiny_zimage", "text_encoder/model.safetensors"),
    "zimage-tokenizer-folder": ("qwen3_embed.py", "tiny_zimage", "tokenizer"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_unreadable_model_file_is_reported_as_unreadable(
    case: str, public_dir: Path, request: pytest.FixtureRequest
) -> None:
    program, fixture, locked = CASES[case]
    model = readable_copy(request.getfixturevalue(fixture), public_dir)
    target = model / locked
    target.chmod(DENIED_FOLDER_MODE if target.is_dir() else DENIED_FILE_MODE)

    result = run_service(program, model)

    log = result.stderr
    assert result.returncode != 0, log
    kind = "folder" if target.is_dir() else "file"
    assert f"Permission denied: the model {kind} {target} is " in log, log
    assert f"this service runs as user id {SERVICE_UID} " in log
    assert f"with mode {target.stat().st_mode & 0o7777:04o}" in log
    assert "do not download it again" in log
    assert "truncated or corrupt" not in log
    assert "Model not found" not in log


def test_the_parts_of_z_image_the_text_service_never_reads_may_be_unreadable(
    public_dir: Path, tiny_zimage: Path
) -> None:
    """Z-Image-Turbo's diffusion transformer and VAE beside its text encoder, locked (a folder shared with the image
    generator, whose files may be its own): the text service reads only text_encoder/ and tokenizer/, and loads."""
    model = readable_copy(tiny_zimage, public_dir)
    (model / "transformer").mkdir()
    (model / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 1024)
    (model / "transformer" / "diffusion_pytorch_model.safetensors").chmod(DENIED_FILE_MODE)
    (model / "vae").mkdir(mode=DENIED_FOLDER_MODE)
    result = load_as_service_user(
        f"from qwen3_embed import load, Qwen3Settings; load(Qwen3Settings(model={str(model)!r}))"
    )
    assert result.returncode == 0, result.stderr


def load_as_service_user(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        as_service_user([sys.executable, "-c", code]),
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_readable_model_loads_as_that_user(public_dir: Path, tiny_siglip: Path) -> None:
    """The check finds nothing in a model that user may read: the same copy, nothing locked, loads."""
    model = readable_copy(tiny_siglip, public_dir)
    result = load_as_service_user(
        f"from siglip2_embed import load, Siglip2Settings; load(Siglip2Settings(model={str(model)!r}))"
    )
    assert result.returncode == 0, result.stderr
