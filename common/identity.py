"""A model's identity is its weights, not its folder: the name of a known model read from its config, and a
fingerprint of its files that a copy or a renamed folder keeps and a fine-tune changes.

The fingerprint hashes, per folder the model is read from: every small file that decides the numbers (configs,
tokenizer, preprocessing; JSON parsed and written back with sorted keys, without the keys that only say where and
by what it was saved), and of the weights each tensor's name, dtype and shape and a sample of its bytes (its first
and middle 64 bytes): a fine-tune changes the bytes of every tensor it trains, and reading the samples touches two
pages a tensor, a few MB of an 8 GB checkpoint. Tensors are hashed by name, whatever shard holds them, so the same
weights sharded otherwise keep their fingerprint; weights of another dtype do not (their numbers differ).
"""

from __future__ import annotations

import hashlib
import json
import mmap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# Bytes of each tensor sampled at its start and in its middle.
SAMPLE_BYTES = 64
# Hex digits of the fingerprint shown and stored: 64 bits tell any two checkpoints of one machine apart.
FINGERPRINT_HEX = 16
# JSON keys that say where or with which library version a file was written, not what it holds.
VOLATILE_KEYS = frozenset({"_name_or_path", "transformers_version", "_diffusers_version", "name_or_path"})
# Small files that change the numbers besides the weights (what the loaders read).
SMALL_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
# Marker files that change nothing (the tiny models' note, the hub's download metadata).
IGNORED_NAMES = frozenset({"RANDOM_WEIGHTS.txt", "README.md", ".gitattributes"})

# SigLIP checkpoints by their vision tower's width and depth, and their text vocabulary (the family and variant).
SIGLIP_SIZES = {(768, 12): "base", (1024, 24): "large", (1152, 27): "so400m", (1536, 40): "giant-opt"}
SIGLIP_VOCABULARIES = {256000: ("siglip2", ""), 32000: ("siglip", ""), 250000: ("siglip", "-multilingual")}


def known_siglip_name(config: Any) -> str | None:
    """The published name of a SigLIP checkpoint from its config (``siglip2-so400m-patch16-512``), whatever its
    folder is called; None for a checkpoint of another shape (then the folder names it)."""
    vision, text = config.vision_config, config.text_config
    size = SIGLIP_SIZES.get((vision.hidden_size, vision.num_hidden_layers))
    family = SIGLIP_VOCABULARIES.get(text.vocab_size)
    if size is None or family is None:
        return None
    name, suffix = family
    return f"{name}-{size}-patch{vision.patch_size}-{vision.image_size}{suffix}"


def weights_fingerprint(folders: Sequence[Path]) -> str:
    """The fingerprint of the model read from ``folders`` (in this order; see the module's docstring)."""
    digest = hashlib.sha256()
    for index, folder in enumerate(folders):
        digest.update(f"folder {index}\n".encode())
        for name, data in _small_files(folder):
            digest.update(f"file {name} {len(data)}\n".encode())
            digest.update(data)
        for line in _tensor_samples(folder):
            digest.update(line)
    return digest.hexdigest()[:FINGERPRINT_HEX]


def _small_files(folder: Path) -> Iterator[tuple[str, bytes]]:
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name in IGNORED_NAMES or not path.name.endswith(SMALL_FILE_SUFFIXES):
            continue
        data = path.read_bytes()
        if path.suffix == ".json":
            data = _canonical_json(data)
        yield path.name, data


def _canonical_json(data: bytes) -> bytes:
    try:
        value = json.loads(data)
    except ValueError:
        return data  # not JSON after all: its bytes as they are
    return json.dumps(_without_volatile_keys(value), sort_keys=True, separators=(",", ":")).encode()


def _without_volatile_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_volatile_keys(item) for key, item in value.items() if key not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_without_volatile_keys(item) for item in value]
    return value


def _tensor_samples(folder: Path) -> list[bytes]:
    """One line per tensor of the folder's weights, sorted by tensor name."""
    lines: list[bytes] = []
    for path in sorted(folder.glob("*.safetensors")):
        lines += _safetensors_samples(path)
    for path in sorted(folder.glob("*.bin")):  # PyTorch's zip archives: their size and bytes at 16 places
        size = path.stat().st_size
        with path.open("rb") as file:
            samples = []
            for step in range(16):
                file.seek(size * step // 16)
                samples.append(file.read(SAMPLE_BYTES).hex())
        lines.append(f"bin {path.name} {size} {' '.join(samples)}\n".encode())
    return sorted(lines)


def _safetensors_samples(path: Path) -> list[bytes]:
    if path.stat().st_size < 8:  # no header at all (a broken file: loading it says so)
        return [f"empty {path.name}\n".encode()]
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + length])
        start_of_data = 8 + length
        lines = []
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = (start_of_data + offset for offset in entry["data_offsets"])
            middle = (begin + end) // 2
            head, centre = data[begin : min(end, begin + SAMPLE_BYTES)], data[middle : min(end, middle + SAMPLE_BYTES)]
            lines.append(f"{name} {entry['dtype']} {entry['shape']} {head.hex()} {centre.hex()}\n".encode())
        return lines
