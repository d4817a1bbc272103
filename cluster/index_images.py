"""Bulk import on Ray Data: every image under SOURCE into a Parquet dataset of unit vectors, equal to what the image
service's ``POST /embed/image`` returns for each file, on a local Ray or on a running cluster.

    python -m cluster.index_images SOURCE --out OUT_DIR [--model PATH_OR_ID | --tiny] [--address auto|ray://HOST:10001]
        [--actors N] [--gpus-per-actor F] [--batch-size B] [--reindex]

SOURCE is a local folder or any URI pyarrow reads (s3://bucket/photos, gs://..., file:///...). A local folder is
walked and its files read by the standalone indexer's own code (embed_client/files.py). OUT_DIR becomes a Parquet
dataset of the vectors alone (the standalone indexer's columns); ``OUT_DIR.failures.parquet`` beside it lists each
file that could not be embedded and why; cluster/store.py describes the layout and why reruns and kills are safe.
Files already in OUT_DIR with the same path, size and mtime, made by the same weights and version, are skipped;
vectors of other weights in OUT_DIR make the job refuse to start; ``--reindex`` embeds everything again.

Ray prints its own progress. The last line on stdout is one JSON object:
``{"embedded": N, "skipped": N, "failed": N, "removed": N, "seconds": S, "out": "OUT_DIR", "failures": "FILE"}``.
Exit codes: 0 done (even with failed files), 1 the job failed (what finished is kept: rerun to carry on), or the
model cannot be loaded (no such model, ...: its message, nothing to rerun), or another run holds OUT_DIR or it
holds vectors of other weights, 2 bad
arguments (SOURCE no folder, OUT_DIR a file or not a folder that can be made, a bad value of a setting), 130
interrupted. ``--tiny`` runs the import on a tiny random-weight SigLIP (meaningless vectors). Without ``--address``
(or RAY_ADDRESS) the job starts a Ray of its own, every server of it on loopback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import ray
from pydantic import ValidationError

from cluster.permanent import permanent_reason
from cluster.pipeline import PoolOptions, dataset_location, embedding_dataset, read_image_spec
from cluster.ray_private import local_ray_on_loopback
from cluster.source import BadLocation, Source, SourceFile, list_images, open_source
from cluster.store import OutputStore, output_lock
from cluster.tiny import tiny_banner, tiny_models
from embed_client.arguments import non_negative_float, positive_int
from embed_client.files import too_large_reason
from embed_client.indexer import IndexRefused
from siglip2_embed import EMBEDDING_VERSION, Siglip2Settings, model_identity

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("cluster.index_images")


@dataclass
class Summary:
    embedded: int  # vectors written in this run
    skipped: int  # files already in the output, unchanged
    failed: int  # what could not be embedded (listed in the failures file), and what the listing did not take
    removed: int  # rows of the previous output that the new one no longer has (file deleted, or changed and failed)
    seconds: float
    out: str  # OUT_DIR as an absolute path, or the URI
    failures: str  # the failures file, in the same terms
    # Where the time went, in seconds from the start (logged, and read by the benchmark; not in the JSON line).
    phases: dict[str, float] = field(default_factory=dict)

    def json_line(self) -> str:
        keys = ("embedded", "skipped", "failed", "removed", "seconds", "out", "failures")
        return json.dumps({key: getattr(self, key) for key in keys})


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` (or RAY_ADDRESS), or start a local Ray for this job when there is none.
    On a cluster the repository is shipped as the job's working_dir (Ray skips what .gitignore lists), so every node
    imports this code; each node still needs the packages of requirements.txt and requirements-cluster.txt."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # "local": always a new Ray of this job's own, even if `ray start` left one running on this machine.
        started = time.monotonic()
        # No dashboard: it would live only as long as this job, and its dozen processes slow the job's start.
        with local_ray_on_loopback():
            ray.init(address="local", include_dashboard=False)
        logger.info(
            "started a local Ray at %s in %.1f s",
            ray.get_runtime_context().gcs_address,
            time.monotonic() - started,
        )
        return
    ray.init(address=address, runtime_env={"working_dir": str(ROOT), "excludes": [".git", "tests", "bench"]})


def pool_options(
    actors: int | None, gpus_per_actor: float | None, cpus_per_actor: float, batch_size: int
) -> PoolOptions:
    """Unset values from the cluster: one actor per GPU when there are GPUs, else one CPU actor."""
    gpus = float(ray.cluster_resources().get("GPU", 0))
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if gpus else 0.0
    if actors is None:
        actors = max(1, int(gpus // gpus_per_actor)) if gpus_per_actor else 1
    return PoolOptions(actors, gpus_per_actor, cpus_per_actor, batch_size)


def run(
    source_uri: str,
    out: str,
    settings: Siglip2Settings,
    *,
    reindex: bool = False,
    address: str | None = None,
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    cpus_per_actor: float = 1.0,
    batch_size: int = 32,
) -> Summary:
    """One bulk import. Ray is joined or started only when there is something to embed; a Ray that is already
    initialised (a test, a notebook) is used as it is."""
    started = time.monotonic()
    phases: dict[str, float] = {}

    def reached(phase: str) -> None:
        phases[phase] = round(time.monotonic() - started, 3)

    source = open_source(source_uri)
    with output_lock(out):
        model, fingerprint = model_identity(settings)
        store = OutputStore(out, model, EMBEDDING_VERSION, fingerprint)
        listing = list_images(source)
        files = listing.files
        plan = store.plan(files, reindex, listing.unreadable_folders)
        todo, failures = _within_size_limit(plan.todo, settings.max_image_bytes)
        reached("listed")
        logger.info(
            "%d images under %s: %d to embed, %d already indexed", len(files), source_uri, len(todo), plan.skipped
        )
        embedded = 0
        if todo:
            _join_ray(address, source)
            reached("ray ready")
            pool = pool_options(actors, gpus_per_actor, cpus_per_actor, batch_size)
            embedded, more_failures = _embed(source, todo, settings, pool, store, reached)
            failures += more_failures
        store.write_failures(failures, listing.problems)
        kept = store.compact(files, listing.unreadable_folders)
        reached("compacted")
        removed = len(plan.indexed_paths) - int(pc.sum(pc.is_in(plan.indexed_paths, value_set=kept)).as_py() or 0)
        logger.info("phases (seconds from the start): %s", phases)
        failed = len(failures) + len(listing.problems)
        return Summary(
            embedded,
            plan.skipped,
            failed,
            removed,
            phases["compacted"],
            store.location,
            store.failures_location,
            phases,
        )


def _within_size_limit(todo: list[SourceFile], limit: int) -> tuple[list[SourceFile], list[tuple[SourceFile, str]]]:
    """The files to read, and those over the size limit with why: judged by their listed size, never read (the reader
    checks again on the open file), as the standalone indexer does."""
    return [f for f in todo if f.size <= limit], [(f, too_large_reason(f.size, limit)) for f in todo if f.size > limit]


def _join_ray(address: str | None, source: Source) -> None:
    connect(address)
    if source.is_local_folder and len([node for node in ray.nodes() if node["Alive"]]) > 1:
        logger.warning(
            "SOURCE %s is a local folder and the cluster has several nodes: every node must see it at the same path "
            "(a network file system), or the job fails; object storage (s3://...) needs no such care",
            source.uri,
        )


def _embed(
    source: Source,
    todo: list[SourceFile],
    settings: Siglip2Settings,
    pool: PoolOptions,
    store: OutputStore,
    reached: Callable[[str], None],
) -> tuple[int, list[tuple[SourceFile, str]]]:
    """Run the Ray Data pipeline; every block that arrives becomes a part at once. Returns (embedded, failures)."""
    if Path(settings.model).expanduser().is_dir():
        spec = read_image_spec(settings)  # the folder is here: no task (a fresh worker) needed
    else:
        spec = ray.get(ray.remote(read_image_spec).remote(settings))  # downloaded on a node, not on the driver
    reached("image spec read")
    by_location = {dataset_location(source, f): f for f in todo}
    seen: set[SourceFile] = set()
    embedded = 0
    failures: list[tuple[SourceFile, str]] = []
    dataset = embedding_dataset(source, todo, settings, spec, pool)
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        if not seen:
            reached("first vectors")  # after the actors loaded the model
        files = [by_location[location] for location in batch["path"]]
        seen.update(files)
        ok = batch["error"] == ""
        store.write_rows([f for f, good in zip(files, ok, strict=True) if good], batch["vector"][ok])
        embedded += int(ok.sum())
        failures += [(f, str(error)) for f, error in zip(files, batch["error"], strict=True) if error]
    reached("embedded")
    logger.debug("Ray Data's statistics:\n%s", dataset.stats())
    # Ray's reader skips objects deleted since the listing (ignore_missing_paths); local files are rows of their own.
    failures += [(f, "the file was deleted before it was read") for f in todo if f not in seen]
    return embedded, failures


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.index_images",
        description="Embed every image under SOURCE (a folder or a URI such as s3://bucket/photos) into OUT_DIR "
        "with Ray Data: OUT_DIR becomes a Parquet dataset of the vectors (path, size, mtime, model, version, vector, "
        "path_bytes, fingerprint); OUT_DIR.failures.parquet beside it lists what could not be embedded and why. Reruns "
        "embed only new or changed files. Model options not given here come from the image service's environment "
        "variables (SIGLIP2_MODEL, EMBED_DEVICE, EMBED_DTYPE, ...).",
    )
    parser.add_argument("source", metavar="SOURCE", help="a local folder or a URI pyarrow reads")
    parser.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder (or URI)")
    models = parser.add_mutually_exclusive_group()
    models.add_argument("--model", help="SigLIP checkpoint folder or hub id (default: as the image service)")
    models.add_argument(
        "--tiny",
        action="store_true",
        help="a tiny random-weight SigLIP (built once under .cache/tiny-models/, as ./start_all.sh --tiny): "
        "MEANINGLESS vectors, only for trying the command",
    )
    parser.add_argument("--device", choices=["auto", "cuda", "cpu", "mps"], help="default auto")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], help="default auto")
    parser.add_argument("--max-image-pixels", type=positive_int, help="as the service's flag")
    parser.add_argument("--max-image-bytes", type=positive_int, help="as the service's flag")
    parser.add_argument("--jpeg-draft", action=argparse.BooleanOptionalAction, default=None, help="default on")
    parser.add_argument(
        "--address",
        help="a running Ray cluster: auto, HOST:6379 or ray://HOST:10001 (default RAY_ADDRESS, else a "
        "local Ray started for this job)",
    )
    parser.add_argument("--actors", type=positive_int, help="encoder actors (default: one per GPU, else 1)")
    parser.add_argument("--gpus-per-actor", type=non_negative_float, help="default 1 with GPUs, else 0")
    parser.add_argument(
        "--cpus-per-actor", type=non_negative_float, default=1.0, help="CPU reserved per actor (default 1)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--reindex", action="store_true", help="embed every file again")
    return parser


def settings_from(args: argparse.Namespace) -> Siglip2Settings:
    """The image service's settings: flags given here, then its environment variables, then its defaults."""
    names = ("model", "device", "dtype", "max_image_pixels", "max_image_bytes", "jpeg_draft")
    given: dict[str, Any] = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.tiny:
        given["model"] = str(tiny_models()["siglip2"])
    return Siglip2Settings(**given)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from(args)
    except ValidationError as exc:  # a value of an environment variable (the flags are checked by argparse)
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        sys.stderr.write(f"error: invalid setting: {problems}\n")
        return 2
    if args.tiny:
        logger.warning("%s", tiny_banner("this import runs"))
    # A caller that is already connected to Ray (a notebook, a driver of its own) keeps its connection: the job
    # disconnects, or stops its local Ray, only when it made them.
    callers_ray = ray.is_initialized()
    try:
        summary = run(
            args.source,
            args.out,
            settings,
            reindex=args.reindex,
            address=args.address,
            actors=args.actors,
            gpus_per_actor=args.gpus_per_actor,
            cpus_per_actor=args.cpus_per_actor,
            batch_size=args.batch_size,
        )
    except BadLocation as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except IndexRefused as exc:  # another run writes OUT_DIR, or it holds vectors of other weights
        sys.stderr.write(f"error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: finished blocks are kept; run the same command to carry on\n")
        return 130
    except Exception as exc:
        reason = permanent_reason(exc)
        if reason is None:
            logger.exception("the job failed; finished blocks are kept: run the same command to carry on")
        else:  # the same on every run (no such model, ...): its own message, and no advice to run it again
            sys.stderr.write(f"error: {reason}\n")
        return 1
    finally:
        # Before the summary: nothing Ray forwards from its workers can print after it.
        if not callers_ray:
            ray.shutdown()
    if args.tiny:
        logger.warning("%s", tiny_banner("this import ran on"))
    sys.stdout.write(summary.json_line() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
