"""Does the Qwen3 recipe's mean pooling suffer from the chat template's tokens? A reference computation.

    python -m bench.pooling_reference [--model PATH] [--massive 0,100,1000]

The default vector averages hidden_states[-2] over every token of ``<|im_start|>user\\n{text}<|im_end|>\\n
<|im_start|>assistant\\n``. Two facts decide whether the template tokens matter:

1. Structural (any weights): with causal attention the tokens before the text (``<|im_start|>``, ``user``, ``\\n``)
   see nothing of it, so their hidden states are the same vector for every text: a constant added to every mean
   with weight (prefix tokens) / (all tokens), larger for short texts. Printed as the largest difference between
   the prefix states of different texts (0 up to float noise).
2. Trained weights only: real LLMs put "massive activations" (hundreds to thousands of times the median, in a few
   fixed channels) on the first token and on delimiters. In the mean, that constant would dominate every vector and
   squeeze every cosine towards 1. Random weights have none, so this script can only simulate it: ``--massive``
   adds a value of that size to two channels of the first token, and prints how the cosines between unrelated
   texts then bunch up, with every token pooled against the text's own tokens only. Run it with ``--model`` on the
   real checkpoint (``--massive 0``) to see what the real weights do.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwen3_embed import Qwen3Encoder

TEXTS = [
    "a photo of a cat",
    "a red tree by the sea at sunset, oil painting, warm light",
    "dog",
    "the blue sun over a city of glass towers, night, rain, reflections on the street",
    "一只猫在晒太阳",
    "a cat on a tree",
]


def hidden_states(encoder: Qwen3Encoder, text: str) -> tuple[np.ndarray, int, int]:
    """The hidden states the recipe pools for one text, and how many tokens come before and after the text."""
    prompt = encoder.format(text)
    prefix, _, suffix = prompt.partition(text)
    ids = encoder.tokenizer(prompt)["input_ids"]
    before = len(encoder.tokenizer(prefix)["input_ids"])
    after = len(encoder.tokenizer(suffix)["input_ids"])
    with torch.inference_mode():
        hidden = encoder.model(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0]
    return hidden.float().numpy(), before, after


def cosines(vectors: list[np.ndarray]) -> np.ndarray:
    unit = [v / np.linalg.norm(v) for v in vectors]
    return np.array([float(a @ b) for a, b in itertools.combinations(unit, 2)])


def pooling_reference(model: Path, massive: list[float]) -> dict[str, Any]:
    encoder = Qwen3Encoder(str(model), torch.device("cpu"), torch.float32)
    states = [hidden_states(encoder, text) for text in TEXTS]
    prefix = min(before for _, before, _ in states)
    first = states[0][0][:prefix]
    prefix_difference = max(float(np.abs(h[:prefix] - first).max()) for h, _, _ in states)
    median = float(np.median(np.abs(np.concatenate([h for h, _, _ in states]))))
    rows = []
    for size in massive:
        all_tokens, text_only = [], []
        for hidden, before, after in states:
            hidden = hidden.copy()
            hidden[0, :2] += size * median  # the first token's massive activations, in two channels
            all_tokens.append(hidden.mean(axis=0))
            text_only.append(hidden[before : len(hidden) - after].mean(axis=0))
        rows.append({"massive": size, "all_tokens": cosines(all_tokens), "text_only": cosines(text_only)})
    return {"prefix_tokens": prefix, "prefix_difference": prefix_difference, "median": median, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a Qwen3 folder (default: the tiny model, built)")
    parser.add_argument("--massive", default="0,100,1000", help="sizes of the simulated activation, x the median")
    args = parser.parse_args()
    if args.model is None:
        from bench.models import bench_model

        args.model = bench_model("tiny-zimage", Path(__file__).parent / "out" / "models", "cpu")
    result = pooling_reference(args.model, [float(m) for m in args.massive.split(",")])
    print(f"model {args.model}: {result['prefix_tokens']} template tokens before the text")
    print(f"largest difference between their hidden states across texts: {result['prefix_difference']:.2e}")
    print(f"median |activation|: {result['median']:.3f}")
    print("cosine between the vectors of unrelated texts (mean, min-max):")
    for row in result["rows"]:
        cells = [f"{row[k].mean():.3f} ({row[k].min():.3f}-{row[k].max():.3f})" for k in ("all_tokens", "text_only")]
        print(f"  massive {row['massive']:6.0f} x median: all tokens {cells[0]}   text tokens only {cells[1]}")


if __name__ == "__main__":
    main()
