"""MaPLe adapter files in the real shapes (n_ctx 2, depth 9), uploaded via the admin API."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

import fixtures.adapters

N_CTX, DEPTH = 2, 9  # MaPLe's published defaults


def adapter_bytes(model_dir: Path, name: str, seed: int) -> bytes:
    # Scaled like token embeddings, so prompted forwards see realistic magnitudes.
    return fixtures.adapters.adapter_bytes(
        model_dir,
        name,
        seed,
        n_ctx=N_CTX,
        depth=DEPTH,
        scale=0.02,
        hyperparameters={"template": "a photo of a {}."},
    )


async def upload(client: httpx.AsyncClient, base_url: str, token: str, name: str, data: bytes) -> dict:
    resp = await client.post(
        f"{base_url}/v1/admin/adapters",
        headers={"authorization": f"Bearer {token}"},
        files={"file": (f"{name}.safetensors", data, "application/octet-stream")},
        data={"name": name},
    )
    resp.raise_for_status()
    return resp.json()


async def upload_many(base_url: str, token: str, files: dict[str, bytes], concurrency: int = 4) -> None:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=60, trust_env=False) as client:

        async def one(name: str, data: bytes) -> None:
            async with sem:
                await upload(client, base_url, token, name, data)

        await asyncio.gather(*(one(n, d) for n, d in files.items()))
