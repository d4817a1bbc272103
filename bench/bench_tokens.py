"""What lending the encoder costs per prompt: ``/embed/tokens`` (the per-token states a Z-Image pipeline takes)
against ``/embed/texts`` (the pooled vector) on the same prompts, through the real service, in one run.

    python -m bench.bench_tokens [--model qwen3-4layers|qwen3-4b|tiny-zimage|PATH] [--rounds 20]

For a typical prompt (about 60 tokens with the chat template) and one of 512 tokens: the answer's bytes, the request's
latency (median of ``--rounds``, one request at a time, interleaved) and the client's decode time (the safetensors
answer into float32 arrays, ``EmbedClient.embed_tokens``'s reading). The JSON form is measured beside them.
``qwen3-4layers`` (the default) is Qwen3-4B's width (2560) with 4 of its 36 layers: the bytes are the real ones, the
forward pass a ninth of the real model's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import httpx

from bench.loadgen import free_port, server_process
from bench.models import add_model_arguments, model_from_arguments
from embed_client.token_states import read_token_states

# About 60 tokens with the template under the benchmark models' small tokenizer (a real Qwen3 tokenizer makes
# fewer of a longer prompt): a Z-Image prompt of one sentence.
TYPICAL = "A red fox sitting in the snow at dawn, golden light"
LONG = "a " * 600  # past 512 tokens with the template: truncated at 512


T = TypeVar("T")


def timed(call: Callable[[], T], rounds: int) -> tuple[float, T]:
    """The median seconds of ``rounds`` calls, and the last call's result."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, tiny="qwen3-4layers", full_size="qwen3-4b")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    model = model_from_arguments(args)
    port = free_port()
    log = model.parent / "bench_tokens.log"
    command = ["qwen3_embed.py", "--model", str(model), "--port", str(port), "--device", args.device]
    print(f"model {args.random_weights or args.model} on {args.device}, median of {args.rounds} requests each")
    print("| prompt | route | answer bytes | latency | client decode |")
    print("|---|---|---|---|---|")
    with server_process(command, port, log) as url, httpx.Client(timeout=600) as client:
        for name, text in (("typical", TYPICAL), ("512 tokens", LONG)):
            routes = {
                "/embed/texts": ("/embed/texts", {"texts": [text]}),
                "/embed/tokens": ("/embed/tokens", {"texts": [text]}),
                "/embed/tokens json": ("/embed/tokens", {"texts": [text], "format": "json"}),
            }
            results: dict[str, tuple[float, httpx.Response]] = {}
            for _ in range(2):  # warm up every route
                for path, body in routes.values():
                    client.post(url + path, json=body).raise_for_status()
            for label, (path, body) in routes.items():
                results[label] = timed(partial(client.post, url + path, json=body), args.rounds)
            tokens = read_token_states(results["/embed/tokens"][1].content).states[0].shape[0]
            for label, (seconds, response) in results.items():
                content = response.content
                decode = "-"
                if label == "/embed/tokens":
                    decode_s, _ = timed(partial(read_token_states, content), args.rounds)
                    decode = f"{decode_s * 1000:.2f} ms"
                elif label.endswith("json"):
                    decode_s, _ = timed(response.json, args.rounds)
                    decode = f"{decode_s * 1000:.2f} ms"
                print(f"| {name} ({tokens} tokens) | {label} | {len(content):,} | {seconds * 1000:.1f} ms | {decode} |")


if __name__ == "__main__":
    main()
