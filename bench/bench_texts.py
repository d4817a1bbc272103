"""Text service throughput against the naive baseline, measured in the same run.

    python -m bench.bench_texts [--model tiny-zimage|qwen3-4b|PATH] [--clients 32] [--requests 640]

Short texts of 3-16 words, one per request, from ``--clients`` concurrent clients. The naive server runs Z-Image's
recipe as written: chat template, pad to 512, output_hidden_states, hidden_states[-2], one request per forward.
"""

from __future__ import annotations

import argparse
import random

import aiohttp

from bench.loadgen import compare_with_baseline, post_json
from bench.models import add_model_arguments, model_from_arguments

# A caption-like vocabulary (kept as one string on purpose).
_VOCABULARY = """a the cat dog sun sea tree red blue photo of on in and small old city river street night morning light
mountain forest bird flower book table window portrait children market bridge snow rain summer garden"""
WORDS = _VOCABULARY.split()


def short_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 16))) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, tiny="tiny-zimage", full_size="qwen3-4b")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=640)
    args = parser.parse_args()

    model_path = model_from_arguments(args)
    texts = short_texts(args.requests)

    async def one_text(session: aiohttp.ClientSession, index: int, url: str) -> int:
        return await post_json(session, f"{url}/embed/text", {"text": texts[index % len(texts)]})

    results = compare_with_baseline(
        "texts", "qwen3_embed.py", model_path, args.device, one_text, args.clients, args.requests, "texts", "texts"
    )
    model = args.random_weights or args.model
    lines = [f"model {model} on {args.device}; {args.clients} clients, one 3-16 word text per request", *results]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
