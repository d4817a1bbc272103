"""The client's package, as another project installs it: the documented pip command (docs/client.md) builds the
wheel from this checkout and installs it into a fresh virtualenv outside it, and there, from a folder that is not
the checkout, the indexer's command line and EmbedClient work against tiny services, with the package's own
dependencies and nothing of the server's: no torch, no ``common``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embed_client import EmbedClient
from embed_client.formats import sniff_image_type
from tests.doc_examples import ROOT, claimed_command
from tests.helpers import assert_same_array, image_app, mixed_images, serve_in_thread, text_app

# The installed client, from another folder: which package answered, and what it got from the text service.
USE_THE_CLIENT = """
import json, sys
import embed_client
from embed_client import EmbedClient

with EmbedClient(sys.argv[1]) as client:
    vectors = client.embed_texts(["a photo of a cat", "a dog on the sea"])
    tokens = client.embed_tokens(["a cat", "a much longer text about a dog on the sea"])
print(json.dumps({"package": embed_client.__file__, "vectors": vectors.tolist(), "tokens": [t.shape for t in tokens]}))
"""
# Which of these the fresh virtualenv can import: only the client.
MODULES = ("embed_client", "torch", "common", "siglip2_embed", "fastapi")
FIND_MODULES = (
    f"import importlib.util, json; print(json.dumps({{m: importlib.util.find_spec(m) is not None for m in {MODULES}}}))"
)


def requirement_lines(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith(("#", "-r"))}


def test_the_packages_pins_are_requirements_txts() -> None:
    """The package's dependencies are pinned where the services' are, and at the same versions: they cannot drift."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert dependencies and set(dependencies) <= requirement_lines(ROOT / "requirements.txt"), dependencies
    assert all("==" in dependency for dependency in dependencies), dependencies


@pytest.mark.slow
def test_the_client_installs_into_a_fresh_virtualenv(tiny_siglip: Path, tiny_zimage: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    # Nothing of the checkout's environment: not its folder, not its virtualenv.
    env = {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = claimed_command(
        "tests/test_packaging.py::test_the_client_installs_into_a_fresh_virtualenv",
        {"python": python, "~/src/embed-services": str(ROOT)},
    )
    installed = subprocess.run(install, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    photos = elsewhere / "photos"
    photos.mkdir(parents=True)
    for index, data in enumerate(mixed_images()):
        media_type = sniff_image_type(data)
        assert media_type is not None
        (photos / f"photo-{index}.{media_type.removeprefix('image/')}").write_bytes(data)

    def run(*args: str) -> str:
        result = subprocess.run([python, *args], env=env, cwd=elsewhere, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    assert json.loads(run("-c", FIND_MODULES)) == {module: module == "embed_client" for module in MODULES}
    with serve_in_thread(image_app(tiny_siglip)) as image_url, serve_in_thread(text_app(tiny_zimage)) as text_url:
        run("-m", "embed_client", "index", "photos", "--out", "vectors.parquet", "--url", image_url, "--no-progress")
        used = json.loads(run("-c", USE_THE_CLIENT, text_url))
        with EmbedClient(text_url) as client:
            expected = client.embed_texts(["a photo of a cat", "a dog on the sea"])
            dimension = int(client.info()["dimension"])
    table = pq.read_table(elsewhere / "vectors.parquet")
    assert sorted(table.column("path").to_pylist()) == sorted(path.name for path in photos.iterdir())
    assert Path(used["package"]).is_relative_to(venv) and (Path(used["package"]).parent / "py.typed").is_file()
    assert_same_array(np.asarray(used["vectors"], dtype=np.float32), expected)
    (short, long) = used["tokens"]
    assert short[1] == long[1] == dimension and long[0] > short[0]
