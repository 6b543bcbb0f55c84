"""Ray Serve scale-out: throughput of 2 replicas vs 1 through Serve's proxy, and adapter
affinity, in one run on a local Ray instance (loopback only).

    python -m bench.ray_scale [--requests 400] [--concurrency 8] [--clip-model DIR]

Each replica gets the same share: ``cores // 2`` CPUs and torch threads, so the 1-replica
run leaves half the machine idle and the 2-replica run uses all of it (the proxy and the
load generator share the same cores). The default model is the tiny random CLIP of the
tests: the figures say what Serve's routing adds and how replicas scale, not model speed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .loadgen import check_loopback
from .payloads import Body, multipart

LABELS = ["cat", "dog", "boat", "car", "tree"]
REPLICA_HEADER = "x-promptswap-replica"
TOKEN = "ray-scale-bench-token"


@dataclass
class Phase:
    sent: int = 0
    ok: int = 0
    wall_s: float = 0.0
    failures: Counter = field(default_factory=Counter)
    replicas: dict[str | None, Counter] = field(default_factory=dict)  # model id -> replica counts

    @property
    def throughput(self) -> float:
        return self.ok / self.wall_s if self.wall_s else 0.0


async def load(url: str, bodies: list[tuple[Body, str | None]], n: int, concurrency: int) -> Phase:
    """``n`` requests from ``concurrency`` closed-loop clients; body i % len(bodies), sent
    with its multiplexed model id header when it has one."""
    check_loopback(url)
    phase = Phase()
    next_i = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in next_i:
            body, model_id = bodies[i % len(bodies)]
            headers = {"content-type": body.content_type}
            if model_id:
                headers["serve_multiplexed_model_id"] = model_id
            phase.sent += 1
            try:
                r = await client.post(f"{url}/v1/classify", content=body.content, headers=headers)
            except httpx.HTTPError as exc:
                phase.failures[type(exc).__name__] += 1
                continue
            if r.status_code != 200:
                phase.failures[f"status {r.status_code}"] += 1
                continue
            phase.ok += 1
            phase.replicas.setdefault(model_id, Counter())[r.headers.get(REPLICA_HEADER)] += 1

    async with httpx.AsyncClient(timeout=120, limits=limits, trust_env=False) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        phase.wall_s = time.perf_counter() - started
    return phase


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ray_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="requests per phase")
    parser.add_argument("--concurrency", type=int, default=8, help="clients in flight")
    parser.add_argument("--clip-model", default=None, help="CLIP directory (default: the tests' tiny CLIP)")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    repo = str(Path(__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    import ray
    from ray import serve

    from fixtures.adapters import adapter_bytes
    from fixtures.images import encode, make_image
    from service.ray_serve import APP_NAME, make_app
    from service.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="ray-scale-"))
    clip_dir = Path(args.clip_model) if args.clip_model else None
    if clip_dir is None:
        from fixtures.tiny_models import save_tiny_clip

        clip_dir = save_tiny_clip(work / "tiny-clip")
    cores = os.cpu_count() or 2
    share = max(1, cores // 2)
    settings = Settings(
        clip_model=str(clip_dir),
        device="cpu",
        dtype="float32",
        torch_threads=share,
        decode_threads=share,
        adapter_dir=work / "adapters",
        admin_token=TOKEN,
    )
    images = [encode(make_image(seed)) for seed in range(8)]
    plain = [(multipart(image, LABELS), None) for image in images]
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
    results: dict[str, Phase] = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for replicas in (1, 2):
            # Redeploying with another count scales the running application in place.
            serve.run(
                make_app(settings, num_replicas=replicas, ray_actor_options={"num_cpus": share}),
                name=APP_NAME,
                route_prefix="/",
            )
            asyncio.run(load(url, plain, 4 * args.concurrency, args.concurrency))  # warm-up
            results[f"{replicas} replica(s)"] = asyncio.run(load(url, plain, args.requests, args.concurrency))

        for name, seed in (("pets", 0), ("cars", 1)):
            httpx.post(
                f"{url}/v1/admin/adapters",
                headers={"Authorization": f"Bearer {TOKEN}"},
                files={"file": ("a.safetensors", adapter_bytes(clip_dir, name, seed=seed))},
            ).raise_for_status()
        mixed = [
            (multipart(image, LABELS, adapter=name), name) for image in images for name in ("pets", "cars")
        ]
        for first in mixed[:2]:
            # An adapter's first request picks the replica advertising the fewest adapters;
            # the router learns of it ~0.1-1 s later (sent together, both would often share
            # one home: Serve only spills to another replica once the home is full).
            asyncio.run(load(url, [first], 1, 1))
            time.sleep(1.0)
        results["2 replicas, adapters"] = asyncio.run(load(url, mixed, args.requests, args.concurrency))
    finally:
        serve.shutdown()
        ray.shutdown()

    print(
        f"command: python -m bench.ray_scale {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip()
    )
    print(
        f"machine: {cores} cores; each replica {share} CPU(s), {share} torch thread(s); model {clip_dir.name}"
    )
    print(f"{'phase':<24}{'requests':>9}{'failed':>8}{'req/s':>9}  replicas")
    for label, phase in results.items():
        spread = {model: dict(counts) for model, counts in phase.replicas.items()}
        print(
            f"{label:<24}{phase.sent:>9}{sum(phase.failures.values()):>8}{phase.throughput:>9.1f}  {spread}"
        )
    one, two = results["1 replica(s)"], results["2 replica(s)"]
    print(f"throughput 2 vs 1 replicas: {two.throughput / one.throughput:.2f}x")
    for model, counts in results["2 replicas, adapters"].replicas.items():
        print(
            f"affinity {model}: {max(counts.values()) / sum(counts.values()):.1%} of its requests on its main replica"
        )
    failed = sum(sum(p.failures.values()) for p in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
