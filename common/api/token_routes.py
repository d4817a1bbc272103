"""``POST /embed/tokens``, mounted on services whose model hands out per-token states (the text service): the
recipe's hidden states of every real token of each templated, truncated prompt, not pooled, not normalised. With
the default recipe these are exactly what Z-Image's diffusers pipeline conditions on (``prompt_embeds``), so an
image generator beside the service needs no copy of the text encoder. text-embeddings-inference's ``/embed_all``
is the closest route elsewhere.

The answer is a safetensors file by default (one tensor per text, named by its index, ``[tokens_i, dimension]``,
in the model's dtype unless the request asks for another; the metadata names model, version, recipe and token
counts), or JSON with ``"format": "json"`` (nested lists, for curl and small texts).
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal, cast

import orjson
import torch
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator
from safetensors.torch import save as save_safetensors

from common.api.app import Model
from common.api.json_body import JSONBodyRoute
from common.api.schemas import FastJSONResponse
from common.contract import TokenStatesModel

router = APIRouter(route_class=JSONBodyRoute)

SAFETENSORS_MEDIA_TYPE = "application/octet-stream"
# What one value costs in a JSON answer at most (orjson writes a float32 in at most 15 characters, "-1.1754944e-38",
# then a comma): the size bound counts it so, before any work.
JSON_VALUE_BYTES = 16
# Answers larger than this are serialised in a thread: the event loop keeps serving meanwhile.
RENDER_IN_THREAD_BYTES = 1024 * 1024

StatesDType = Literal["float32", "bfloat16"]
TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class EmbedTokensRequest(BaseModel):
    """``{"text": "..."}`` or ``{"texts": [...]}``; an empty text is allowed (Z-Image's default negative prompt)."""

    model_config = ConfigDict(extra="ignore")

    text: StrictStr | None = None
    texts: list[StrictStr] | None = Field(None, min_length=1)
    format: Literal["safetensors", "json"] = Field(
        "safetensors", description="safetensors (binary, the default) or json (nested lists)"
    )
    dtype: StatesDType | None = Field(
        None,
        description="the values' dtype; default: the model's own (/info's dtype: bfloat16 on CUDA and on a CPU "
        "with native bfloat16, float32 elsewhere)",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> EmbedTokensRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' (a string) or 'texts' (a list of strings)")
        return self

    def all_texts(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class TokenStatesResponse(BaseModel):
    """The JSON form of the answer (``"format": "json"``)."""

    states: list[list[list[float]]] = Field(description="per text, one row of `dimension` values per token")
    tokens: list[int] = Field(description="per text, its number of tokens (rows)")
    dimension: int
    dtype: str
    model: str
    version: str
    layer: int = Field(description="the hidden_states index the states are taken from")
    template: str
    max_length: int = Field(description="tokens per text at most; longer prompts are truncated")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@router.post(
    "/embed/tokens",
    tags=["texts"],
    summary="Per-token states of texts (Z-Image's prompt embeddings)",
    response_class=Response,
    responses={
        200: {
            "description": "a safetensors file (default), or JSON with format=json",
            "content": {
                SAFETENSORS_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
                "application/json": {"schema": TokenStatesResponse.model_json_schema()},
            },
        }
    },
)
async def embed_tokens(request: Request, body: EmbedTokensRequest, model: Model) -> Response:
    """The recipe's hidden states of every real token of each text (after the template, truncated at
    max_length), in input order; their mean over the tokens is the text's vector before normalisation."""
    states_model = cast(TokenStatesModel, model)
    texts = body.all_texts()
    dtype = TORCH_DTYPES[body.dtype] if body.dtype else states_model.states_dtype
    value_bytes = JSON_VALUE_BYTES if body.format == "json" else dtype.itemsize
    states = await states_model.embed_token_states(texts, value_bytes)
    request.state.items = len(texts)
    described: dict[str, Any] = {
        "tokens": [len(rows) for rows in states],
        "dimension": model.dimension,
        "dtype": dtype_name(dtype),
        "model": model.model_name,
        "version": model.version,
        **states_model.token_recipe,
    }
    size = sum(described["tokens"]) * model.dimension * value_bytes
    render = render_json if body.format == "json" else render_safetensors
    if size > RENDER_IN_THREAD_BYTES:
        return await asyncio.to_thread(render, states, dtype, described)
    return render(states, dtype, described)


def render_safetensors(states: list[torch.Tensor], dtype: torch.dtype, described: dict[str, Any]) -> Response:
    tensors = {str(index): rows.to(dtype).contiguous() for index, rows in enumerate(states)}
    # safetensors metadata is text only: numbers as they are written, lists as JSON.
    metadata = {key: v if isinstance(v, str) else orjson.dumps(v).decode() for key, v in described.items()}
    return Response(save_safetensors(tensors, metadata=metadata), media_type=SAFETENSORS_MEDIA_TYPE)


def render_json(states: list[torch.Tensor], dtype: torch.dtype, described: dict[str, Any]) -> Response:
    # Rounded to the answer's dtype first, then written as float32 (exact for bfloat16 values).
    values = [rows.to(dtype).float().numpy() for rows in states]
    return FastJSONResponse({"states": values, **described})
