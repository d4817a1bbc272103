"""Text embeddings from Qwen3: by default the penultimate layer of Z-Image-Turbo's Qwen3-4B text encoder, 2560-d,
port 6011.

    python qwen3_embed.py [--model PATH_OR_ID] [--port 6011] [--layer -2] [--pooling mean] [--template zimage]

The default vector is the one Z-Image conditions on: the prompt in Qwen3's chat template, at most 512 tokens,
hidden_states[-2] (output of layer 35 of 36, before the final norm), averaged over all real tokens, L2-normalised.
With ``--layer -1 --pooling last --template none`` the same service serves Qwen3-Embedding models.
This file holds what is specific to Qwen3: the recipe, its settings, the encoder (a pure batch method), the service
and ``load``. The routes and the server are shared, in ``common/``.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

import numpy as np
import torch
from pydantic import Field, field_validator

from common.api import token_routes
from common.config import MB, ServiceSettings, default_model, limit_hint
from common.errors import PayloadTooLarge
from common.identity import weights_fingerprint
from common.loading import describe_device, display_name, explain_broken_weights, locate_model, read_config
from common.precision import GIVEN_WITH_THE_ENCODER
from common.residency import SwappableWeights
from common.server import ServiceDefinition
from common.service import BatchedService
from common.services import SERVICES

if TYPE_CHECKING:
    from transformers import Qwen3Model

HUB_ID = "Tongyi-MAI/Z-Image-Turbo"
LOCAL_PATH = "/mnt/hdd/models/Z-Image-Turbo"
# Names the embedding space of the default recipe; a recipe that differs appends its changes (Qwen3Recipe.version).
EMBEDDING_VERSION = "1.0"
# What the service reads of a Z-Image-Turbo repository (8 GB of 30): its download at start-up and DOWNLOAD_HELP.
ZIMAGE_TEXT_FILES = ("text_encoder/*", "tokenizer/*", "model_index.json")
# hf takes one pattern per --include (a second word is a file name, and names turn --include off); modelscope takes
# them all after one --include.
DOWNLOAD_HELP = (
    f"    hf download {HUB_ID} {' '.join(f'--include {shlex.quote(p)}' for p in ZIMAGE_TEXT_FILES)} "
    f"--local-dir {LOCAL_PATH}\n"
    f"    # or: modelscope download {HUB_ID} --include {shlex.join(ZIMAGE_TEXT_FILES)} --local_dir {LOCAL_PATH}"
)

Pooling = Literal["mean", "last", "mean_text"]
Template = Literal["zimage", "none"]


@dataclass(frozen=True)
class Qwen3Recipe:
    """Everything that decides the numbers of a vector; the defaults are what Z-Image conditions on."""

    layer: int = -2  # hidden_states index: -2 = output of the penultimate layer, -1 = the final (normed) output
    # mean over the real tokens; the last real token (Qwen3-Embedding); or mean_text: the mean over the text's own
    # tokens, leaving the template's out (their states are partly the same for every text, see docs/text-recipe.md)
    pooling: Pooling = "mean"
    template: Template = "zimage"  # zimage: the chat template as Z-Image applies it; none: the raw text
    max_length: int = 512  # tokens per text after the template; Z-Image truncates at 512

    def version(self) -> str:
        """ "1.0" for the default recipe; every field that differs is appended: vectors of another recipe live in
        another space and must not be compared with these."""
        changed = [f"{f.name}={getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name) != f.default]
        return EMBEDDING_VERSION + ("+" + ",".join(changed) if changed else "")


class Qwen3Settings(ServiceSettings):
    service_env_prefix: ClassVar[str] = SERVICES["qwen3"].env_prefix

    model: str = Field(
        default_factory=lambda: default_model(LOCAL_PATH, HUB_ID),
        description="Z-Image-Turbo folder (text_encoder/ + tokenizer/), a plain Qwen3 folder, or a hub id "
        f"(default: {LOCAL_PATH} if that folder exists, else {HUB_ID})",
    )
    port: int = Field(SERVICES["qwen3"].port, ge=1, le=65535, description="TCP port")
    layer: int = Field(Qwen3Recipe.layer, description="hidden_states index: -2 = penultimate layer, -1 = final output")
    pooling: Pooling = Field(
        Qwen3Recipe.pooling,
        description="mean over real tokens, the last real token, or mean_text: mean over the text's own tokens "
        "(the template's left out)",
    )
    template: Template = Field(
        Qwen3Recipe.template, description="zimage: Qwen3 chat template as Z-Image uses it; none: raw text"
    )
    max_length: int = Field(Qwen3Recipe.max_length, ge=1, description="tokens per text; longer texts are truncated")
    max_batch_tokens: int = Field(
        16384,
        ge=1,
        description="padded tokens per forward pass: the batcher forms no batch whose size times its longest text's "
        "tokens could be more (a text counts its template's tokens plus its UTF-8 bytes, at most max_length)",
    )
    max_token_states_bytes: int = Field(
        64 * MB,
        ge=1,
        description="bytes of one /embed/tokens answer (tokens x dimension x bytes a value; a JSON value counts "
        f"{token_routes.JSON_VALUE_BYTES}); a request whose answer would be larger is refused (413) before any work",
    )

    @field_validator("dtype")
    @classmethod
    def _not_float16(cls, dtype: str) -> str:
        if dtype == "float16":
            # Qwen3's activations exceed float16's range (65504) in a few channels: the vectors come out NaN.
            raise ValueError(
                "float16 overflows in Qwen3's activations (the vectors come out NaN); use bfloat16 (the default on "
                "CUDA) or float32"
            )
        return dtype

    def recipe(self) -> Qwen3Recipe:
        return Qwen3Recipe(**{f.name: getattr(self, f.name) for f in fields(Qwen3Recipe)})


def _is_zimage_layout(source: str) -> bool:
    root = Path(source)
    return (root / "text_encoder").is_dir() or (root / "model_index.json").is_file()


@dataclass(frozen=True)
class TokenStatesOf:
    """A batch item that asks for a text's per-token states instead of its pooled vector (``Qwen3Encoder.encode``):
    the two kinds share one forward pass."""

    text: str


TextItem = str | TokenStatesOf


class Qwen3Encoder(SwappableWeights["Qwen3Model"]):
    """A Qwen3 text encoder with a pure batch method; no HTTP, no asyncio.

    Only the layers up to the requested hidden state are kept: for layer -2 the last decoder layer and the final
    norm are dropped, which gives the same numbers as ``output_hidden_states=True`` + ``hidden_states[-2]`` for
    less work and memory.
    """

    def __init__(
        self,
        source: str,
        device: torch.device,
        dtype: torch.dtype,
        recipe: Qwen3Recipe = Qwen3Recipe(),
        *,
        compile_model: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        from transformers import AutoTokenizer

        self.zimage_layout = _is_zimage_layout(source)
        model_dir = {"subfolder": "text_encoder"} if self.zimage_layout else {}
        tokenizer_dir = {"subfolder": "tokenizer"} if self.zimage_layout else {}
        config = read_config(
            source,
            model_dir.get("subfolder"),
            "qwen3",
            "a Qwen3 text model (Z-Image-Turbo's text_encoder/ + tokenizer/, or a plain Qwen3 folder)",
        )
        self.source = source
        self.num_layers: int = config.num_hidden_layers
        if not -(self.num_layers + 1) <= recipe.layer <= self.num_layers:
            raise ValueError(
                f"--layer {recipe.layer} is out of range: {self.num_layers} layers give {self.num_layers + 1} "
                "hidden states"
            )
        # hidden_states[i]: 0 = token embeddings, i = output of decoder layer i; the last one has the final norm.
        self.hidden_index = recipe.layer % (self.num_layers + 1)
        self.device = device
        self.dtype = dtype
        self.recipe = recipe
        self.compile_model = compile_model
        self.compile_backend = compile_backend
        self.model = self.load_model()
        self.fingerprint = weights_fingerprint(self.weight_folders())
        self.dimension: int = config.hidden_size
        self.tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_dir)
        # Right padding keeps every real token at the same position as when the text is alone.
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.template_tokens = len(self.tokenize([""])[0])

    def warm_up(self) -> None:
        """A batch of 1 and a padded batch of 2: a compiled model compiles both graphs it needs now, at start-up,
        not on the first multi-item batch of a live request."""
        self.embed_texts(["warm-up"])
        self.embed_texts(["warm-up", "a longer warm-up text, so that the batch is padded"])

    def weight_folders(self) -> list[Path]:
        return parts_read(self.source)

    def load_model(self) -> Qwen3Model:
        """The weights from the folder onto the device (at start-up, and on a wake after an unload)."""
        from transformers import AutoModel

        model_dir = {"subfolder": "text_encoder"} if self.zimage_layout else {}
        model = AutoModel.from_pretrained(self.source, dtype=self.dtype, attn_implementation="sdpa", **model_dir)
        if self.hidden_index < self.num_layers:
            # Dead layers: nothing after hidden_states[hidden_index] contributes to the vector.
            model.layers = model.layers[: self.hidden_index]
            model.norm = torch.nn.Identity()
        model = model.to(self.device).eval()
        if self.compile_model:
            # Batch size and padded length change from batch to batch; a batch of 1 still gets a graph of its own
            # (sizes 0 and 1 are always specialised), so warm_up runs a padded batch of 2 as well.
            model.compile(dynamic=True, backend=self.compile_backend)
        return model

    def format(self, text: str) -> str:
        if self.recipe.template == "none":
            return text
        # Exactly what Z-Image feeds its text encoder: <|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n
        prompt = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        return str(prompt)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, truncated at max_length, unpadded."""
        encoded = self.tokenizer(
            [self.format(text) for text in texts], truncation=True, max_length=self.recipe.max_length
        )
        return [list(ids) for ids in encoded["input_ids"]]

    def text_positions(self, texts: Sequence[str]) -> list[list[int]]:
        """Per text, the positions of the tokens that hold the text itself (not the template), found by their
        character offsets in the prompt; a text with none (an empty one) keeps every position."""
        encoded = self.tokenizer(
            [self.format(text) for text in texts],
            truncation=True,
            max_length=self.recipe.max_length,
            return_offsets_mapping=True,
        )
        positions = []
        # The template puts the text between a fixed head and tail: the head's length is where the text starts.
        start = len(self.format("\x00").partition("\x00")[0])
        for text, offsets in zip(texts, encoded["offset_mapping"], strict=True):
            end = start + len(text)
            inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
            positions.append(inside or list(range(len(offsets))))
        return positions

    def count_tokens(self, texts: Sequence[str]) -> int:
        """Tokens the model reads (template included), for the OpenAI route's usage."""
        return sum(self.token_counts(texts))

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Per text, the tokens the model reads (template included, truncated): the rows of its token states."""
        return [len(ids) for ids in self.tokenize(texts)]

    def token_bound(self, item: TextItem) -> int:
        """At least the tokens the model reads for ``item`` (its batch cost), without the tokenizer, so that the
        event loop can reckon it: the template's tokens plus the text's UTF-8 bytes (a byte-level BPE token holds at
        least one byte; an NFC normalisation that lengthens a text is rare and small), at most max_length."""
        text = item.text if isinstance(item, TokenStatesOf) else item
        return min(self.recipe.max_length, self.template_tokens + len(text.encode("utf-8", "surrogatepass")))

    @torch.inference_mode()
    def encode(self, items: Sequence[TextItem]) -> list[np.ndarray | torch.Tensor]:
        """One row per item, in input order: for a text its raw (unnormalised) pooled vector, float32; for a
        ``TokenStatesOf`` the recipe's hidden states of its real tokens, ``[tokens, dimension]`` in the model's dtype,
        on the CPU. Both kinds share the forward passes of one batch."""
        texts = [item.text if isinstance(item, TokenStatesOf) else item for item in items]
        token_ids = self.tokenize(texts)
        lengths = [len(ids) for ids in token_ids]
        # One pass, padded to the longest text, not to max_length: same numbers, far less work. (The batcher keeps
        # a batch within max_batch_tokens: Qwen3Service.)
        padded = self.tokenizer.pad({"input_ids": token_ids}, return_tensors="pt")
        input_ids = padded["input_ids"].to(self.device)
        mask = padded["attention_mask"].to(self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        rows: list[Any] = [None] * len(texts)
        pooled = [index for index, item in enumerate(items) if not isinstance(item, TokenStatesOf)]
        for index, item in enumerate(items):
            if isinstance(item, TokenStatesOf):
                # Right padding: a text's own tokens are its first lengths[index] positions. A copy, so that the
                # padded batch is not kept alive by a view of it.
                rows[index] = hidden[index, : lengths[index]].to("cpu", copy=True)
        if not pooled:
            return rows
        if len(pooled) < len(items):
            hidden, mask = hidden[pooled], mask[pooled]
        if self.recipe.pooling == "mean_text":  # pool over the text's own tokens only
            positions = self.text_positions([texts[index] for index in pooled])
            mask = torch.zeros_like(mask)
            for row, text_positions in enumerate(positions):
                mask[row, text_positions] = 1
        vectors = self._pool(hidden.float(), mask).cpu().numpy()
        for index, vector in zip(pooled, vectors, strict=True):
            rows[index] = vector
        return rows

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> raw (unnormalised) pooled vectors, float32, in input order."""
        return np.stack(self.encode(texts)).astype(np.float32, copy=False)

    def token_states(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Texts -> the recipe's hidden states of every real token of each (the templated, truncated prompt), not
        pooled or normalised: with the default recipe, exactly what Z-Image's pipeline conditions on."""
        return cast(list[torch.Tensor], self.encode([TokenStatesOf(text) for text in texts]))

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.recipe.pooling == "last":
            last = mask.sum(dim=1) - 1  # right padding: the last real token
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


class Qwen3Service(BatchedService):
    """The loaded model behind the routes: one text batcher feeding the model's worker thread."""

    def __init__(
        self,
        settings: Qwen3Settings,
        encoder: Qwen3Encoder,
        device_label: str,
        dtype_reason: str = GIVEN_WITH_THE_ENCODER,
    ) -> None:
        super().__init__(
            settings,
            encoder,
            model_name=model_name(settings.model, encoder),
            version=encoder.recipe.version(),  # the same space in every dtype: bfloat16 only rounds it
            device=device_label,
            dtype_reason=dtype_reason,
            run_texts=encoder.encode,  # vectors and per-token states share the text batches
            text_cost=encoder.token_bound,
            max_text_batch_cost=settings.max_batch_tokens,
        )
        self.settings: Qwen3Settings = settings
        self.encoder = encoder

    @property
    def states_dtype(self) -> torch.dtype:
        return self.encoder.dtype

    @property
    def token_recipe(self) -> dict[str, str | int]:
        """What decides the per-token states (pooling does not): the answer of /embed/tokens names it."""
        recipe = self.encoder.recipe
        return {"layer": recipe.layer, "template": recipe.template, "max_length": recipe.max_length}

    async def embed_token_states(self, texts: Sequence[str], value_bytes: int) -> list[torch.Tensor]:
        """Per text, the recipe's hidden states of its real tokens (``Qwen3Encoder.encode``), through the text
        batcher: a batch may hold them and vectors together. 413 before any work when the answer, at
        ``value_bytes`` a value, would be larger than max_token_states_bytes."""
        self.check_texts(texts)
        tokens = sum(await self.runtime.run(self.encoder.token_counts, texts))  # the worker: it owns the tokenizer
        size = tokens * self.dimension * value_bytes
        limit = self.settings.max_token_states_bytes
        if size > limit:
            raise PayloadTooLarge(
                f"the answer would be {size} bytes ({tokens} tokens x {self.dimension} values x {value_bytes} bytes); "
                f"the limit is {limit_hint('max_token_states_bytes', limit)}: send fewer or shorter texts per "
                "request (or ask for the safetensors format, which is smaller than JSON)"
            )
        async with self.runtime.residency.in_use():
            rows = await self.text_batcher.submit([TokenStatesOf(text) for text in texts])
        return cast(list[torch.Tensor], rows)

    def details(self) -> dict[str, Any]:
        encoder = self.encoder
        return {
            "layout": "z-image (text_encoder/ + tokenizer/)" if encoder.zimage_layout else "plain",
            "recipe": {
                **vars(encoder.recipe),
                "layers_run": encoder.hidden_index,
                "num_layers": encoder.num_layers,
                "truncation": f"texts longer than {encoder.recipe.max_length} tokens (after the template) are "
                "truncated",
                "normalize_default": True,
            },
            "max_batch_tokens": self.settings.max_batch_tokens,
        }


def model_name(source: str, encoder: Qwen3Encoder) -> str:
    """ "Qwen3-4B" for Z-Image-Turbo's encoder (the name the existing indexers know), else the folder or hub name."""
    if encoder.zimage_layout:
        if (encoder.dimension, encoder.num_layers) == (2560, 36):
            return "Qwen3-4B"
        return f"{display_name(source)}-text-encoder"
    return display_name(source)


def parts_read(source: str) -> list[Path]:
    """The folders the text service reads, weights first: of a Z-Image-Turbo folder only the text encoder and its
    tokenizer (the diffusion transformer and the VAE beside them are the image generator's, whatever their mode)."""
    root = Path(source)
    return [root / "text_encoder", root / "tokenizer"] if _is_zimage_layout(source) else [root]


def load(settings: Qwen3Settings) -> Qwen3Service:
    """Resolve, load and warm up the model (runs in a thread at start-up)."""
    source, device, dtype = locate_model(settings, DOWNLOAD_HELP, parts_read)
    with explain_broken_weights(parts_read(source)[0], DOWNLOAD_HELP):
        encoder = Qwen3Encoder(
            source,
            device,
            dtype.dtype,
            settings.recipe(),
            compile_model=settings.compile,
        )
    encoder.warm_up()
    return Qwen3Service(settings, encoder, describe_device(device), dtype.reason)


def text_encoder_files(files: list[str]) -> list[str] | None:
    """Of a Z-Image-Turbo repository only the text encoder and tokenizer are needed; a plain Qwen3 repo whole."""
    if "model_index.json" in files:
        return list(ZIMAGE_TEXT_FILES)
    return None


SERVICE = ServiceDefinition(
    "Qwen3 text embeddings",
    Qwen3Settings,
    load,
    DOWNLOAD_HELP,
    text_encoder_files,
    lambda s: s.recipe().version(),
    extra_routers=(token_routes.router,),  # /embed/tokens: the per-token states (Qwen3Service.embed_token_states)
)
build_app, main = SERVICE.build_app, SERVICE.main

if __name__ == "__main__":
    raise SystemExit(main())
