"""Logging set up once, in main: timestamps, level, logger name; to stderr, or to a size-capped rotating file."""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A long-lived box must not fill its disk: at most 6 files of 20 MB (the live one and 5 rotated ones).
LOG_FILE_BYTES = 20 * 1024 * 1024
LOG_FILE_BACKUPS = 5


def configure_logging(level: str, log_file: str | None = None) -> None:
    handler: logging.Handler
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=LOG_FILE_BYTES, backupCount=LOG_FILE_BACKUPS, encoding="utf-8"
        )
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # uvicorn's own access log would duplicate ours (ours has the request id and item count).
    logging.getLogger("uvicorn.access").disabled = True
    for noisy in ("httpx", "urllib3", "PIL", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars would fill the log files
    if log_file:
        # transformers logs to its own stderr handler; send its warnings to the (rotated) log file instead.
        transformers_logging.disable_default_handler()
        transformers_logging.enable_propagation()
