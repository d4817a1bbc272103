"""Text service throughput against the naive baseline, measured in the same run.

    python -m bench.bench_texts [--model tiny-zimage|qwen3-4b|PATH] [--clients 32] [--requests 640]

Short texts of 3-16 words, one per request, from ``--clients`` concurrent clients. The naive server runs Z-Image's
recipe as written: chat template, pad to 512, output_hidden_states, hidden_states[-2], one request per forward.
"""

from __future__ import annotations

import argparse
import random
from functools import partial
from pathlib import Path

import aiohttp

from bench.loadgen import ROOT, free_port, post_json, run_load, server_process
from bench.models import bench_model

OUT = ROOT / "bench" / "out"
# A caption-like vocabulary (kept as one string on purpose).
_VOCABULARY = """a the cat dog sun sea tree red blue photo of on in and small old city river street night morning light
mountain forest bird flower book table window portrait children market bridge snow rain summer garden"""
WORDS = _VOCABULARY.split()


def short_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 16))) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-zimage", help="tiny-zimage, qwen3-4b (random weights), or a folder")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=640)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    model_path = Path(args.model) if Path(args.model).is_dir() else bench_model(args.model, OUT / "models", args.device)
    texts = short_texts(args.requests)

    async def one_text(session: aiohttp.ClientSession, index: int, url: str) -> int:
        return await post_json(session, f"{url}/embed/text", {"text": texts[index % len(texts)]})

    servers = {
        "naive baseline": ["-m", "bench.naive_servers", "texts", "--model", str(model_path), "--device", args.device],
        "qwen3_embed.py": [
            "qwen3_embed.py",
            "--model",
            str(model_path),
            "--device",
            args.device,
            "--log-level",
            "warning",
        ],
    }
    results = []
    for name, command in servers.items():
        port = free_port()
        with server_process([*command, "--port", str(port)], port, OUT / f"{name.split()[0]}-texts.log") as url:
            results.append(run_load(name, partial(one_text, url=url), args.clients, args.requests))
    lines = [f"model {args.model} on {args.device}; {args.clients} clients, one 3-16 word text per request"]
    lines += [result.line("texts") for result in results]
    lines.append(f"ratio {results[1].rate / results[0].rate:.2f}x the naive baseline's texts/s")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
