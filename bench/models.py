"""Models for benchmarks: full-size architectures with random weights (speed does not depend on the weights, and
no weights can be downloaded), and the tiny models with the real 512 px input."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, SiglipConfig, SiglipModel

from common.tiny_models import (
    build_tiny_siglip,
    build_tiny_zimage,
    gemma_tokenizer,
    qwen2_tokenizer,
    siglip_image_processor,
)

# google/siglip2-so400m-patch16-512's config.json, as published.
SO400M_512: dict[str, Any] = {
    "text_config": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "vocab_size": 256000,
        "max_position_embeddings": 64,
        "projection_size": 1152,
    },
    "vision_config": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "image_size": 512,
        "patch_size": 16,
    },
}

# Z-Image-Turbo's text_encoder/config.json (Qwen3-4B).
QWEN3_4B: dict[str, Any] = {
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1_000_000,
    "tie_word_embeddings": True,
}


def siglip_vision_flops(image_size: int, patch: int, hidden: int, intermediate: int, layers: int) -> float:
    """Matmul FLOPs of one image through the vision tower (projections, MLP, attention scores and values)."""
    tokens = (image_size // patch) ** 2
    per_layer = 2 * tokens * (4 * hidden * hidden + 2 * hidden * intermediate) + 4 * tokens * tokens * hidden
    return float(layers * per_layer)


def qwen3_flops_per_token(config: dict[str, int], layers: int, context: int) -> float:
    """Matmul FLOPs per token for ``layers`` decoder layers at a given context length."""
    h, i, heads, kv, d = (
        config[k]
        for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    )
    projections = 2 * (h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * i)
    attention = 4 * context * heads * d
    return float(layers * (projections + attention))


def build_random_so400m(out: Path, device: str) -> Path:
    """SigLIP2 so400m-patch16-512 with random weights, saved in bfloat16 with a tiny tokenizer and the real
    preprocessor settings."""
    if (out / "config.json").exists():
        return out
    tokenizer = gemma_tokenizer()
    with torch.device(device):
        model = SiglipModel(SiglipConfig(**SO400M_512)).to(torch.bfloat16)  # type: ignore[arg-type]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    siglip_image_processor(512).save_pretrained(out)
    return out


def build_random_qwen3_4b(out: Path, device: str, layers: int = QWEN3_4B["num_hidden_layers"]) -> Path:
    """Qwen3-4B with random weights in the Z-Image layout (text_encoder/ + tokenizer/); ``layers`` cuts it to fewer
    decoder layers of the same size (a machine that does not hold the whole model)."""
    if (out / "text_encoder" / "config.json").exists():
        return out
    config = {**QWEN3_4B, "num_hidden_layers": layers}
    with torch.device(device):
        model = Qwen3ForCausalLM(Qwen3Config(**config, architectures=["Qwen3ForCausalLM"]))
        model = model.to(torch.bfloat16)  # type: ignore[arg-type]
    model.save_pretrained(out / "text_encoder")
    qwen2_tokenizer(append_eos=False).save_pretrained(out / "tokenizer")
    (out / "model_index.json").write_text('{"_class_name": "ZImagePipeline"}')
    return out


def bench_model(kind: str, cache: Path, device: str) -> Path:
    """``tiny`` / ``tiny-512`` (real input size, very light tower) / ``so400m`` / ``qwen3-4b`` / ``qwen3-4layers``
    (Qwen3-4B's layers, 4 of them) / ``siglip-300mb`` (a SigLIP of 75 M parameters: 300 MB in float32)."""
    builders = {
        "tiny-512": lambda out: build_tiny_siglip(out, image_size=512) if not (out / "config.json").exists() else out,
        "tiny-zimage": lambda out: build_tiny_zimage(out) if not (out / "model_index.json").exists() else out,
        "so400m": lambda out: build_random_so400m(out, device),
        "qwen3-4b": lambda out: build_random_qwen3_4b(out, device),
        "qwen3-4layers": lambda out: build_random_qwen3_4b(out, device, layers=4),
        "siglip-300mb": lambda out: (
            build_tiny_siglip(out, image_size=224, hidden_size=1536) if not (out / "config.json").exists() else out
        ),
    }
    return builders[kind](cache / kind)


def add_model_arguments(parser: argparse.ArgumentParser, tiny: str, full_size: str) -> None:
    parser.add_argument("--model", default=tiny, help=f"a model folder, or {tiny} (built here, the default)")
    parser.add_argument(
        "--random-weights", choices=[full_size], help="the full-size architecture with random weights (for GPU runs)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def model_from_arguments(args: argparse.Namespace) -> Path:
    name = args.random_weights or args.model
    if Path(name).is_dir():
        return Path(name)
    return bench_model(name, Path(__file__).parent / "out" / "models", args.device)
