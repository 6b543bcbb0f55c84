"""Overload: far more concurrent clients than a small queue admits, then a quiet phase.

    python -m bench.overload [--seconds 60] [--clients 64] [--max-queue 8]

Starts ``python -m service serve`` on the tiny random CLIP (fixtures.tiny_models) with a
small ``--max-queue`` and ``--max-batch-size``, drives it from ``--clients`` closed-loop
loopback clients for a bounded time (a refused client retries at once: the worst case),
then stops the load and sends sequential probes. Reports the share of 429/503 refusals
and whether each carried Retry-After, latency percentiles of admitted vs refused
requests, the server's RSS during load (from /proc/<pid>/status), and whether the first
requests after the load drops succeed at once. Prints markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter

import httpx

from fixtures.images import encode, make_image

from . import servers
from .loadgen import check_loopback
from .models import ensure_tiny_clip
from .soak import rss_mb, rss_sampler

LABELS = ["cat", "dog", "boat"]


def pct(xs: list[float], q: float) -> str:
    if not xs:
        return "–"
    xs = sorted(xs)
    return f"{xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))] * 1000:.1f}"


def server_time_s(response: httpx.Response | None) -> float | None:
    timing = response.headers.get("server-timing", "") if response is not None else ""
    _, found, ms = timing.partition("app;dur=")
    return float(ms) / 1000 if found else None


async def overload(args: argparse.Namespace) -> None:
    clip_dir = ensure_tiny_clip()
    port = servers.free_port()
    argv = servers.service_argv(
        clip_dir,
        port,
        servers.REPO / "bench" / "out" / "overload-adapters",
        max_queue=args.max_queue,
        max_batch_size=args.max_batch_size,
        max_wait_ms=2,
        request_timeout_s=30,
    )
    server = servers.start("overload", argv, {"PROMPTSWAP_DTYPE": "float32"}, port)
    check_loopback(server.url)
    url = server.url + "/v1/classify"
    pngs = [encode(make_image(i)) for i in range(8)]
    admitted: list[float] = []
    refused: list[float] = []
    # The service's own time to answer (its Server-Timing header): what is left of the
    # client's latency is the kernel's accept queue and this load generator itself.
    served_in: dict[str, list[float]] = {"admitted (200)": [], "refused (429/503)": []}
    statuses: Counter = Counter()
    retry_after: Counter = Counter()  # status -> refusals with a Retry-After header
    errors: Counter = Counter()
    samples: list[tuple[float, float]] = []
    stop = asyncio.Event()

    async def post(client: httpx.AsyncClient, i: int) -> tuple[int | None, float, httpx.Response | None]:
        t0 = time.monotonic()
        try:
            resp = await client.post(
                url, files={"image": ("i.png", pngs[i % len(pngs)])}, data={"labels": LABELS}
            )
        except httpx.HTTPError as exc:
            errors[type(exc).__name__] += 1
            return None, time.monotonic() - t0, None
        return resp.status_code, time.monotonic() - t0, resp

    async def client_loop(client: httpx.AsyncClient, c: int, deadline: float) -> None:
        for i in range(args.max_requests):
            if time.monotonic() > deadline:
                return
            status, dt, resp = await post(client, c + i)
            if status is None:
                continue
            statuses[status] += 1
            own = server_time_s(resp)
            if status == 200:
                admitted.append(dt)
                if own is not None:
                    served_in["admitted (200)"].append(own)
            elif status in (429, 503):
                refused.append(dt)
                if own is not None:
                    served_in["refused (429/503)"].append(own)
                if resp.headers.get("retry-after", "").isdigit():
                    retry_after[status] += 1

    try:
        limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
        async with httpx.AsyncClient(timeout=args.timeout, limits=limits, trust_env=False) as client:
            warm = [await post(client, i) for i in range(3)]
            idle_rss = rss_mb(server.proc.pid)
            started = time.monotonic()
            sampler = asyncio.ensure_future(
                rss_sampler(server.proc.pid, samples, started, stop, args.rss_every)
            )
            deadline = started + args.seconds
            await asyncio.gather(*(client_loop(client, c, deadline) for c in range(args.clients)))
            load_wall = time.monotonic() - started
            stop.set()
            await sampler
            # Load dropped: probes one after another, at once and again after a pause.
            probes_now = [await post(client, 1000 + i) for i in range(args.probes)]
            await asyncio.sleep(args.quiet)
            probes_later = [await post(client, 2000 + i) for i in range(args.probes)]
            end_rss = rss_mb(server.proc.pid)
        alive = server.proc.poll() is None
    finally:
        stop.set()
        server.stop()

    total = sum(statuses.values()) + sum(errors.values())
    n_ref = sum(statuses[s] for s in (429, 503))
    print(
        f"## Overload: {args.clients} closed-loop clients for {load_wall:.0f} s against "
        f"`--max-queue {args.max_queue} --max-batch-size {args.max_batch_size}` (tiny CLIP, CPU)\n"
    )
    print(
        f"Server: `python {' '.join(argv)}` (alive at the end: {alive}; warm-up statuses "
        f"{[s for s, _, _ in warm]})\n"
    )
    print(
        f"Requests answered during load: {total}, of which 200: {statuses[200]} "
        f"({statuses[200] / load_wall:.1f}/s); refused 429/503: {n_ref} "
        f"(**{100 * n_ref / max(total, 1):.1f} %**); other: "
        f"{ {s: n for s, n in statuses.items() if s not in (200, 429, 503)} }; transport errors: {dict(errors)}\n"
    )
    for s in (429, 503):
        if statuses[s]:
            print(
                f"- {s}: {statuses[s]}, with a numeric Retry-After: {retry_after[s]} "
                f"({100 * retry_after[s] / statuses[s]:.1f} %)"
            )
    print("\n| latency (ms) | n | p50 | p95 | p99 | max |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, xs in (("admitted (200)", admitted), ("refused (429/503)", refused)):
        print(
            f"| {name}, at the client | {len(xs)} | {pct(xs, 50)} | {pct(xs, 95)} | {pct(xs, 99)} | {pct(xs, 100)} |"
        )
    for name, xs in served_in.items():
        print(
            f"| {name}, in the service | {len(xs)} | {pct(xs, 50)} | {pct(xs, 95)} | {pct(xs, 99)} | {pct(xs, 100)} |"
        )
    rss = [mb for _, mb in samples]
    if rss:
        print(
            f"\nRSS (MB): idle before load {idle_rss:.1f}; during load min {min(rss):.1f}, "
            f"peak {max(rss):.1f}; after the quiet phase {end_rss:.1f}"
        )
        print("\n| t (s) | RSS (MB) |\n|---:|---:|")
        for t, mb in samples:
            print(f"| {t:.0f} | {mb:.1f} |")
    print(
        f"\nRecovery — sequential probes right after the load stopped, then after {args.quiet:.0f} s quiet:\n"
    )
    print("| probe | statuses | latencies (ms) |")
    print("|---|---|---|")
    for name, probes in (("immediately", probes_now), (f"after {args.quiet:.0f} s", probes_later)):
        print(f"| {name} | {[s for s, _, _ in probes]} | {[round(dt * 1000, 1) for _, dt, _ in probes]} |")
    first_ok = next((i for i, (s, _, _) in enumerate(probes_now) if s == 200), None)
    print(
        f"\nFirst request after the load: {'succeeded' if first_ok == 0 else f'first 200 at probe {first_ok}'}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--max-requests", type=int, default=100000, help="per client")
    parser.add_argument("--timeout", type=float, default=30)
    parser.add_argument("--probes", type=int, default=10)
    parser.add_argument("--quiet", type=float, default=3, help="seconds of quiet before the second probes")
    parser.add_argument("--rss-every", type=float, default=5)
    args = parser.parse_args()
    if not 0 < args.seconds <= 300:
        parser.error("--seconds must be in (0, 300]")
    asyncio.run(overload(args))


if __name__ == "__main__":
    main()
