"""A tiny Z-Image-Turbo pipeline in the hub layout, for the tests of lending the text encoder to the generator:
``build_tiny_zimage`` (text_encoder/, tokenizer/, model_index.json) plus transformer/, vae/ and scheduler/, with
random weights, that diffusers' ``ZImagePipeline.from_pretrained`` loads. diffusers is a test dependency only
(requirements-dev.txt): the services never import it, which is why this is not in tiny_models.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel

from common.tiny_models import build_tiny_zimage


def build_tiny_zimage_pipeline(out: Path, seed: int = 0) -> Path:
    """Every component of a Z-Image-Turbo folder, tiny; the transformer's ``cap_feat_dim`` is the text encoder's
    hidden size, as Qwen3-4B's 2560 is the real one's."""
    build_tiny_zimage(out, seed=seed)
    hidden_size = json.loads((out / "text_encoder" / "config.json").read_text())["hidden_size"]
    torch.manual_seed(seed)
    # Z-Image-Turbo's transformer/config.json, shrunk: patch 2, 16 latent channels, RoPE over 3 axes.
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        qk_norm=True,
        cap_feat_dim=hidden_size,
        axes_dims=[4, 6, 6],  # sums to the head size, 32 / 2
        axes_lens=[1024, 32, 32],  # the first axis numbers the prompt's tokens: up to 512, and the image after them
    )
    # The Flux VAE Z-Image uses (16 latent channels, scaling and shift factors), with two small blocks.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    transformer.save_pretrained(out / "transformer")
    vae.save_pretrained(out / "vae")
    scheduler.save_pretrained(out / "scheduler")
    return out
