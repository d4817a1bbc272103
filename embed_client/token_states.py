"""Reading the answer of ``POST /embed/tokens``: a safetensors file (one tensor per text, named by its index, and
metadata that names the model, the recipe and the token counts), into float32 numpy arrays.

Read here, with numpy alone: the safetensors package's numpy loader reads neither bfloat16 (numpy has no such type;
the text service sends it on CUDA, half the bytes of float32) nor the metadata. The format is small and fixed: an
8-byte little-endian header length, a JSON header (each tensor's dtype, shape and byte range, and
``__metadata__``), then the tensors' little-endian bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

# safetensors dtype -> how to read its bytes as float32 (bfloat16 is the top half of a float32: exact)
_READERS = {
    "F32": lambda raw: np.frombuffer(raw, dtype="<f4").astype(np.float32),
    "F16": lambda raw: np.frombuffer(raw, dtype="<f2").astype(np.float32),
    "BF16": lambda raw: (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32),
}


class InvalidTokenStates(ValueError):
    """The bytes are not the safetensors answer of /embed/tokens."""


@dataclass(frozen=True)
class TokenStates:
    """Per text ``[tokens, dimension]`` float32, in input order, and the answer's metadata (all strings, as
    safetensors stores them: model, version, layer, template, max_length, dimension, dtype, tokens)."""

    states: list[np.ndarray]
    metadata: dict[str, str]


def read_token_states(data: bytes) -> TokenStates:
    if len(data) < 8:
        raise InvalidTokenStates(f"{len(data)} bytes are no safetensors file")
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8:
        raise InvalidTokenStates("the safetensors header is longer than the answer")
    try:
        header = json.loads(data[8 : 8 + length])
    except ValueError as exc:
        raise InvalidTokenStates(f"the safetensors header is not JSON: {exc}") from None
    body = memoryview(data)[8 + length :]
    metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
    states = []
    for index in range(len(header)):
        entry = header.get(str(index))
        if entry is None or entry.get("dtype") not in _READERS:
            raise InvalidTokenStates(f"tensor {index} is missing or of an unknown dtype")
        start, end = entry["data_offsets"]
        values = _READERS[entry["dtype"]](body[start:end])
        states.append(values.reshape(entry["shape"]))
    return TokenStates(states, metadata)
