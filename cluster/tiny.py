"""``--tiny`` of ``python -m cluster.front`` and ``python -m cluster.index_images``: the tiny random-weight models, to
try the commands without any weights. Their vectors are meaningless.

They are built once (a few seconds) for each version of their builder, under ``.cache/tiny-models/`` + the first 12
hex digits of the builder's SHA-256: the folder ``./start_all.sh --tiny`` builds and uses, so either reuses the
other's. The folders are on this machine: a Ray cluster's other nodes do not have them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "tiny-models"


def tiny_models() -> dict[str, Path]:
    """service name -> its tiny model's folder, built first if this version of the builder has none yet."""
    import common.tiny_models as builder  # torch and transformers: only when --tiny asks
    from common.services import SERVICES

    folder = CACHE / hashlib.sha256(Path(builder.__file__).read_bytes()).hexdigest()[:12]
    if not folder.is_dir():
        logger.info("building tiny random-weight models in %s (once)", folder)
        building = folder.with_name(f"{folder.name}.tmp.{os.getpid()}")
        builder.build_all(building)
        try:
            building.rename(folder)
        except OSError:  # another start built them meanwhile: theirs is the same
            shutil.rmtree(building)
    return {service.name: folder / service.tiny_folder for service in SERVICES.values()}


def tiny_banner(what: str) -> str:
    """The loud warning of ./start_all.sh --tiny, for ``what`` ("these applications run", "this import runs")."""
    line = "#" * 96
    return (
        f"\n{line}\n#  --tiny: {what} TINY RANDOM-WEIGHT MODELS. Their vectors are MEANINGLESS noise,\n"
        f"#  only good for trying the commands. Never index real data with them. Real models: see README.md.\n{line}"
    )
