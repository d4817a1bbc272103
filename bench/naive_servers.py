"""The naive baselines every benchmark figure is a ratio against: the straightforward design
these services replaced.

One request -> one reference-processor call (transformers' own image processor / tokenizer, full JPEG decode,
padding to 512 as Z-Image does) -> one forward pass. No batching, no draft decoding, no dead-layer removal, plain
JSON. Written the way a straightforward FastAPI server would be (sync endpoints run in FastAPI's thread pool).

    python -m bench.naive_servers images --model PATH --port 6110
    python -m bench.naive_servers texts --model PATH --port 6111

And the framework's floor, for the request path: ``floor`` is FastAPI on uvicorn with nothing of ours, a pydantic
body in and a fixed 2560-float vector out through orjson, no model (what any FastAPI text route costs at least).

    python -m bench.naive_servers floor --port 6112
"""

from __future__ import annotations

import argparse
import io
import threading
from pathlib import Path
from typing import Any

import orjson
import torch
import uvicorn
from fastapi import FastAPI, File, Response, UploadFile
from PIL import Image
from pydantic import BaseModel


class TextRequest(BaseModel):
    text: str


def image_app(model_path: str, device: str, dtype: torch.dtype) -> FastAPI:
    from transformers import AutoImageProcessor, SiglipModel

    model = SiglipModel.from_pretrained(model_path, dtype=dtype).to(device).eval()  # type: ignore[arg-type]
    processor = AutoImageProcessor.from_pretrained(model_path)
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/embed/image")
    def embed_image(file: UploadFile = File(...)) -> dict[str, Any]:
        image = Image.open(io.BytesIO(file.file.read())).convert("RGB")
        inputs = processor(images=image, return_tensors="pt").to(device)
        with torch.no_grad():
            features = model.get_image_features(pixel_values=inputs["pixel_values"].to(dtype)).pooler_output
        vector = torch.nn.functional.normalize(features.float(), dim=-1)[0]
        return {"embedding": vector.cpu().tolist(), "dimension": len(vector)}

    return app


def text_app(model_path: str, device: str, dtype: torch.dtype) -> FastAPI:
    from transformers import AutoModel, AutoTokenizer

    root = Path(model_path)
    sub = ("text_encoder", "tokenizer") if (root / "text_encoder").is_dir() else ("", "")
    model = AutoModel.from_pretrained(model_path, subfolder=sub[0], dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path, subfolder=sub[1])
    lock = threading.Lock()  # one forward at a time, as a single-model server would
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/embed/text")
    def embed_text(body: TextRequest) -> dict[str, Any]:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": body.text}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        batch = tokenizer([prompt], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
        batch = batch.to(device)
        with lock, torch.no_grad():
            hidden = model(**batch, output_hidden_states=True).hidden_states[-2]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        vector = torch.nn.functional.normalize(((hidden * mask).sum(1) / mask.sum(1)).float(), dim=-1)[0]
        return {"embedding": vector.cpu().tolist(), "dimension": len(vector)}

    return app


def floor_app() -> FastAPI:
    vector = [0.001 * index for index in range(2560)]
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/embed/text")
    async def embed_text(body: TextRequest) -> Response:
        return Response(orjson.dumps({"embedding": vector, "dimension": len(vector)}), media_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["images", "texts", "floor"])
    parser.add_argument("--model", help="the model folder (images, texts)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    if args.kind == "floor":
        app = floor_app()
    elif args.model is None:
        parser.error(f"{args.kind} needs --model")
    else:
        app = (image_app if args.kind == "images" else text_app)(args.model, args.device, dtype)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
