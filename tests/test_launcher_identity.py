"""start_all.sh never silently keeps a running service that is not what this start asks for (another model,
another recipe, tiny random weights), says "tiny" on every line about tiny services, prints its banner and
"Logs ... Stop" only when something runs, and points flags to environment variables."""

from __future__ import annotations

import pytest

from tests.helpers import Scripts

pytestmark = pytest.mark.slow


def test_a_running_tiny_service_is_not_kept_for_a_real_model_start(scripts: Scripts) -> None:
    tiny = scripts.run("start_all.sh", "--tiny", "siglip2")
    assert tiny.returncode == 0, tiny.stdout + tiny.stderr
    assert "TINY RANDOM WEIGHTS" in tiny.stdout  # the ready line says it, not only the banner
    pid = scripts.pid("siglip2")

    same = scripts.run("start_all.sh", "--tiny", "siglip2")
    assert same.returncode == 0, same.stdout + same.stderr
    assert "already running" in same.stdout and "TINY RANDOM WEIGHTS" in same.stdout

    # A real-model start (the default model) while the tiny service runs: told, not kept, non-zero exit.
    real = scripts.run("start_all.sh", "siglip2")
    assert real.returncode != 0
    assert "a different service is running" in real.stderr and "TINY RANDOM WEIGHTS" in real.stderr
    assert "./stop_all.sh siglip2" in real.stderr
    assert "MEANINGLESS" not in real.stdout and "Logs:" not in real.stdout  # nothing started, no banner
    assert scripts.pid("siglip2") == pid  # the running service was left alone


def test_another_recipe_is_not_kept(scripts: Scripts) -> None:
    started = scripts.run("start_all.sh", "--tiny", "qwen3")
    assert started.returncode == 0, started.stdout + started.stderr
    other = scripts.run("start_all.sh", "--tiny", "qwen3", env={"QWEN3_POOLING": "last"})
    assert other.returncode != 0
    assert "version=1.0+pooling=last" in other.stderr and "version=1.0 " in other.stderr


def test_flags_are_pointed_to_environment_variables(scripts: Scripts) -> None:
    result = scripts.run("start_all.sh", "--port", "7000")
    assert result.returncode == 2
    assert "SIGLIP2_PORT" in result.stderr and "environment" in result.stderr
    assert "unknown service" not in result.stderr
