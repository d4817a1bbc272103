"""The command line, ``python -m embed_client index PHOTO_DIR --out vectors.parquet``: arguments, the summary it
prints, and its exit codes (0 done, 1 refused (wrong service, output of another model, output locked, API key) or
service error or unreachable, 2 bad arguments, 130 interrupted). ``python -m embed_client sleep|wake --url URL
[--hold]`` frees a service's GPU for another program and gives it back (0 done, 1 service error or unreachable)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from embed_client.arguments import positive_int
from embed_client.client import EmbedClient, EmbedClientError, ServiceError, WrongService
from embed_client.indexer import IndexRefused, IndexSummary, index_folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m embed_client", description="Client tools for the services.")
    commands = parser.add_subparsers(dest="command", required=True)
    index = commands.add_parser(
        "index",
        help="embed every image in a folder tree into a parquet file (resumable)",
        description="Embed every image under PHOTO_DIR through the image service into a parquet file with columns "
        "path, size, mtime, model, version, vector, path_bytes, fingerprint. Reruns embed only new or changed files; "
        "an interrupted run resumes from its checkpoints (OUT.parts/). One run per output at a time (OUT.lock).",
    )
    index.add_argument("photo_dir", type=Path, metavar="PHOTO_DIR")
    index.add_argument("--out", type=Path, required=True, help="the parquet file to write (e.g. vectors.parquet)")
    index.add_argument("--url", default="http://127.0.0.1:6010", help="image service (default %(default)s)")
    index.add_argument("--api-key", default=None, help="Bearer key; default: the EMBED_API_KEY environment variable")
    index.add_argument("--concurrency", type=positive_int, default=4, help="requests in flight (default 4)")
    index.add_argument("--chunk-size", type=positive_int, default=None, help="images per request (default: server)")
    index.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    index.add_argument(
        "--retries",
        type=int,
        default=5,
        help="retries on 429/502/503/504/connection errors (default 5; a 500 at most twice)",
    )
    index.add_argument("--wait", type=float, default=300.0, help="seconds to wait for a loading model (default 300)")
    index.add_argument(
        "--reindex",
        action="store_true",
        help="embed every image again and replace OUT (needed when OUT holds vectors of other weights, version or "
        "dimension than the service's)",
    )
    index.add_argument(
        "--follow-links",
        action="store_true",
        help="follow links to files and folders out of PHOTO_DIR (default: list them, do not read them)",
    )
    index.add_argument("--no-progress", action="store_true", help="no progress bar")
    for name, summary in (
        ("sleep", "free the service's model memory now (GPU or RAM); the next request wakes it, unless --hold"),
        ("wake", "bring the model back now and end a hold; returns once it serves"),
    ):
        command = commands.add_parser(name, help=summary, description=summary)
        command.add_argument("--url", default="http://127.0.0.1:6010", help="the service (default %(default)s)")
        command.add_argument("--api-key", default=None, help="Bearer key; default: the EMBED_API_KEY variable")
        command.add_argument(
            "--admin-key",
            default=None,
            help="the service's admin key, where it has one; default: EMBED_ADMIN_KEY (or the file "
            "EMBED_ADMIN_KEY_FILE names), else the API key",
        )
        command.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default 300)")
        if name == "sleep":
            command.add_argument(
                "--hold",
                action="store_true",
                help="keep it asleep: embedding requests get 503 'asleep' (clients wait) until 'wake'",
            )
    return parser


def key_from_environment(name: str) -> str | None:
    """The variable ``name``, or the content of the file ``name_FILE`` names (a Docker or compose secret)."""
    if os.environ.get(name):
        return os.environ[name]
    path = os.environ.get(f"{name}_FILE")
    if not path:
        return None
    return Path(path).read_text(encoding="utf-8").strip() or None


def _sleep_or_wake(args: argparse.Namespace) -> int:
    api_key = args.api_key or key_from_environment("EMBED_API_KEY")
    admin_key = args.admin_key or key_from_environment("EMBED_ADMIN_KEY")
    with EmbedClient(args.url, api_key=api_key, timeout=args.timeout, admin_key=admin_key) as client:
        try:
            done = client.sleep(hold=args.hold) if args.command == "sleep" else client.wake()
        except EmbedClientError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return 1
    sys.stdout.write(f"{args.url}: {done['state']} ({done['seconds']:.2f} s)\n")
    return 0


def _report(summary: IndexSummary, out: Path) -> None:
    replaced = f", {summary.replaced} rows of the old output replaced" if summary.replaced else ""
    sys.stdout.write(
        f"{out}: {summary.embedded} embedded, {summary.skipped} already indexed, {summary.removed} stale rows "
        f"dropped{replaced}, {len(summary.failed)} not indexed ({summary.files} images found)\n"
    )
    if summary.failed:
        sys.stdout.write("not indexed (not in the output; tried again on the next run):\n")
        for path, message in summary.failed:
            sys.stdout.write(f"  {one_line(path)}: {one_line(message)}\n")


def one_line(text: str) -> str:
    """``text`` on one line of a terminal: a file name may hold a line break (or an escape sequence) and must not
    start a line of the report of its own, nor recolour the terminal. Control characters are written escaped
    (``\n``, ``\x1b``), as Python writes them in a string; a backslash stays as it is."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _warn(message: str) -> None:
    sys.stderr.write(f"WARNING: {message}\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command in ("sleep", "wake"):
        return _sleep_or_wake(args)
    if not args.photo_dir.is_dir():
        sys.stderr.write(f"error: {args.photo_dir} is not a folder\n")
        return 2
    api_key = args.api_key or key_from_environment("EMBED_API_KEY")
    with EmbedClient(args.url, api_key=api_key, timeout=args.timeout, max_retries=args.retries) as client:
        try:
            client.wait_until_ready(timeout=args.wait)
        except EmbedClientError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return 1
        try:
            summary = index_folder(
                args.photo_dir,
                args.out,
                client,
                concurrency=args.concurrency,
                chunk_size=args.chunk_size,
                progress=not args.no_progress,
                reindex=args.reindex,
                follow_links=args.follow_links,
                warn=_warn,
            )
        except KeyboardInterrupt:
            sys.stderr.write("interrupted: finished images are checkpointed; run the same command to resume\n")
            return 130
        except (WrongService, IndexRefused) as exc:  # refused before anything was written: nothing to resume
            sys.stderr.write(f"error: {exc}\n")
            return 1
        except ServiceError as exc:
            if exc.status not in (401, 403):
                sys.stderr.write(f"error: {exc}\n(finished images are checkpointed; rerun the command to resume)\n")
                return 1
            sys.stderr.write(
                f"error: {args.url} refused the API key (HTTP {exc.status}: {exc.message}); "
                "check --api-key (or EMBED_API_KEY)\n"
            )
            return 1
        except EmbedClientError as exc:
            sys.stderr.write(f"error: {exc}\n(finished images are checkpointed; rerun the command to resume)\n")
            return 1
    _report(summary, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
