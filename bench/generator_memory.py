"""The weights' memory of an image generator (Z-Image-Turbo) and both services on one card, before and after the
generator borrows the text service's encoder: parameters counted from the real models' configs (built on the meta
device: no memory, no download), times 2 bytes (bfloat16, what the pipeline and the services run in on CUDA).

    python -m bench.generator_memory [--card-gib 24]

Weights only: activations, the CUDA context of each process (a few hundred MB) and the allocator's slack come on
top, which is why the table keeps a margin.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from transformers import Qwen3Config, Qwen3Model, SiglipConfig, SiglipModel

from bench.models import QWEN3_4B, SO400M_512

GIB = 1024**3
BF16_BYTES = 2

# Z-Image-Turbo's transformer/config.json and vae/config.json (the Flux VAE), as published.
ZIMAGE_DIT: dict[str, Any] = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 2560,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [32, 48, 48],
    "axes_lens": [1024, 512, 512],
}
FLUX_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts() -> dict[str, int]:
    from diffusers import AutoencoderKL, ZImageTransformer2DModel  # a test dependency (requirements-dev.txt)

    with torch.device("meta"):
        counts = {
            "Z-Image DiT (transformer/)": parameters(ZImageTransformer2DModel(**ZIMAGE_DIT)),
            "Flux VAE (vae/)": parameters(AutoencoderKL(**FLUX_VAE)),
            "Qwen3-4B, 36 layers (the generator's text_encoder/)": parameters(Qwen3Model(Qwen3Config(**QWEN3_4B))),
            "Qwen3-4B, 35 layers (the text service)": parameters(
                Qwen3Model(Qwen3Config(**{**QWEN3_4B, "num_hidden_layers": 35}))
            ),
            "SigLIP2 so400m-patch16-512 (the image service)": parameters(SiglipModel(SiglipConfig(**SO400M_512))),
        }
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--card-gib", type=float, default=24.0)
    args = parser.parse_args()
    counts = parameter_counts()
    gib = {name: count * BF16_BYTES / GIB for name, count in counts.items()}
    print("| model | parameters | bfloat16 weights |")
    print("|---|---|---|")
    for name, count in counts.items():
        print(f"| {name} | {count / 1e9:.2f} B | {gib[name]:.2f} GiB |")
    dit, vae, encoder36, encoder35, siglip = gib.values()
    rows = [
        ("generator with its own encoder, alone", dit + vae + encoder36),
        ("generator with its own encoder + both services", dit + vae + encoder36 + encoder35 + siglip),
        ("generator borrowing the encoder + both services", dit + vae + encoder35 + siglip),
        ("generator borrowing the encoder + the text service (SigLIP asleep)", dit + vae + encoder35),
        ("both services alone (indexing)", encoder35 + siglip),
    ]
    print()
    print(f"| on one {args.card_gib:g} GiB card | weights | left of {args.card_gib:g} GiB |")
    print("|---|---|---|")
    for name, total in rows:
        print(f"| {name} | {total:.2f} GiB | {args.card_gib - total:+.2f} GiB |")


if __name__ == "__main__":
    main()
