"""Building and running the project's container image in tests, on a machine where no image registry is reachable.

The base image is made here: ``debootstrap`` a minimal Debian bookworm with python3, python3-venv and
ca-certificates, ``docker import`` it, and add what pip needs to reach the package index from this machine (its CA
bundle, its index URL if pip is configured with one). Both are cached, keyed on their recipe: as a docker image
tag, and the debootstrapped tree as a tarball in ~/.cache, so that a second run does not debootstrap again.

The CPU torch wheel lies on this machine's disk (in pip's find-links folder): it is served to the build as a
package index on 127.0.0.1 (the Dockerfile's TORCH_CPU_INDEX_URL), which spares a multi-GB download of the CUDA
build, and leaves no copy of the wheel in the image.

Networking here: dockerd runs with ``--bridge=none``; every build and container uses ``--network=host``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Set in CI (.ci/run): there, a machine without docker fails the container tests instead of skipping them.
REQUIRE_DOCKER = os.environ.get("EMBED_REQUIRE_DOCKER") == "1"
LABEL = "embed-container-test"  # on every container the tests start, so that none is left behind
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "embed-container-test"

DEBOOTSTRAP_ARGS = ["--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm"]
# What the base's tree holds besides the packages is left out of it: apt's downloads and lists.
TRIMMED = ["var/cache/apt/archives", "var/lib/apt/lists"]
PIP_LAYER = """\
FROM {base}
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DEFAULT_TIMEOUT=180 PIP_DISABLE_PIP_VERSION_CHECK=1{index}
"""
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def docker(
    *args: str, timeout: float = 600, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    # The legacy builder: dockerd here has no BuildKit client (buildx), and it honours --network=host as it is.
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, env=env, input=input)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def docker_missing() -> str | None:
    """Why the container tests cannot run here, or None."""
    if shutil.which("docker") is None:
        return "docker is not installed"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "the docker daemon does not answer"
    if info.returncode != 0:
        return f"the docker daemon does not answer: {info.stderr.strip()[-300:]}"
    return None


def image_exists(tag: str) -> bool:
    return image_id(tag) is not None


def image_id(tag: str) -> str | None:
    result = docker("image", "inspect", "--format", "{{.Id}}", tag, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:12]


def debian_mirror() -> str:
    """The Debian mirror apt is configured with (deb822 or one-line sources), else deb.debian.org."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        with contextlib.suppress(OSError):
            text = path.read_text()
            if path.suffix == ".sources":
                for stanza in text.split("\n\n"):
                    uris = re.search(r"^URIs:\s*(\S+)", stanza, re.MULTILINE)
                    if uris and re.search(r"^Suites:.*\bbookworm\b(?!-)", stanza, re.MULTILINE):
                        return uris.group(1)
            else:
                line = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", text, re.MULTILINE)
                if line:
                    return line.group(1)
    return "http://deb.debian.org/debian"


def bookworm_base() -> str:
    """The debootstrapped bookworm image's tag, made (or imported from the cached tarball) when missing."""
    key = digest(*DEBOOTSTRAP_ARGS, *TRIMMED)
    tag = f"embed-test-bookworm:{key}"
    if image_exists(tag):
        return tag
    tarball = CACHE / f"bookworm-{key}.tar"
    if not tarball.is_file():
        if shutil.which("debootstrap") is None:
            raise AssertionError("debootstrap is not installed (apt-get install debootstrap)")
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as work:
            tree = Path(work) / "rootfs"
            result = subprocess.run(
                ["debootstrap", *DEBOOTSTRAP_ARGS, str(tree), debian_mirror()],
                capture_output=True,
                text=True,
                timeout=1800,
            )
            assert result.returncode == 0, f"debootstrap failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            for trimmed in TRIMMED:
                for entry in (tree / trimmed).glob("*"):
                    if entry.is_file():
                        entry.unlink()
            partial_tar = Path(work) / "rootfs.tar"
            subprocess.run(["tar", "-C", str(tree), "-cf", str(partial_tar), "."], check=True, timeout=600)
            partial_tar.rename(tarball)
    docker("import", str(tarball), tag, timeout=600)
    return tag


def host_pip_setting(name: str) -> str | None:
    """A setting of this machine's pip (environment first, then its config files), e.g. "index-url"."""
    value = os.environ.get("PIP_" + name.upper().replace("-", "_"))
    if value:
        return value
    result = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", f"global.{name}"], capture_output=True, text=True, timeout=60
    )
    return result.stdout.strip() or None if result.returncode == 0 else None


