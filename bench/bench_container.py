"""The CPU container image's costs: its size, a cold build, a rebuild after a code-only change (the dependency layer
must come from the cache), and the start of ``IMAGE siglip2 --tiny`` / ``qwen3 --tiny`` to Docker's "healthy".

    python -m bench.bench_container [--skip-cold]

Needs a docker daemon; builds on the tests' debootstrapped base (tests/containers.py) with the local CPU torch
wheel, on the host network, as the container tests do. The code-only change is a comment appended to a copy of
common/loading.py in a copy of the build context.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from tests import containers
from tests.helpers import free_port

TAG = "embed-bench:cpu"


def image_mb(tag: str) -> float:
    return int(containers.docker("image", "inspect", "-f", "{{.Size}}", tag).stdout) / 1e6


def start_to_healthy(service: str) -> float:
    port_variable = "SIGLIP2_PORT" if service == "siglip2" else "QWEN3_PORT"
    container = containers.start_container(TAG, service, "--tiny", env={port_variable: str(free_port())})
    try:
        return containers.wait_healthy(container)
    finally:
        containers.remove(container)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-cold", action="store_true", help="only the warm rebuild and the start")
    args = parser.parse_args()
    base = containers.pip_ready_base()
    figures: dict[str, float] = {}
    with containers.torch_cpu_index() as index_url, tempfile.TemporaryDirectory() as work:
        if not args.skip_cold:
            containers.docker("rmi", "-f", TAG, check=False)
            # --no-cache: every layer is built, none taken from the cache (the base image is kept)
            figures["cold_build_s"] = containers.build_image(TAG, base, index_url, no_cache=True)
        context = Path(work) / "context"
        shutil.copytree(containers.ROOT, context, ignore=shutil.ignore_patterns(".venv", ".git", ".cache", "logs"))
        figures["same_code_rebuild_s"] = containers.build_image(TAG, base, index_url, context)
        with (context / "common" / "loading.py").open("a") as code:
            code.write("# a code-only change\n")
        figures["code_change_rebuild_s"] = containers.build_image(TAG, base, index_url, context)
    figures["image_mb"] = image_mb(TAG)
    figures["venv_layer_mb"] = venv_layer_mb(TAG)
    for service in ("siglip2", "qwen3"):
        figures[f"{service}_tiny_start_to_healthy_s"] = start_to_healthy(service)
    print(json.dumps({name: round(value, 1) for name, value in figures.items()}, indent=2))


def venv_layer_mb(tag: str) -> float:
    """The largest layer: the virtualenv copied from the builder stage."""
    history = containers.docker("history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", tag).stdout
    for line in history.splitlines():
        size, created_by = line.split("\t", 1)
        if "COPY" in created_by and created_by.rstrip().endswith("/opt/venv"):
            number, unit = float(size[:-2]), size[-2:]
            return number * {"GB": 1000.0, "MB": 1.0, "kB": 0.001}[unit]
    return float("nan")


if __name__ == "__main__":
    main()
