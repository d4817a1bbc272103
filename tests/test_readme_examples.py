"""The README's examples work as a user pastes them: its curl lines and its Python snippets run against services
started with ``./start_all.sh --tiny``, with photos of real size (a data URI of a 300 KB photo is longer than one
command-line argument may be)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import free_port, image_bytes, photo_like

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README = "\n".join(page.read_text() for page in PAGES)
# Lines that manage the services or need real weights or a user's folders: the test starts the services itself.
NOT_PASTED = re.compile(r"^\s*(\./start_all\.sh|\./stop_all\.sh|\./run_tests\.sh|huggingface-cli|\.venv/bin/python)")


def fenced_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.MULTILINE | re.DOTALL)


def with_ports(text: str, image_port: int, text_port: int) -> str:
    return re.sub(r"(localhost|127\.0\.0\.1):6010", rf"\g<1>:{image_port}", text).replace(":6011", f":{text_port}")


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    ports = free_port(), free_port()
    env = {
        **os.environ,
        "EMBED_LOG_DIR": str(tmp_path_factory.mktemp("logs")),
        "SIGLIP2_PORT": str(ports[0]),
        "QWEN3_PORT": str(ports[1]),
    }
    started = subprocess.run(["./start_all.sh", "--tiny"], cwd=ROOT, env=env, capture_output=True, text=True)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield ports
    finally:
        subprocess.run(["./stop_all.sh"], cwd=ROOT, env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for index, name in enumerate(["cat.jpg", "dog.jpg", "img1.jpg", "img2.jpg", "img3.jpg"]):
        (folder / name).write_bytes(image_bytes(photo_like(1600, 1200, seed=index), "JPEG", quality=95))
    (folder / "dog.png").write_bytes(image_bytes(photo_like(640, 480, seed=9), "PNG"))
    assert (folder / "cat.jpg").stat().st_size > 200_000  # as large as a real photo: base64 > 128 KiB
    return folder


def test_the_curl_examples_work(services: tuple[int, int], photos: Path) -> None:
    blocks = [block for block in fenced_blocks("bash") if "curl " in block]
    assert len(blocks) >= 4
    ran = 0
    for block in blocks:
        lines = [line for line in block.replace("\\\n", " ").splitlines() if not NOT_PASTED.match(line)]
        # --fail-with-body: an HTTP error fails the line (and shows the body) instead of printing it and going on.
        script = 'set -euo pipefail\ncurl() { command curl -sS --fail-with-body "$@"; }\n' + "\n".join(lines)
        result = subprocess.run(
            ["bash", "-c", with_ports(script, *services)], cwd=photos, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"{block}\n--- stdout\n{result.stdout[-2000:]}\n--- stderr\n{result.stderr}"
        assert '"error"' not in result.stdout
        ran += sum(line.count("curl ") for line in lines)
    assert ran >= 9


@pytest.mark.parametrize("snippet", [b for b in fenced_blocks("python") if ":601" in b], ids=lambda b: b.split()[1])
def test_the_python_examples_work(services: tuple[int, int], photos: Path, snippet: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", with_ports(snippet, *services)],
        cwd=photos,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