def pip_ready_base() -> str:
    """The base the tests build the Dockerfile on: bookworm plus this machine's CA bundle and pip index."""
    base = bookworm_base()
    index_url = host_pip_setting("index-url")
    index = f" PIP_INDEX_URL={index_url}" if index_url and not index_url.startswith("file:") else ""
    dockerfile = PIP_LAYER.format(base=base, index=index)
    ca_bundle = HOST_CA_BUNDLE.read_bytes()
    tag = f"embed-test-base:{digest(dockerfile, ca_bundle)}"
    if image_exists(tag):
        return tag
    with tempfile.TemporaryDirectory() as context:
        (Path(context) / "Dockerfile").write_text(dockerfile)
        (Path(context) / "ca-certificates.crt").write_bytes(ca_bundle)
        docker("build", "--network=host", "-t", tag, context, timeout=600)
    return tag


def local_torch_wheel() -> Path | None:
    """The pinned torch's CPU wheel in pip's find-links folder of this machine, if it has one."""
    pin = re.search(r"^torch==(\S+)", (ROOT / "requirements.txt").read_text(), re.MULTILINE)
    links = host_pip_setting("find-links")
    if pin is None or not links:
        return None
    for folder in links.split():
        found = sorted(Path(folder.removeprefix("file://")).glob(f"torch-{pin.group(1)}+cpu-*.whl"))
        if found:
            return found[0]
    return None


@contextlib.contextmanager
def torch_cpu_index() -> Iterator[str | None]:
    """A package index on 127.0.0.1 that holds the local CPU torch wheel, for the build's TORCH_CPU_INDEX_URL; None
    (the Dockerfile's default index) when this machine has no such wheel. Its port is the same from run to run
    when free: a changed URL would change the build argument, and with it the dependency layer's cache key."""
    wheel = local_torch_wheel()
    if wheel is None:
        yield None
        return
    with tempfile.TemporaryDirectory() as index:
        (Path(index) / "torch").mkdir()
        target = Path(index) / "torch" / wheel.name
        try:
            os.link(wheel, target)
        except OSError:
            shutil.copyfile(wheel, target)
        handler = partial(QuietHandler, directory=index)
        try:
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 46010), handler)
        except OSError:
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/"
        finally:
            server.shutdown()
            server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def build_image(tag: str, base: str, index_url: str | None, context: Path = ROOT, no_cache: bool = False) -> float:
    """``docker build`` of the project's Dockerfile, CPU variant, on ``base``; returns the seconds it took."""
    args = ["--build-arg", f"BASE_IMAGE={base}", "--build-arg", "DEVICE=cpu", *(["--no-cache"] if no_cache else [])]
    if index_url:
        args += ["--build-arg", f"TORCH_CPU_INDEX_URL={index_url}"]
    before = image_id(tag)
    started = time.monotonic()
    docker("build", "--network=host", *args, "-t", tag, str(context), timeout=3600)
    took = time.monotonic() - started
    if before is not None and image_id(tag) != before:
        docker("image", "rm", before, check=False)  # the tag's last build: each would stay behind, untagged
    return took


def run_options(env: dict[str, str] | None, volumes: tuple[str, ...]) -> list[str]:
    """``docker run``'s options for a test's container: the host network, the tests' label, ``env`` and ``volumes``."""
    options = ["--network=host", "--label", LABEL]
    # The suite's dtype (tests/conftest.py pins it) in the container too: its vectors are compared with the host's.
    pinned = {"EMBED_DTYPE": os.environ["EMBED_DTYPE"]} if "EMBED_DTYPE" in os.environ else {}
    for name, value in {**pinned, **(env or {})}.items():
        options += ["-e", f"{name}={value}"]
    for volume in volumes:
        options += ["-v", volume]
    return options


def start_container(
    image: str,
    *args: str,
    env: dict[str, str] | None = None,
    volumes: tuple[str, ...] = (),
    options: tuple[str, ...] = (),
) -> str:
    """``docker run -d`` on the host network (and ``options``); returns the container's id."""
    named = ["--name", f"embed-test-{uuid.uuid4().hex[:8]}", *run_options(env, volumes), *options]
    return docker("run", "-d", *named, image, *args).stdout.strip()


def state(container: str) -> dict[str, object]:
    return json.loads(docker("inspect", "-f", "{{json .State}}", container).stdout)


def health_status(container: str) -> str:
    health = state(container).get("Health")
    return str(health["Status"]) if isinstance(health, dict) else "none"


def wait_healthy(container: str, timeout: float = 900) -> float:
    """Seconds from now until the container's Docker health status is "healthy"; fails when it exits first."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        current = state(container)
        if not current["Running"]:
            raise AssertionError(f"the container exited ({current['ExitCode']}):\n{logs(container)[-5000:]}")
        if health_status(container) == "healthy":
            return time.monotonic() - started
        time.sleep(0.5)
    raise AssertionError(f"not healthy after {timeout} s:\n{logs(container)[-5000:]}")


def logs(container: str) -> str:
    result = docker("logs", container, check=False)
    return result.stdout + result.stderr


def remove(container: str) -> None:
    docker("rm", "-f", container, check=False, timeout=120)
