"""float32 against ``--dtype auto`` (and against an explicit ``--dtype bfloat16``) on the CPU, through the services,
interleaved in one run; and how far bfloat16's answers are from float32's on every route.

    python -m bench.bench_dtype images [--model so400m|PATH] [--rounds 3] [--images 2] [--similarity-images 2]
    python -m bench.bench_dtype texts [--model qwen3-4layers|PATH] [--rounds 3] [--texts 8]

Three services run side by side on the same model: ``--dtype float32``, no ``--dtype`` (auto; EMBED_DTYPE and the
service's own variable are removed from their environment) and ``--dtype bfloat16``; each prints its /info dtype
and reason. Every round sends each of them the round's items (the same ones, new ones every round) as concurrent
one-item requests (so they share a batch), in an order that rotates from round to round; items/s is the items over
the wall time, and each ratio is against float32 of the same rounds. Where bfloat16 is emulated (many times slower)
keep the items few.

Fidelity, bfloat16 against float32, per vector (cosine) on the items of the rounds: images and, from one
``/similarity`` request (with ``return_embeddings``) of ``--similarity-images`` images and every text, SigLIP's
text vectors, the pair probabilities and cosines; for Qwen3 the text vectors and, from ``/embed/tokens``, the
states of every token. Probabilities depend on the checkpoint's logit scale and bias: with random weights they say
little, so the largest change of a pair's cosine is printed too, with the change it makes at most in a probability
(at 0.5, where the sigmoid is steepest) at a trained checkpoint's scale.

``so400m`` is the full SigLIP2 so400m-512 architecture and ``qwen3-4layers`` Qwen3-4B's width with 4 of its 36
layers (what this machine holds three times over), both with random weights (bench/models.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from bench.loadgen import ROOT, free_port, server_process
from bench.models import bench_model
from tests.helpers import MIXED_TEXTS, image_bytes, photo_like

DTYPES = {"float32": ["--dtype", "float32"], "auto": [], "bfloat16": ["--dtype", "bfloat16"]}
# A trained SigLIP's logit scale is of this order (exp: about 110); the random checkpoint's is whatever init gave.
TRAINED_LOGIT_SCALE = 4.7
TEXTS = [*MIXED_TEXTS, "a photo of a cat sleeping in the sun", "two dogs running on a beach at sunset"]


@dataclass
class Service:
    name: str
    url: str
    info: dict[str, Any]
    seconds: list[float] = field(default_factory=list)  # per round
    items: list[int] = field(default_factory=list)
    vectors: dict[int, np.ndarray] = field(default_factory=dict)  # item index -> its vector

    @property
    def rate(self) -> float:
        return sum(self.items) / sum(self.seconds)


def cosines(got: np.ndarray, expected: np.ndarray) -> np.ndarray:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return np.asarray(
        np.sum(got * expected, axis=-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(expected, axis=-1)
    )


def memory_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024**2
    return math.nan


def model_folder(name: str) -> Path:
    """A folder as it is, or a model of bench/models.py, built under bench/out/models the first time."""
    return Path(name) if Path(name).is_dir() else bench_model(name, ROOT / "bench" / "out" / "models", "cpu")


def start_services(stack: ExitStack, script: str, env_prefix: str, model: Path) -> dict[str, Service]:
    """The three services on ``model``, started one after another (each loads alone), stopped with ``stack``."""
    for name in ("EMBED_DTYPE", f"{env_prefix}DTYPE"):
        os.environ.pop(name, None)  # auto must be the services' own choice
    services = {}
    for name, flags in DTYPES.items():
        port = free_port()
        command = [script, "--model", str(model), "--port", str(port), "--device", "cpu", *flags]
        # A bfloat16 batch emulated on a CPU without it can take minutes: longer than the default 120 s.
        command += ["--request-timeout-s", "7200", "--log-level", "warning"]
        log = ROOT / "bench" / "out" / f"bench_dtype-{Path(script).stem}-{name}.log"
        url = stack.enter_context(server_process(command, port, log, timeout=1800))
        info = httpx.get(url + "/info", timeout=60).json()
        services[name] = Service(name, url, info)
        print(f"{name:>8}: dtype {info['dtype']} ({info['dtype_reason']}); version {info['version']}", flush=True)
    return services


Send = Callable[[httpx.Client, str, int], np.ndarray]


def run_rounds(services: dict[str, Service], send: Send, rounds: int, per_round: int) -> None:
    """Interleaved: each round every service in turn, the order rotating, each the same ``per_round`` items."""
    names = list(services)
    with httpx.Client(timeout=7200) as client:
        for round_index in range(rounds):
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for name in order:
                service = services[name]
                count = per_round
                indices = list(range(round_index * per_round, round_index * per_round + count))
                with ThreadPoolExecutor(len(indices)) as pool:  # one request per item: they share a batch
                    started = time.perf_counter()
                    vectors = list(pool.map(partial(send, client, service.url), indices))
                    service.seconds.append(time.perf_counter() - started)
                service.items.append(count)
                service.vectors.update(zip(indices, vectors, strict=True))
                print(
                    f"round {round_index + 1} {name:>8}: {count} in {service.seconds[-1]:.1f} s "
                    f"({count / service.seconds[-1]:.3f}/s)",
                    flush=True,
                )


def print_speed(services: dict[str, Service], unit: str) -> None:
    base = services["float32"]
    print(f"\n| | {unit}/s (all rounds) | per round | ratio to float32 |")
    print("|---|---|---|---|")
    for service in services.values():
        rounds = ", ".join(f"{n / s:.3f}" for n, s in zip(service.items, service.seconds, strict=True))
        print(
            f"| {service.name} ({service.info['dtype']}) | {service.rate:.3f} | {rounds} | "
            f"{service.rate / base.rate:.3f}x |"
        )


def print_vector_fidelity(services: dict[str, Service], what: str) -> None:
    base = services["float32"]
    for name in ("auto", "bfloat16"):
        other = services[name]
        shared = sorted(set(other.vectors) & set(base.vectors))
        got = np.stack([other.vectors[i] for i in shared])
        expected = np.stack([base.vectors[i] for i in shared])
        cos = cosines(got, expected)
        print(
            f"{what}, {name} ({other.info['dtype']}) against float32: {len(shared)} vectors, cosine min "
            f"{cos.min():.6f} median {statistics.median(cos.tolist()):.6f}, largest difference of a value "
            f"{np.abs(got - expected).max():.2e}"
        )


def post_ok(client: httpx.Client, url: str, **request: Any) -> httpx.Response:
    response = client.post(url, **request)
    if response.status_code != 200:
        raise RuntimeError(f"{url}: {response.status_code} {response.text[:500]}")
    return response


# --- images: siglip2_embed.py --------------------------------------------------------------------------------------


def bench_images(args: argparse.Namespace) -> None:
    model = model_folder(args.model)
    count = args.rounds * args.images
    photos = [image_bytes(photo_like(1600, 1200, seed=index), "JPEG", quality=90) for index in range(count)]
    print(
        f"model {args.model}; {args.rounds} rounds of {args.images} images for each service, "
        "1600 x 1200 JPEGs, one per request, concurrent",
        flush=True,
    )

    def send(client: httpx.Client, url: str, index: int) -> np.ndarray:
        files = {"file": (f"{index}.jpg", photos[index], "image/jpeg")}
        return np.asarray(post_ok(client, url + "/embed/image", files=files).json()["embedding"], np.float32)

    with ExitStack() as stack:
        services = start_services(stack, "siglip2_embed.py", "SIGLIP2_", model)
        run_rounds(services, send, args.rounds, args.images)
        print_speed(services, "images")
        print()
        print_vector_fidelity(services, "/embed/image")
        similarity(services, photos[: args.similarity_images])


def similarity(services: dict[str, Service], photos: list[bytes]) -> None:
    """One /similarity request (every text, ``photos``) to float32 and to bfloat16: vectors, probabilities, cosines."""
    answers = {}
    with httpx.Client(timeout=7200) as client:
        for name in ("float32", "bfloat16"):
            files = [("files", (f"{index}.jpg", data, "image/jpeg")) for index, data in enumerate(photos)]
            data = {"texts": json.dumps(TEXTS), "return_embeddings": "true"}
            started = time.perf_counter()
            answers[name] = post_ok(client, services[name].url + "/similarity", files=files, data=data).json()
            print(
                f"/similarity {name}: {len(photos)} images x {len(TEXTS)} texts in "
                f"{time.perf_counter() - started:.1f} s",
                flush=True,
            )
    base, other = answers["float32"], answers["bfloat16"]
    for key, what in (("image_embeddings", "images"), ("text_embeddings", "SigLIP texts")):
        cos = cosines(np.asarray(other[key]), np.asarray(base[key]))
        print(
            f"/similarity {what}, bfloat16 against float32: {len(cos)} vectors, cosine min {cos.min():.6f} "
            f"median {statistics.median(cos.tolist()):.6f}"
        )
    probabilities = np.asarray(base["similarities"]), np.asarray(other["similarities"])
    pair_cosines = np.asarray(base["cosine"]), np.asarray(other["cosine"])
    moved = float(np.abs(pair_cosines[1] - pair_cosines[0]).max())
    info = services["float32"].info
    print(
        f"/similarity probabilities ({probabilities[0].size} pairs, float32's from {probabilities[0].min():.4f} to "
        f"{probabilities[0].max():.4f} with this checkpoint's logit scale {info['logit_scale']:.4f} and bias "
        f"{info['logit_bias']:.4f}): largest difference {np.abs(probabilities[1] - probabilities[0]).max():.2e}"
    )
    steepest = math.exp(TRAINED_LOGIT_SCALE) / 4  # d sigmoid(c * e^s + b) / dc at probability 0.5
    print(
        f"/similarity pair cosines: largest difference {moved:.2e}; at a trained logit scale of "
        f"{TRAINED_LOGIT_SCALE} it would move a probability near 0.5 by up to {moved * steepest:.2e}"
    )


# --- texts: qwen3_embed.py ------------------------------------------------------------------------------------------


def text_of(index: int) -> str:
    base = TEXTS[index % len(TEXTS)]
    return base if index < len(TEXTS) else f"{base}, number {index}"


def bench_texts(args: argparse.Namespace) -> None:
    model = model_folder(args.model)
    print(
        f"model {args.model}; {args.rounds} rounds of {args.texts} texts for each service, one per request, concurrent",
        flush=True,
    )

    def send(client: httpx.Client, url: str, index: int) -> np.ndarray:
        answer = post_ok(client, url + "/embed/text", json={"text": text_of(index)}).json()
        return np.asarray(answer["embedding"], np.float32)

    with ExitStack() as stack:
        services = start_services(stack, "qwen3_embed.py", "QWEN3_", model)
        run_rounds(services, send, args.rounds, args.texts)
        print_speed(services, "texts")
        print()
        print_vector_fidelity(services, "/embed/text")
        texts = [text_of(index) for index in range(args.texts)]  # the first round's
        with httpx.Client(timeout=7200) as client:
            openai = {
                name: [
                    item["embedding"]
                    for item in post_ok(client, services[name].url + "/v1/embeddings", json={"input": texts}).json()[
                        "data"
                    ]
                ]
                for name in ("float32", "bfloat16")
            }
            states = {
                name: load_safetensors(
                    post_ok(client, services[name].url + "/embed/tokens", json={"texts": texts}).content
                )
                for name in ("float32", "bfloat16")
            }
        cos = cosines(np.asarray(openai["bfloat16"]), np.asarray(openai["float32"]))
        print(f"/v1/embeddings, bfloat16 against float32: {len(cos)} vectors, cosine min {cos.min():.6f}")
        rows = [
            cosines(states["bfloat16"][key].float().numpy(), states["float32"][key].float().numpy())
            for key in states["float32"]
        ]
        every = np.concatenate(rows)
        dtypes = {name: {str(t.dtype) for t in tensors.values()} for name, tensors in states.items()}
        print(
            f"/embed/tokens, bfloat16 against float32 (states in {dtypes}): {every.size} token states, cosine min "
            f"{every.min():.6f} median {statistics.median(every.tolist()):.6f}"
        )


def describe_machine() -> str:
    capabilities = torch.cpu.get_capabilities()
    return (
        f"{capabilities.get('cpu_name', '?')} ({capabilities['architecture']}, torch's kernels "
        f"{torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{memory_available_gb():.1f} GB available"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    images = commands.add_parser("images", help="siglip2_embed.py")
    images.add_argument("--model", default="so400m", help="a model folder, or a name of bench/models.py")
    images.add_argument("--rounds", type=int, default=3)
    images.add_argument("--images", type=int, default=2, help="per round and service")
    images.add_argument("--similarity-images", type=int, default=2)
    texts = commands.add_parser("texts", help="qwen3_embed.py")
    texts.add_argument("--model", default="qwen3-4layers", help="a model folder, or a name of bench/models.py")
    texts.add_argument("--rounds", type=int, default=3)
    texts.add_argument("--texts", type=int, default=8, help="per round and service")
    args = parser.parse_args()
    print(describe_machine(), flush=True)
    (bench_images if args.command == "images" else bench_texts)(args)


if __name__ == "__main__":
    main()
