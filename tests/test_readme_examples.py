"""Every example of README.md and docs/*.md works as a user pastes it, and every relative link there resolves.

The convention (docs/README.md says it in one line):

- Every ```bash and ```python block is an example, and a test runs it. Output, logs, file layouts and other
  illustrations are ```text or ```json (or yaml, toml...). A bare ``` and shell or Python under another name
  (``sh``, ``console``, ``py``...) are refused, so that no example escapes.
- By default a block is run here, page by page in the order of the page, against services started with
  ``./start_all.sh --tiny`` on free ports, in a folder of photos of real size with the names the examples use
  (``cat.jpg``, ``dog.jpg``, ``dog.png``, ``img1.jpg``...; a data URI of a 300 KB photo is longer than one
  command-line argument may be). What the test changes, and nothing else: the ports 6010/6011, ``gpu-box`` (a
  host name of the examples) for 127.0.0.1, the indexer's default ``--url`` (port 6010) spelled out, ``.venv/bin/``
  for the test's virtualenv, ``~/Pictures`` for the photos; ``$EMBED_API_KEY`` is empty (the services run without
  a key). A bash block runs under ``set -euo pipefail``, with curl failing on an HTTP error; a python block runs
  with this interpreter.
- Lines of a bash block that no test here can run are left out by SKIPPED_LINES, each rule with its reason (the
  services managed by the test itself, downloads of real weights, installs, benchmarks). A block that is left
  with nothing to run must say so with the tag ``not-run`` in its info string (```bash not-run), and may hold only
  such lines.
- A block that needs what only another test has (a Ray cluster, docker) carries ``run-by=tests/FILE.py::NAME``
  (```bash run-by=tests/test_cluster_serve.py::cluster): the test or fixture NAME reads the block's command with
  ``tests.doc_examples.claimed_command`` and runs it, appending only its own options (ports, addresses, tiny
  models); a test that runs whole scripts in an environment of its own (the container test's docker) reads its
  blocks with ``claimed_blocks``. test_every_example_is_run_by_a_test checks that the named function makes one of
  those calls.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.doc_examples import EXAMPLE_LANGUAGES, PAGES, ROOT, Block, all_blocks, blocks, venv_words
from tests.helpers import free_port, write_example_photos

# A shell line a test here does not run, and why.
SKIPPED_LINES = {
    r"^([A-Z0-9_]+=\S+ )*\./(start_all|stop_all)\.sh\b": "manages the services: this test starts them with "
    "./start_all.sh --tiny and stops them with ./stop_all.sh; tests/test_scripts.py runs both scripts end to end",
    r"^\./run_tests\.sh\b": "is the test run itself",
    r"^(hf|modelscope) download\b": "downloads real weights (tests never download); "
    "test_the_download_commands_are_the_services_own checks them",
    r"-m pip install\b": "installs packages: the tests' virtualenv has them all (run_tests.sh installs "
    "requirements-dev.txt, which includes requirements.txt and requirements-cluster.txt)",
    r"-m bench\.": "a benchmark: minutes of load on full-size models or a GPU (bench/RESULTS.md has its runs)",
}
OTHER_NAMES = {"sh", "shell", "console", "zsh", "shell-session", "py", "python3", "pycon", "ipython"}


def skipped(line: str) -> bool:
    return any(re.search(pattern, line) for pattern in SKIPPED_LINES)


def runs_here(block: Block) -> bool:
    return block.language in EXAMPLE_LANGUAGES and block.claim is None and "not-run" not in block.tags


def problems_of(block: Block) -> list[str]:
    """Why this block is not run by any test (nothing: it is)."""
    if block.language == "":
        return ["a bare ``` block: `text` for output, `bash` or `python` for an example"]
    if block.language in OTHER_NAMES:
        return [f"```{block.language}: write ```bash or ```python, so that a test runs it"]
    if block.language not in EXAMPLE_LANGUAGES:
        return []
    unknown = [tag for tag in block.tags if tag != "not-run" and not tag.startswith("run-by=")]
    if unknown or len(block.tags) > 1:
        return [f"tags {block.tags}: one of `not-run` or `run-by=tests/FILE.py::NAME`"]
    if block.claim is not None:
        return problems_of_claim(block.claim)
    runnable = [line for line in block.commands() if not skipped(line)] if block.language == "bash" else ["python"]
    if "not-run" in block.tags:
        return [f"tagged not-run, but a test here runs {runnable}"] if runnable else []
    if not runnable:
        return ["every line is in SKIPPED_LINES: tag it ```bash not-run, or have a test run it (run-by=)"]
    return []


def problems_of_claim(claim: str) -> list[str]:
    """A claim holds when the named test or fixture reads the block with claimed_command("<claim>", ...) (or
    claimed_blocks)."""
    file, _, name = claim.partition("::")
    path = ROOT / file
    if not path.is_file() or not name:
        return [f"run-by={claim}: no such test file, or no ::NAME"]
    functions = [node for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)]
    function = next((node for node in functions if node.name == name), None)
    if function is None:
        return [f"run-by={claim}: {file} defines no function {name}"]
    calls = [
        node
        for node in ast.walk(function)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("claimed_command", "claimed_blocks")
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and node.args[0].value == claim
    ]
    return [] if calls else [f'run-by={claim}: {name} never calls claimed_command("{claim}", ...) or claimed_blocks']


def test_every_example_is_run_by_a_test() -> None:
    found = all_blocks()
    assert len(found) >= 10 and any(block.claim for block in found)
    problems = [f"{block.where}: {problem}" for block in found for problem in problems_of(block)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("```\ncurl localhost:6010/health\n```\n", "bare"),
        ("```sh\ncurl localhost:6010/health\n```\n", "write ```bash"),
        ("- a list item:\n\n  ```shell\n  curl localhost:6010/health\n  ```\n", "write ```bash"),
        ("```bash\nhf download x --local-dir y\n./start_all.sh\n```\n", "tag it"),
        ("```bash not-run\n./start_all.sh\ncurl localhost:6010/health\n```\n", "a test here runs"),
        ("```python not-run\nprint(1)\n```\n", "a test here runs"),
        ("```bash ray\nserve run x.yaml\n```\n", "one of"),
        ("```bash run-by=tests/test_cluster_serve.py::nothing_here\nserve run x.yaml\n```\n", "no function"),
        ("```bash run-by=tests/test_scripts.py::test_start_use_stop\nserve run x.yaml\n```\n", "never calls"),
    ],
)
def test_an_example_no_test_runs_is_found(tmp_path: Path, body: str, problem: str) -> None:
    page = tmp_path / "page.md"
    page.write_text("# A page\n\n" + body)
    (block,) = blocks(page)
    assert any(problem in found for found in problems_of(block)), problems_of(block)


def test_the_download_commands_are_the_services_own() -> None:
    """The download lines are not run (no weights are ever downloaded by the tests), so they must be exactly the
    commands the services print when a model cannot be found (tests/test_scripts.py sees that message), which
    tests/test_download_commands.py parses with the CLIs themselves. A line of a CLI the project does not install
    (huggingface-cli) is none of them."""
    from qwen3_embed import DOWNLOAD_HELP as TEXT_HELP
    from siglip2_embed import DOWNLOAD_HELP as IMAGE_HELP

    def normal(line: str) -> str:
        return " ".join(line.removeprefix("# or:").split())

    printed = {normal(line.strip()) for line in (IMAGE_HELP + "\n" + TEXT_HELP).splitlines()}
    lines = [line for block in all_blocks() for line in block.body.replace("\\\n", " ").splitlines()]
    downloads = [normal(line) for line in lines if re.search(r"\b(hf|huggingface-cli|modelscope) download\b", line)]
    assert len(downloads) >= 4
    assert set(downloads) <= printed, set(downloads) - printed


# ---------------------------------------------------------------------------------------------------------------
# Links
# ---------------------------------------------------------------------------------------------------------------
def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens, -1 for a repeat."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    found, repeats = set(), dict[str, int]()
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        found.add(f"{slug}-{repeats[slug]}" if slug in repeats else slug)
        repeats[slug] = repeats.get(slug, 0) + 1
    return found


def links(page: Path) -> list[str]:
    text = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", page.read_text(), flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_every_relative_link_resolves() -> None:
    assert len(PAGES) >= 5
    broken = []
    for page in PAGES:
        for link in links(page):
            if re.match(r"[a-z]+:", link):
                continue  # https:, mailto:
            file, _, anchor = link.partition("#")
            target = (page.parent / file).resolve() if file else page
            if not target.exists() or ROOT not in [target, *target.parents]:
                broken.append(f"{page.relative_to(ROOT)}: {link} (no such file in the repository)")
            elif anchor and target.suffix == ".md" and anchor not in anchors(target):
                broken.append(f"{page.relative_to(ROOT)}: {link} (no heading #{anchor} in {target.name})")
    assert not broken, "\n".join(broken)


def test_the_link_check_sees_a_broken_anchor(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Limits and hardening\n\n## API: image service (6010)\n\n## Logs\n\n## Logs\n\n[a](#limits) `[b](#c)`\n"
    )
    assert anchors(page) == {"limits-and-hardening", "api-image-service-6010", "logs", "logs-1"}
    assert links(page) == ["#limits"]


# ---------------------------------------------------------------------------------------------------------------
# Running the examples against ./start_all.sh --tiny
# ---------------------------------------------------------------------------------------------------------------
def as_run_here(text: str, image_port: int, text_port: int) -> str:
    text = re.sub(r"(localhost|127\.0\.0\.1|gpu-box):6010", rf"127.0.0.1:{image_port}", text)
    text = re.sub(r"(localhost|127\.0\.0\.1|gpu-box):6011", rf"127.0.0.1:{text_port}", text)
    return venv_words(text).replace("~/Pictures", ".")


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
    write_example_photos(folder)
    assert (folder / "cat.jpg").stat().st_size > 200_000  # as large as a real photo: base64 > 128 KiB
    return folder


INDEXER_WITHOUT_URL = re.compile(r"-m embed_client index (?!.*--url)")


def run_block(block: Block, ports: tuple[int, int], cwd: Path) -> subprocess.CompletedProcess[str]:
    if block.language == "python":
        command = [sys.executable, "-c", as_run_here(block.body, *ports)]
    else:
        lines = [line for line in block.commands() if not skipped(line)]
        # The indexer's default URL is the image service on port 6010: say it, so that the port is rewritten.
        lines = [INDEXER_WITHOUT_URL.sub(r"\g<0>--url http://127.0.0.1:6010 ", line) for line in lines]
        # --fail-with-body: an HTTP error fails the line (and shows the body) instead of printing it and going on.
        script = 'set -euo pipefail\ncurl() { command curl -sS --fail-with-body "$@"; }\n' + "\n".join(lines)
        command = ["bash", "-c", as_run_here(script, *ports)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EMBED_API_KEY": ""}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


PAGES_WITH_EXAMPLES = [page for page in PAGES if any(runs_here(block) for block in blocks(page))]


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES_WITH_EXAMPLES, ids=lambda page: str(page.relative_to(ROOT)))
def test_the_examples_of_a_page_work(services: tuple[int, int], photos: Path, page: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(photos, tmp_path / "photos")
    for block in filter(runs_here, blocks(page)):
        result = run_block(block, services, folder)
        shown = f"{block.where}\n{block.body}\n--- stdout\n{result.stdout[-2000:]}\n--- stderr\n{result.stderr[-3000:]}"
        assert result.returncode == 0, shown
        assert '"error"' not in result.stdout, shown
