"""The best simple design, as a good engineer writes it in an afternoon: the baseline of
the host-cost scenario (``bench/host_cost.py``).

FastAPI, an ``asyncio.Queue`` micro-batcher (up to 32 rows or 5 ms), JPEG decode and
transformers' image processor in a thread pool, one model thread, and a label cache
(text features per label tuple). Same JSON body as promptswap's ``/v1/classify``
(``image`` as base64, ``labels``), same answer shape (labels sorted by score).
Run: ``BASELINE_MODEL=DIR uvicorn bench.baseline_app:app --host 127.0.0.1 --port 8002``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from PIL import Image
from transformers import AutoProcessor, CLIPModel

MAX_BATCH, MAX_WAIT_S = 32, 0.005
state: dict = {}


def _text_features(labels: tuple[str, ...]) -> torch.Tensor:
    cache: dict = state["label_cache"]
    if labels not in cache:
        tok = state["processor"].tokenizer(
            [f"a photo of a {x}." for x in labels], padding=True, return_tensors="pt"
        )
        feats = state["model"].get_text_features(**tok).pooler_output.float()
        cache[labels] = feats / feats.norm(dim=-1, keepdim=True)
    return cache[labels]


@torch.inference_mode()
def _run_batch(items: list[tuple[torch.Tensor, tuple[str, ...]]]) -> list[list[float]]:
    model = state["model"]
    pixels = torch.stack([p for p, _ in items]).to(model.dtype)
    image = model.get_image_features(pixel_values=pixels).pooler_output.float()
    image = image / image.norm(dim=-1, keepdim=True)
    scale = model.logit_scale.float().exp()
    return [(scale * image[i] @ _text_features(labels).T).tolist() for i, (_, labels) in enumerate(items)]


async def _batcher(queue: asyncio.Queue) -> None:
    loop = asyncio.get_running_loop()
    while True:
        batch = [await queue.get()]
        close_at = loop.time() + MAX_WAIT_S
        while len(batch) < MAX_BATCH and (left := close_at - loop.time()) > 0:
            try:
                batch.append(await asyncio.wait_for(queue.get(), left))
            except TimeoutError:
                break
        try:
            results = await loop.run_in_executor(state["model_thread"], _run_batch, [b[0] for b in batch])
        except Exception as exc:
            for _, future in batch:
                future.set_exception(exc)
            continue
        for (_, future), logits in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(logits)


@asynccontextmanager
async def lifespan(app: FastAPI):
    path = os.environ["BASELINE_MODEL"]
    dtype = getattr(torch, os.environ.get("BASELINE_DTYPE", "float32"))
    if os.environ.get("BASELINE_TORCH_THREADS"):
        torch.set_num_threads(int(os.environ["BASELINE_TORCH_THREADS"]))
    state["model"] = CLIPModel.from_pretrained(path, dtype=dtype).eval()
    state["processor"] = AutoProcessor.from_pretrained(path)
    state["label_cache"] = {}
    state["decode_pool"] = ThreadPoolExecutor(4)
    state["model_thread"] = ThreadPoolExecutor(1)
    state["queue"] = asyncio.Queue()
    task = asyncio.create_task(_batcher(state["queue"]))
    yield
    task.cancel()


app = FastAPI(lifespan=lifespan)


@app.get("/readyz")
def readyz() -> dict:
    return {"status": "ready"}


def _pixels(data: bytes) -> torch.Tensor:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return state["processor"].image_processor(images=image, return_tensors="pt")["pixel_values"][0]


@app.post("/v1/classify")
async def classify(request: Request) -> dict:
    body = json.loads(await request.body())
    labels = tuple(body["labels"])
    data = base64.b64decode(body["image"])
    loop = asyncio.get_running_loop()
    pixels = await loop.run_in_executor(state["decode_pool"], _pixels, data)
    future = loop.create_future()
    await state["queue"].put(((pixels, labels), future))
    logits = await future
    top = max(logits)
    exps = [2.718281828459045 ** (x - top) for x in logits]
    total = sum(exps)
    ranked = sorted(zip(labels, exps, logits, strict=True), key=lambda r: -r[1])
    return {"labels": [{"label": x, "score": e / total, "logit": z} for x, e, z in ranked]}
