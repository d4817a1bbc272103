"""Shared fixtures: tiny random-weight models built once per session, one torch thread for modules that hammer a
tiny model from many client threads, the logging set-up put back after every test, and ``scripts``: the shell
scripts run with a test's own ports and log directory, every service they started stopped afterwards. Helpers
that are not fixtures are in tests/helpers.py. ``image_client`` / ``text_client``: each service on its tiny model with
default settings, ready, once per module (a module that needs other settings defines its own)."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from transformers.utils import logging as transformers_logging

from common.tiny_models import build_tiny_qwen3, build_tiny_siglip, build_tiny_zimage
from qwen3_embed import Qwen3Settings
from qwen3_embed import build_app as build_text_app
from siglip2_embed import Siglip2Settings
from siglip2_embed import build_app as build_image_app
from tests.helpers import SERVICES, Scripts, free_port, ready_client, service_pids

# The suite computes in float32 on every CPU. --dtype auto picks bfloat16 on a CPU that computes it natively, and the
# tests compare vectors with float32 references at tight tolerances: the same suite must mean the same on every
# machine. Set before any service is built or started, so that every service and what it starts inherits it
# (start_all.sh, the live servers, Ray's workers; tests/containers.py passes it into containers).
# tests/test_dtype_choice.py tests auto's choice and the bfloat16 path on their own.
os.environ["EMBED_DTYPE"] = "float32"


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_siglip(tmp_path_factory.mktemp("models") / "siglip2-tiny")


@pytest.fixture(scope="session")
def tiny_zimage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_zimage(tmp_path_factory.mktemp("models") / "Z-Image-tiny")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen3(tmp_path_factory.mktemp("models") / "Qwen3-Embedding-tiny")


@pytest.fixture(scope="module")
def image_client(tiny_siglip: Path) -> Iterator[TestClient]:
    yield from ready_client(build_image_app(Siglip2Settings(model=str(tiny_siglip))))


@pytest.fixture(scope="module")
def text_client(tiny_zimage: Path) -> Iterator[TestClient]:
    yield from ready_client(build_text_app(Qwen3Settings(model=str(tiny_zimage))))


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """For a module's tests (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): tiny models under many
    client threads. OpenMP workers spinning against them on a 2-core machine make each matmul of a tiny model up to
    50x slower than one thread does."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- logging: a service's main() reconfigures it for the whole process ----------------------------------------------

# The loggers the services' configure_logging touches (besides every logger that exists already).
CONFIGURED_LOGGERS = ("", "uvicorn.access", "httpx", "urllib3", "PIL", "filelock", "transformers")


def _is_pytests(handler: logging.Handler) -> bool:
    """pytest's own capture handlers come and go with each test phase; they are pytest's to manage."""
    return type(handler).__module__.startswith("_pytest")


@dataclass
class _LoggerState:
    logger: logging.Logger
    level: int
    disabled: bool
    propagate: bool
    handlers: list[logging.Handler]

    @classmethod
    def of(cls, logger: logging.Logger) -> _LoggerState:
        handlers = [handler for handler in logger.handlers if not _is_pytests(handler)]
        return cls(logger, logger.level, logger.disabled, logger.propagate, handlers)

    def restore(self) -> None:
        logger = self.logger
        logger.setLevel(self.level)
        logger.disabled, logger.propagate = self.disabled, self.propagate
        for handler in [h for h in logger.handlers if not _is_pytests(h) and h not in self.handlers]:
            logger.removeHandler(handler)  # added by the test (a StreamHandler bound to its captured stderr)
            handler.close()
        for handler in self.handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)


def _all_loggers() -> list[logging.Logger]:
    named = [logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)]
    return [logging.getLogger(), *named, *(logging.getLogger(name) for name in CONFIGURED_LOGGERS if name)]


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Tests that call a service's ``main()`` in-process run its ``configure_logging``: it replaces the root logger's
    handlers with a StreamHandler bound to the stderr pytest captured for that test, sets levels, stops collecting
    the record fields its format does not use and turns off transformers' progress bars. Once that stderr is closed,
    every later log record would print "--- Logging error ---". Put the root logger, every logger that existed,
    the record fields and transformers' logging state back as they were."""
    loggers = {id(logger): _LoggerState.of(logger) for logger in _all_loggers()}
    progress_bar = transformers_logging.is_progress_bar_enabled()
    fields = logging.logThreads, logging.logProcesses, logging.logMultiprocessing, logging._srcfile
    yield
    logging.logThreads, logging.logProcesses, logging.logMultiprocessing, logging._srcfile = fields
    for state in loggers.values():
        state.restore()
    if progress_bar:
        transformers_logging.enable_progress_bar()
    else:
        transformers_logging.disable_progress_bar()


@pytest.fixture
def scripts(tmp_path: Path) -> Iterator[Scripts]:
    ports = {service: free_port() for service in SERVICES}
    runner = Scripts(tmp_path / "logs", ports)
    yield runner
    # Whatever happened above, leave no service behind: stop_all.sh, then SIGKILL what it missed (only ours).
    runner.run("stop_all.sh")
    for service, port in ports.items():
        for pid in service_pids(f"{service}_embed.py", port):
            os.kill(pid, signal.SIGKILL)
