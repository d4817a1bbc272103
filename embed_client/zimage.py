"""Prompt embeddings for Z-Image's diffusers pipelines from the text service, so that the generator loads no text
encoder of its own (the service's Qwen3-4B is the very model Z-Image-Turbo ships as ``text_encoder/``):

    import torch
    from diffusers import ZImagePipeline
    from embed_client.zimage import prompt_embeds

    pipe = ZImagePipeline.from_pretrained(path, text_encoder=None, tokenizer=None, torch_dtype=torch.bfloat16)
    pipe.to("cuda")
    image = pipe(
        prompt_embeds=prompt_embeds("http://127.0.0.1:6011", ["a cat in the sun"], pipeline=pipe),
        num_inference_steps=9,
        guidance_scale=0.0,
    ).images[0]

``prompt_embeds`` returns what ``ZImagePipeline(prompt_embeds=..., negative_prompt_embeds=...)`` takes: one
``[tokens, 2560]`` tensor per prompt, the states of ``hidden_states[-2]`` for the real tokens of the prompt in
Qwen3's chat template, truncated at 512 tokens, exactly as the pipeline's own ``encode_prompt`` computes them. It
retries as ``EmbedClient`` does (a service that is loading, held asleep or waking is waited for), and refuses a
service whose recipe is not the one Z-Image conditions on, or whose dimension is not the pipeline's
``cap_feat_dim``, before asking it for anything. torch is imported here only: the rest of ``embed_client`` does
without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from embed_client.client import EmbedClient, EmbedClientError

if TYPE_CHECKING:
    import torch

# The encoding every pipeline of the Z-Image family applies (diffusers' ZImagePipeline._encode_prompt): the chat
# template with enable_thinking=True, at most 512 tokens (its max_sequence_length), hidden_states[-2].
ZIMAGE_LAYER = -2
ZIMAGE_TEMPLATE = "zimage"
ZIMAGE_MAX_LENGTH = 512


class RecipeMismatch(EmbedClientError):
    """The text service would not give what the pipeline conditions on: another recipe, or another dimension."""


def check_service(
    info: dict[str, Any], *, cap_feat_dim: int | None = None, max_sequence_length: int = ZIMAGE_MAX_LENGTH
) -> None:
    """``RecipeMismatch`` unless the service's ``/info`` says it computes Z-Image's prompt states (and, given
    ``cap_feat_dim``, of that width)."""
    recipe = info.get("recipe") or {}
    expected = {"layer": ZIMAGE_LAYER, "template": ZIMAGE_TEMPLATE, "max_length": max_sequence_length}
    different = {key: recipe.get(key) for key, value in expected.items() if recipe.get(key) != value}
    model = info.get("model", "the service")
    if different:
        shown = ", ".join(f"{key}={value!r} (Z-Image: {expected[key]!r})" for key, value in different.items())
        raise RecipeMismatch(
            f"{model} runs another recipe than the one Z-Image conditions on: {shown}. Start the text service with "
            f"its defaults (--layer {ZIMAGE_LAYER} --template {ZIMAGE_TEMPLATE} --max-length {max_sequence_length})"
        )
    dimension = info.get("dimension")
    if cap_feat_dim is not None and dimension != cap_feat_dim:
        raise RecipeMismatch(
            f"{model} gives {dimension}-d states, and the pipeline's transformer takes cap_feat_dim={cap_feat_dim}: "
            "the service runs another text encoder than the one this generator was trained with"
        )


def prompt_embeds(
    client_or_url: EmbedClient | str,
    prompts: str | Sequence[str],
    *,
    pipeline: Any = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    cap_feat_dim: int | None = None,
    max_sequence_length: int = ZIMAGE_MAX_LENGTH,
    api_key: str | None = None,
) -> list[torch.Tensor]:
    """Per prompt its ``[tokens, dimension]`` states on ``device`` in ``dtype``, for ``prompt_embeds=`` (or
    ``negative_prompt_embeds=``) of a Z-Image pipeline. ``pipeline``: take device, dtype and ``cap_feat_dim`` from
    it (its transformer's); otherwise the CPU, bfloat16 (what the pipelines run in) and no width check. ``api_key``
    is for a URL (an ``EmbedClient`` has its own)."""
    import torch

    if pipeline is not None:
        transformer = pipeline.transformer
        device = device or pipeline._execution_device
        dtype = dtype or transformer.dtype
        cap_feat_dim = cap_feat_dim or transformer.config.cap_feat_dim
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    client = client_or_url if isinstance(client_or_url, EmbedClient) else EmbedClient(client_or_url, api_key=api_key)
    try:
        info = client.info()
        if info.get("status") == "loading":
            client.wait_until_ready()
            info = client.info(refresh=True)
        check_service(info, cap_feat_dim=cap_feat_dim, max_sequence_length=max_sequence_length)
        states = client.embed_tokens(texts)
    finally:
        if client is not client_or_url:
            client.close()
    target = torch.device(device or "cpu")
    return [torch.from_numpy(rows).to(device=target, dtype=dtype or torch.bfloat16) for rows in states]
