"""The container's PID 1 (scripts/container_entrypoint.py) on the host, without docker: a stop signal is never lost,
whenever it arrives."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A stop signal that arrived while the child was being started (forward() saw no child to pass it to yet), then a
# child that would sleep for a minute. In a process of its own: run() reaps every child of the process it runs in.
SIGNAL_BEFORE_THE_CHILD = """
import os, sys
import scripts.container_entrypoint as entrypoint
entrypoint.stopping = True
sys.exit(entrypoint.run([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ)))
"""


def test_a_stop_signal_that_came_while_the_child_started_still_stops_it() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SIGNAL_BEFORE_THE_CHILD], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 128 + 15, result.stderr  # the child ended by SIGTERM, as docker stop sends it
