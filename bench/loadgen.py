"""Async load generator: a fixed number of requests from N concurrent clients, loopback only.

Each client sends its next request as soon as its previous one is answered (closed
loop), so throughput is what the server sustains with N requests in flight. The run
is bounded: past ``max_seconds`` no new request is sent and the result says so.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx

from .payloads import Body

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"the benchmark only sends traffic to 127.0.0.1, not {host!r}")


@dataclass
class LoadResult:
    sent: int
    ok: int
    wall_s: float
    latencies_s: list[float]  # successful requests only
    failures: Counter = field(default_factory=Counter)  # "status 503" / exception name -> n
    truncated: bool = False  # the time bound stopped the run early
    answers: list[dict] = field(default_factory=list)  # sampled JSON answers

    @property
    def throughput(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        xs = sorted(self.latencies_s)
        k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
        return xs[k]

    @property
    def failed(self) -> int:
        return sum(self.failures.values())


async def run_load(
    url: str,
    bodies: Callable[[int], Body],
    *,
    n_requests: int,
    concurrency: int,
    max_seconds: float,
    timeout_s: float = 120.0,
    keep_answers: int = 0,
    uds: str | None = None,
) -> LoadResult:
    """POST ``bodies(i)`` for i in range(n_requests) to ``url`` from ``concurrency`` clients
    (through the Unix socket ``uds`` when given: a model process behind front ends)."""
    check_loopback(url)
    counter = itertools.count()
    latencies: list[float] = []
    failures: Counter = Counter()
    answers: list[dict] = []
    deadline = time.perf_counter() + max_seconds
    sent = 0
    truncated = False
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal sent, truncated
        while True:
            i = next(counter)
            if i >= n_requests:
                return
            if time.perf_counter() > deadline:
                truncated = True
                return
            body = bodies(i)
            sent += 1
            started = time.perf_counter()
            try:
                resp = await client.post(
                    url, content=body.content, headers={"content-type": body.content_type}
                )
            except httpx.HTTPError as exc:
                failures[type(exc).__name__] += 1
                continue
            if resp.status_code == 200:
                latencies.append(time.perf_counter() - started)
                if len(answers) < keep_answers:
                    answers.append(resp.json())
            else:
                failures[f"status {resp.status_code}"] += 1

    transport = httpx.AsyncHTTPTransport(uds=uds, limits=limits) if uds else None
    async with httpx.AsyncClient(
        timeout=timeout_s, limits=limits, trust_env=False, transport=transport
    ) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return LoadResult(sent, len(latencies), wall, latencies, failures, truncated, answers)
