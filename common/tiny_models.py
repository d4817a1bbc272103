"""Build tiny random-weight models, offline, in the real on-disk layouts: what ``--tiny`` runs (``start_all.sh``,
the container, the Ray front door and import), so that the API can be tried without any weights, and what the tests
check the services against instead of the real checkpoints. Their vectors are meaningless; a marker file in every
folder makes the services say so (``"tiny": true``).

* ``build_tiny_siglip(out)``: a SigLIP checkpoint folder as the hub holds ``google/siglip2-so400m-patch16-512``
  (``config.json`` with ``model_type "siglip"``, ``model.safetensors``, ``preprocessor_config.json``, a
  Gemma-style byte-fallback BPE tokenizer that, like the real one, does not lowercase and pads left by default).
* ``build_tiny_zimage(out)``: a Z-Image-Turbo style diffusers folder (``model_index.json``, ``text_encoder/`` with a
  ``Qwen3ForCausalLM`` config, ``tokenizer/`` with a Qwen2 byte-level BPE tokenizer and the Qwen3 chat template).
* ``build_tiny_qwen3(out)``: a plain Qwen3 folder whose tokenizer appends ``<|endoftext|>``, as Qwen3-Embedding's does.

Run ``python -m common.tiny_models OUT_DIR`` to write all three under OUT_DIR (``siglip/``, ``zimage/``, ``qwen3/``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import processors
from transformers import (
    GemmaTokenizer,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from common.loading import hide_the_default_siglip_text_config_warning, mark_random_weights

# The generation-prompt logic of the Qwen3 chat template: with enable_thinking=False it inserts an empty think
# block, with enable_thinking=True (Z-Image's choice) it does not.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

QWEN3_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# A few whole words so that common text makes multi-character tokens, as a real vocabulary would.
WORDS = ["a", "the", "photo", "of", "cat", "dog", "on", "in", "and", "red", "blue", "sun", "sea", "tree"]


def gemma_tokenizer() -> GemmaTokenizer:
    """Byte-fallback BPE like Gemma's: specials, the 256 byte tokens, letters, a few words (case-sensitive)."""
    vocab: dict[str, int] = {}
    for token in ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]:
        vocab[token] = len(vocab)
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    for symbol in ["▁", *letters]:
        vocab[symbol] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        pieces = ["▁", *word]
        current = pieces[0]
        for piece in pieces[1:]:
            merges.append((current, piece))
            current += piece
            vocab.setdefault(current, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=merges)  # type: ignore[arg-type]  # tokenizers takes pairs


def build_tiny_siglip(out: Path, image_size: int = 64, seed: int = 0, hidden_size: int = 32) -> Path:
    """A tiny SigLIP checkpoint; ``image_size=512`` gives the real input size with a very light tower."""
    hide_the_default_siglip_text_config_warning()  # SiglipConfig() builds that default text config first
    torch.manual_seed(seed)
    tokenizer = gemma_tokenizer()
    config = SiglipConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": hidden_size * 2,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,  # the real checkpoint's text length
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "hidden_size": hidden_size,
            "intermediate_size": hidden_size * 2,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 16,
        },
    )
    model = SiglipModel(config).eval()
    # Random logit scalars away from the init values, so a formula that ignores them fails the tests.
    with torch.no_grad():
        model.logit_scale.fill_(2.1)
        model.logit_bias.fill_(-3.7)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    siglip_image_processor(image_size).save_pretrained(out)
    mark_random_weights(out)
    return out


def siglip_image_processor(image_size: int) -> SiglipImageProcessorPil:
    """The real checkpoint's preprocessing: plain bilinear resize, rescale 1/255, mean = std = 0.5."""
    return SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        resample=2,  # bilinear, as the real preprocessor_config.json says
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def qwen2_tokenizer(append_eos: bool) -> Qwen2Tokenizer:
    """Byte-level BPE as Qwen's: the 256 byte symbols, a few merges, the chat special tokens."""
    byte_symbols = list(bytes_to_unicode().values())
    vocab = {symbol: index for index, symbol in enumerate(byte_symbols)}
    merges: list[tuple[str, str]] = []
    space = bytes_to_unicode()[ord(" ")]
    for word in WORDS:
        current = space
        for char in word:
            merges.append((current, char))
            current += char
            vocab.setdefault(current, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)  # type: ignore[arg-type]  # tokenizers takes pairs
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN3_SPECIAL_TOKENS})
    tokenizer.eos_token = "<|im_end|>" if not append_eos else "<|endoftext|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    if append_eos:
        # Qwen3-Embedding's tokenizer.json appends <|endoftext|> to every sequence.
        eos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="$A <|endoftext|>",
            pair="$A <|endoftext|> $B <|endoftext|>",
            special_tokens=[("<|endoftext|>", eos_id)],
        )
    return tokenizer


def _qwen3_model(vocab_size: int, seed: int, num_layers: int) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        architectures=["Qwen3ForCausalLM"],
    )
    return Qwen3ForCausalLM(config).eval()


def build_tiny_zimage(out: Path, seed: int = 0, num_layers: int = 4) -> Path:
    """A Z-Image-Turbo layout: model_index.json + text_encoder/ + tokenizer/ (other components are not needed)."""
    tokenizer = qwen2_tokenizer(append_eos=False)
    model = _qwen3_model(len(tokenizer), seed, num_layers)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    model_index = {
        "_class_name": "ZImagePipeline",
        "_diffusers_version": "0.36.0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3Model"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "ZImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(model_index, indent=2))
    mark_random_weights(out)
    return out


def build_tiny_qwen3(out: Path, seed: int = 1, num_layers: int = 3) -> Path:
    """A plain Qwen3 folder (config + weights + tokenizer together), Qwen3-Embedding style."""
    tokenizer = qwen2_tokenizer(append_eos=True)
    model = _qwen3_model(len(tokenizer), seed, num_layers)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    mark_random_weights(out)
    return out


def build_all(out_dir: Path, siglip_image_size: int = 64) -> Path:
    """All three under ``out_dir``: ``siglip/``, ``zimage/``, ``qwen3/`` (./start_all.sh --tiny and ``--tiny`` of the
    Ray commands use this layout)."""
    build_tiny_siglip(out_dir / "siglip", image_size=siglip_image_size)
    build_tiny_zimage(out_dir / "zimage")
    build_tiny_qwen3(out_dir / "qwen3")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--siglip-image-size", type=int, default=64, help="512 gives the real input size")
    args = parser.parse_args()
    build_all(args.out_dir, args.siglip_image_size)


if __name__ == "__main__":
    main()
