"""Request and response bodies shared by both services (the seeds' shapes are the contract)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, model_validator

# Texts must be real strings (no numbers coerced to "1") and not empty.
Text = Annotated[StrictStr, Field(min_length=1)]


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    normalize: StrictBool = Field(True, description="L2-normalise the vectors (false returns raw model outputs)")


class EmbedTextRequest(Body):
    """``{"text": "..."}`` -> ``embedding``; ``{"texts": [...]}`` -> ``embeddings`` (the German seed's form)."""

    text: Text | None = None
    texts: list[Text] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> EmbedTextRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' (a string) or 'texts' (a list of strings)")
        return self


class EmbedTextsRequest(Body):
    texts: list[Text] = Field(min_length=1)


class EmbeddingResponse(BaseModel):
    embedding: list[float]
    dimension: int
    model: str
    version: str


class EmbeddingsResponse(BaseModel):
    embeddings: list[list[float]]
    dimension: int
    model: str
    version: str
