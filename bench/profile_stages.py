"""Where a text service's CPU goes, by stage of the request path: py-spy's samples of the server process under
load (``--format raw``: one line per stack, with its count), each sample put in the stage of its deepest frame
that names one.

    py-spy record --pid PID --rate 100 --duration 60 --threads --nonblocking --format raw --output PROFILE.txt
    python -m bench.profile_stages PROFILE.txt [--cpu-ms 1.9]

Samples of threads waiting (a queue, a lock, the event loop's poll) are left out: py-spy counts some of them as
running. ``--cpu-ms``: the server CPU per request measured in the same run (``bench.bench_server_cpu``), to show
each stage in milliseconds per request as well as in shares.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

# (stage, frames that start it: a function's qualified name as py-spy prints it, up to the source file). The
# deepest frame of a stack that is listed decides its stage, so the inner work of a stage (logging inside the
# access-log middleware) is counted under its own stage, not the outer one's.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("access log line (logging)", ("Logger.info ",)),
    ("metrics (prometheus_client)", ("MetricWrapperBase.labels ", "Counter.inc ", "Histogram.observe ")),
    ("JSON out (orjson, the response object)", ("embedding_reply ", "FastJSONResponse.render ")),
    ("sending the response (send wrappers, uvicorn's write)", ("Response.__call__ ", "send_error ")),
    ("vectors: stack and normalise", ("stack_rows ",)),
    ("batcher hand-off (queue, futures, executor)", ("MicroBatcher.", "_Pending.")),
    ("model residency gate", ("Residency.",)),
    ("text checks", ("BatchedService.check_texts ",)),
    (
        "reading the body",
        ("Request.body ", "Request.stream ", "_BoundedRequest.receive ", "RequestResponseCycle.receive "),
    ),
    ("JSON in: parse and list-length guard", ("JSONBodyRequest.json ",)),
    ("validation (pydantic)", ("request_body_to_args ", "_validate_value_with_model_field ", "ModelField.validate ")),
    ("dependency resolution", ("solve_dependencies ",)),
    ("sync dependencies in the thread pool", ("run_in_threadpool ", "run_sync ", "WorkerThread.run ")),
    ("the route's own code", ("embed_text ",)),
    ("FastAPI's request handler", ("get_request_handler.", "request_response.", "JSONBodyRoute.")),
    ("routing", ("Router.__call__ ", "Router.app ", "APIRouter.", "_IncludedRouter.", "APIRoute.", "Route.matches ")),
    (
        "FastAPI's and Starlette's middleware layers, telemetry hooks",
        (
            "FastAPI.__call__ ",
            "Starlette.__call__ ",
            "ServerErrorMiddleware.",
            "ExceptionTelemetryMiddleware.",
            "AppBodyLimitMiddleware.",
            "ExceptionMiddleware.",
            "AsyncExitStackMiddleware.",
            "wrap_app_handling_exceptions.",
            "NativeTelemetry.",
            "ProxyHeadersMiddleware.",
        ),
    ),
    (
        "our middlewares (request id, body limits and watcher, guard)",
        ("AccessLog.", "RequestBody.", "RequestGuard.", "HTTPMiddleware."),
    ),
    ("uvicorn: HTTP parsing, connection and request cycle", ("HttpToolsProtocol.", "RequestResponseCycle.")),
]
MODEL_WORKER = "model worker (tokenizer, forward pass, pooling)"
EVENT_LOOP = "event loop (uvloop, task switches)"
OTHER_THREADS = "other threads"
# Leaf frames of a thread that waits: py-spy reports some of them as active.
WAITING = ("Condition.wait ", "Queue.get ", "select ", "Event.wait ", "Thread.join ")


def stage_of(frames: list[str], thread: str) -> str | None:
    """The stage of one sample (``frames`` root first), or None for a thread that waits."""
    if frames and frames[-1].startswith(WAITING):
        return None
    if thread.startswith("model"):
        return MODEL_WORKER
    for frame in reversed(frames):
        for stage, starts in STAGES:
            if frame.startswith(starts):
                return stage
    return EVENT_LOOP if thread == "MainThread" else OTHER_THREADS


def split(lines: list[str]) -> Counter[str]:
    samples: Counter[str] = Counter()
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack:
            continue
        first, *frames = stack.split(";")
        thread = first.rpartition(": ")[2]  # 'thread (0x7f..): MainThread' (py-spy's --threads)
        stage = stage_of(frames, thread)
        if stage is not None:
            samples[stage] += int(count)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profiles", type=Path, nargs="+", help="py-spy raw outputs, summed")
    parser.add_argument("--cpu-ms", type=float, help="measured server CPU ms per request")
    args = parser.parse_args()
    samples: Counter[str] = Counter()
    for profile in args.profiles:
        samples += split(profile.read_text().splitlines())
    total = sum(samples.values())
    print(f"{total} samples of running threads")
    for stage, count in samples.most_common():
        ms = f"  {count / total * args.cpu_ms:6.3f} ms" if args.cpu_ms else ""
        print(f"{count / total:6.1%}{ms}  {stage}")


if __name__ == "__main__":
    main()
