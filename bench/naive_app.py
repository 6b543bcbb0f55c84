"""The server a user would write first: FastAPI + transformers' zero-shot pipeline.

One ``pipeline`` call per request (text encoded every time, batch of one), a plain
``def`` route so FastAPI runs it in its thread pool. Same multipart body as
promptswap's ``/v1/classify`` (``image`` file, ``labels`` as a JSON array).
Run: ``NAIVE_MODEL=DIR uvicorn bench.naive_app:app --host 127.0.0.1 --port 8001``.
"""

from __future__ import annotations

import io
import json
import os
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, File, Form, UploadFile
from PIL import Image
from transformers import pipeline

state: dict = {}


@asynccontextmanager
async def lifespan(app: FastAPI):
    dtype = getattr(torch, os.environ.get("NAIVE_DTYPE", "float32"))
    state["pipe"] = pipeline(
        "zero-shot-image-classification", model=os.environ["NAIVE_MODEL"], device="cpu", dtype=dtype
    )
    yield


app = FastAPI(lifespan=lifespan)


@app.get("/readyz")
def readyz() -> dict:
    return {"status": "ready"}


@app.post("/v1/classify")
def classify(image: UploadFile = File(...), labels: str = Form(...)) -> dict:
    picture = Image.open(io.BytesIO(image.file.read())).convert("RGB")
    return {"labels": state["pipe"](picture, candidate_labels=json.loads(labels))}
