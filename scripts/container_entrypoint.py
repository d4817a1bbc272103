"""The container image's entry point (PID 1):  IMAGE siglip2|qwen3 [--tiny] [service flags]. Run as
``python -m scripts.container_entrypoint`` from /app (the registry, common/services.py, is imported from there).

The service runs as a child of this process, which forwards the stop signals to it and exits with its status.
A process that is PID 1 ignores every signal it has no handler for, and the service installs its handlers only
when it starts serving: run as PID 1 itself, a ``docker stop`` during a model download would wait for the
SIGKILL. As a child it stops at once then, and once serving it drains the requests in flight on SIGTERM exactly as
under ./stop_all.sh. This process also reaps orphaned processes, as an init must.

``--tiny`` first builds the service's tiny random-weight model (common/tiny_models.py) under /tmp, as
./start_all.sh --tiny does: its vectors are meaningless, only good for trying the API. When no model is named, the
model's conventional folder under the models mount is used if it is there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

from common.services import SERVICES  # the registry: standard library only, no torch in PID 1

USAGE = "".join(
    f"{'usage:' if index == 0 else '      '} IMAGE {name} [--tiny] [flags]    port {service.port}\n"
    for index, (name, service) in enumerate(SERVICES.items())
) + (
    """
  --tiny       tiny random-weight models built at start-up: meaningless vectors, only for trying the API
  flags        the service's own flags; IMAGE siglip2 --help lists them and their environment variables
Models: mount their folder read-only at /models and name it (SIGLIP2_MODEL=/models/FOLDER, QWEN3_MODEL=...);
a hub id downloads into HF_HOME=/hf-cache (mount a volume there).
"""
)


APP = Path(__file__).resolve().parents[1]
TINY_DIR = Path("/tmp/tiny-models")
# The service's stop signals (common.server.STOP_SIGNALS; not imported: that would load torch into PID 1).
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

child: subprocess.Popen[bytes] | None = None
stopping = False


def forward(signum: int, _frame: FrameType | None) -> None:
    global stopping
    stopping = True
    if child is not None and child.returncode is None:
        child.send_signal(signum)


def run(argv: list[str], env: dict[str, str]) -> int:
    """Run ``argv`` as the current child until it exits, reaping any other process that ends meanwhile."""
    global child
    # its own session: a terminal's Ctrl-C (docker run -it) reaches it once, forwarded, not twice
    child = subprocess.Popen(argv, cwd=APP, env=env, start_new_session=True)
    if stopping:  # a stop signal came while the child was starting, when forward() had no child to pass it to
        child.send_signal(signal.SIGTERM)
    while True:
        pid, status = os.wait()  # any child: orphans reparented to PID 1 are reaped here too
        if pid == child.pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            return child.returncode if child.returncode >= 0 else 128 - child.returncode


def main(args: list[str]) -> int:
    if not args or args[0] not in SERVICES:
        sys.stderr.write(USAGE)
        return 0 if not args or args[0] in ("-h", "--help") else 2
    service = SERVICES[args[0]]
    program, model_variable, tiny_builder, mounted_name = (
        service.script,
        service.model_variable,
        service.tiny_builder,
        service.mounted_folder,
    )
    flags = [flag for flag in args[1:] if flag != "--tiny"]
    env = dict(os.environ)
    for signum in FORWARDED:
        signal.signal(signum, forward)
    if "--tiny" in args[1:]:
        tiny = TINY_DIR / args[0]
        if not tiny.is_dir():  # only this service's model: the start is shorter
            sys.stderr.write(f"building a tiny random-weight model in {tiny}...\n")
            build = f"import sys, pathlib, common.tiny_models as t; t.{tiny_builder}(pathlib.Path(sys.argv[1]))"
            status = run([sys.executable, "-c", build, str(tiny)], env)
            if status != 0 or stopping:
                return status or 1
        env[model_variable] = str(tiny)
    elif model_variable not in env:
        mounted = Path(env.get("EMBED_MODELS_MOUNT", "/models")) / mounted_name
        if mounted.is_dir():
            env[model_variable] = str(mounted)
    if stopping:
        return 0
    return run([sys.executable, program, *flags], env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
