"""Logging set up once, in main: timestamps, level, logger name."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=FORMAT, force=True)
    # uvicorn's own access log would duplicate ours (ours has the request id and item count).
    logging.getLogger("uvicorn.access").disabled = True
    for noisy in ("httpx", "urllib3", "PIL", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars would fill the log files
