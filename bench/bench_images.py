"""Image service throughput against the naive baseline, measured in the same run.

    python -m bench.bench_images [--model tiny-512|so400m|PATH] --photos DIR [--clients 16] [--requests 160]

Prints, for 12 MP baseline JPEGs made from the photos (4000 x 3000, as phones write them) and for the photos as
they are: images/s and p50/p95/p99 latency of the naive server (one request -> reference processor -> one forward)
and of siglip2_embed.py, and their ratio. Also decoding + preprocessing alone, ours vs the reference processor.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import aiohttp
import numpy as np
from PIL import Image

from bench.loadgen import ROOT, compare_with_baseline, post_file
from bench.models import add_model_arguments, model_from_arguments

OUT = ROOT / "bench" / "out"


def camera_jpegs(photos: Path, out: Path) -> list[Path]:
    """4000 x 3000 baseline JPEGs (quality 90, 4:2:0), cropped and scaled from the photos."""
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for photo in sorted(photos.glob("*.jpg")):
        target = out / f"{photo.stem}-12mp.jpg"
        if not target.exists():
            image = Image.open(photo).convert("RGB")
            width, height = image.size
            crop_h = min(height, width * 3 // 4)
            crop_w = crop_h * 4 // 3
            left, top = (width - crop_w) // 2, (height - crop_h) // 2
            image = image.crop((left, top, left + crop_w, top + crop_h)).resize((4000, 3000), Image.Resampling.LANCZOS)
            image.save(target, "JPEG", quality=90, progressive=False, subsampling="4:2:0")
        made.append(target)
    return made


def preprocessing_only(model_path: Path, files: list[Path], rounds: int) -> tuple[float, float]:
    """Seconds per image on one thread: the reference processor vs our decode + resize + normalise."""
    from transformers import AutoImageProcessor

    from common.images import ImageSpec, prepare_image

    processor = AutoImageProcessor.from_pretrained(model_path)
    spec = ImageSpec(processor.size["height"], processor.size["width"], Image.Resampling.BILINEAR, 10**9)
    datas = [path.read_bytes() for path in files]

    def reference(data: bytes) -> np.ndarray:
        return processor(images=Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="np")["pixel_values"]

    def ours(data: bytes) -> np.ndarray:
        # Normalising is done on the device in the service; count an equivalent CPU cost here to be fair.
        return (prepare_image(data, spec).astype(np.float32) / 255.0 - 0.5) / 0.5

    timings = []
    for function in (reference, ours):
        function(datas[0])
        started = time.perf_counter()
        for _ in range(rounds):
            for data in datas:
                function(data)
        timings.append((time.perf_counter() - started) / (rounds * len(datas)))
    return timings[0], timings[1]


def throughput(model_path: Path, files: list[Path], label: str, args: argparse.Namespace) -> list[str]:
    datas = [(path.name, path.read_bytes()) for path in files]

    async def one_image(session: aiohttp.ClientSession, index: int, url: str) -> int:
        name, data = datas[index % len(datas)]
        return await post_file(session, f"{url}/embed/image", "file", name, data)

    return compare_with_baseline(
        "images", "siglip2_embed.py", model_path, args.device, one_image, args.clients, args.requests, label, "img"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, tiny="tiny-512", full_size="so400m")
    parser.add_argument(
        "--photos",
        type=Path,
        required=True,
        help="a folder of real JPEG photos (the figures in bench/RESULTS.md: eight 1920 px camera photos)",
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--skip-1920", action="store_true", help="only the 12 MP set")
    args = parser.parse_args()

    model_path = model_from_arguments(args)
    twelve = camera_jpegs(args.photos, OUT / "12mp")
    model = args.random_weights or args.model
    lines = [f"model {model} on {args.device}; {args.clients} clients, one image per request"]
    reference, ours = preprocessing_only(model_path, twelve, rounds=2)
    lines.append(
        f"decode+preprocess 12 MP, one thread: reference {reference * 1000:.1f} ms/img, ours {ours * 1000:.1f} ms/img, "
        f"ratio {reference / ours:.2f}x"
    )
    lines += throughput(model_path, twelve, "12 MP JPEG", args)
    if not args.skip_1920:
        lines += throughput(model_path, sorted(args.photos.glob("*.jpg")), "1920 px photos", args)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
