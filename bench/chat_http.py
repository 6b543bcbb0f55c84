"""Chat throughput on the tiny LLaVA (CPU): decode tokens/s for 1 and 8 concurrent
clients, and the cost of mixing adapters in one batch versus one adapter.

    python -m bench.chat_http [--requests 16] [--max-tokens 48]

A real `promptswap serve --llava-model` process on loopback; tokens/s counts the
completion tokens the server reports over the wall time of the scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import shutil
import time
from pathlib import Path

import httpx
import torch
from PIL import Image
from transformers import LlavaConfig

from adapters.format import dump
from adapters.m2pt import M2ptConfig, M2ptPromptLearner, fold, llava_fingerprint
from tests.llava_fixtures import save_tiny_llava

from .models import OUT
from .servers import free_port, start

TOKEN = "bench-token"


def photo(seed: int) -> str:
    rng = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(240, 320, 3, generator=rng) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return base64.b64encode(buf.getvalue()).decode()


def adapter_file(model_dir: Path, name: str, seed: int) -> bytes:
    torch.manual_seed(seed)
    config = M2ptConfig.for_llava(LlavaConfig.from_pretrained(model_dir), n_vision=4, n_text=4)
    return dump(
        fold(M2ptPromptLearner(config)),
        name=name,
        backbone=llava_fingerprint(LlavaConfig.from_pretrained(model_dir)),
    )


async def scenario(
    url: str, clients: int, requests: int, max_tokens: int, adapters: list[str | None]
) -> dict:
    images = [photo(i) for i in range(8)]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    tokens = 0
    failures = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, failures
        while not queue.empty():
            i = queue.get_nowait()
            body = {
                "image": images[i % len(images)],
                "instruction": "describe the picture in detail",
                "max_tokens": max_tokens,
            }
            adapter = adapters[i % len(adapters)]
            if adapter is not None:
                body["adapter"] = adapter
            r = await http.post(f"{url}/v1/chat", json=body)
            if r.status_code == 200:
                tokens += r.json()["usage"]["completion_tokens"]
            else:
                failures += 1

    async with httpx.AsyncClient(timeout=300) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - started
    return {
        "clients": clients,
        "requests": requests,
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "failures": failures,
    }


async def run(requests: int, max_tokens: int) -> list[tuple[str, dict]]:
    model_dir = OUT / "tiny-llava"
    if not (model_dir / "config.json").exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        save_tiny_llava(model_dir)
    port = free_port()
    shutil.rmtree(OUT / "chat-adapters", ignore_errors=True)  # a fresh store each run
    argv = [
        "-m",
        "service",
        "serve",
        "--clip-model",
        "",
        "--llava-model",
        str(model_dir),
        "--device",
        "cpu",
        "--port",
        str(port),
        "--chat-max-batch-size",
        "16",
        "--log-level",
        "warning",
        "--adapter-dir",
        str(OUT / "chat-adapters"),
    ]
    server = start("chat", argv, {"PROMPTSWAP_ADMIN_TOKEN": TOKEN}, port)
    try:
        async with httpx.AsyncClient() as http:
            for i in range(4):
                r = await http.post(
                    f"{server.url}/v1/admin/adapters",
                    headers={"Authorization": f"Bearer {TOKEN}"},
                    files={"file": ("a", adapter_file(model_dir, f"task{i}", i))},
                )
                r.raise_for_status()
        await scenario(server.url, 4, 8, 8, [None])  # warm-up
        return [
            ("1 client, no adapter", await scenario(server.url, 1, requests // 2, max_tokens, [None])),
            ("8 clients, no adapter", await scenario(server.url, 8, requests, max_tokens, [None])),
            ("8 clients, one adapter", await scenario(server.url, 8, requests, max_tokens, ["task0"])),
            (
                "8 clients, 4 adapters + none",
                await scenario(
                    server.url, 8, requests, max_tokens, ["task0", "task1", None, "task2", "task3"]
                ),
            ),
        ]
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    results = asyncio.run(run(args.requests, args.max_tokens))
    print("| scenario | requests | completion tokens | seconds | decode tokens/s | failures |")
    print("|---|---|---|---|---|---|")
    for name, r in results:
        print(
            f"| {name} | {r['requests']} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} | {r['failures']} |"
        )
    base = results[0][1]["tokens_per_s"]
    print(f"\n8 clients / 1 client: {results[1][1]['tokens_per_s'] / base:.2f}x")
    print(
        f"mixed adapters / one adapter: {results[3][1]['tokens_per_s'] / results[2][1]['tokens_per_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
