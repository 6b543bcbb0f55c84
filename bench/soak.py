"""Soak: a real server under mixed classify + adapter churn for a bounded time.

    python -m bench.soak [--seconds 120] [--clients 6] [--cache-bytes 12000]

Starts ``python -m service serve`` on a tiny random CLIP (fixtures.tiny_models) with the
admin API on and a small ``--adapter-cache-bytes`` (so loads and evictions keep
happening), then, from loopback clients only:

- classify zero-shot, with ``adapter=name`` and with ``adapter=name@version``;
- one admin client that uploads new versions (hot swaps), deletes single versions and
  whole adapters, and re-uploads deleted names.

Every classify answer is checked against logits computed in-process with
``adapters.prompted_clip`` on the same checkpoint (abs tolerance 1e-4) for the content
the answered ``name@version`` held. A version number is never reused (not even after its
delete), but ``name`` means whichever version is latest, so the checker keeps each key's
history as intervals, with loose bounds (an upload may take effect from
the moment it is sent; a delete until its answer arrives): an answer is *wrong* if it
matches no content the key could have had while the request was in flight, and a 404 is
*wrong* only if the adapter certainly existed the whole time the request was in flight.
Lost = transport errors, timeouts and 5xx. The server's RSS is sampled from
/proc/<pid>/status every few seconds. Prints a markdown summary.

Long (over 400 lines) because the wrong-answer check needs a model of every adapter's life
(when each content could have been served) beside the load that changes it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from transformers import AutoProcessor, CLIPConfig, CLIPModel

from adapters.prompted_clip import encode_image, encode_text
from fixtures.adapters import adapter_bytes, random_folded
from fixtures.images import encode, make_image

from . import servers
from .loadgen import check_loopback
from .models import OUT, ensure_tiny_clip

TOKEN = "soak-admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
TEMPLATE = "a photo of a {}."
TOL = 1e-4
NAMES = [f"task{i}" for i in range(6)]
LABEL_SETS = [
    ("cat", "dog"),
    ("tabby cat", "golden retriever", "boat"),
    ("a red car", "a blue bicycle", "an airplane", "a tree"),
]
N_IMAGES = 4


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Reference:
    """Expected logits per (image, labels, adapter seed), computed once each, in-process."""

    def __init__(self, clip_dir: Path) -> None:
        self.model = CLIPModel.from_pretrained(clip_dir).eval()
        self.processor = AutoProcessor.from_pretrained(clip_dir)
        self.config = CLIPConfig.from_pretrained(clip_dir)
        self.images = [make_image(i) for i in range(N_IMAGES)]
        self.pngs = [encode(img) for img in self.images]
        self.cache: dict[tuple[int, tuple[str, ...], int | None], list[float]] = {}

    def logits(
        self, image: int, labels: tuple[str, ...], seed: int | None, text_seed: int | None | str = "same"
    ) -> list[float]:
        """``text_seed`` other than "same": image prompts of ``seed``, text prompts of
        ``text_seed`` (diagnoses a text embedding cached for an earlier content)."""
        if text_seed != "same":
            inputs = self.processor(
                text=[TEMPLATE.format(x) for x in labels],
                images=self.images[image],
                return_tensors="pt",
                padding=True,
            )
            fi, ft = (random_folded(self.config, s) if s is not None else None for s in (seed, text_seed))
            with torch.inference_mode():
                img = encode_image(self.model, inputs["pixel_values"], fi.vision[None] if fi else None)
                txt = encode_text(
                    self.model,
                    inputs["input_ids"],
                    inputs["attention_mask"],
                    ft.text[None].expand(len(labels), -1, -1, -1) if ft else None,
                )
                img = img / img.norm(dim=-1, keepdim=True)
                txt = txt / txt.norm(dim=-1, keepdim=True)
                return (self.model.logit_scale.exp() * img @ txt.T)[0].tolist()
        key = (image, labels, seed)
        if key not in self.cache:
            inputs = self.processor(
                text=[TEMPLATE.format(x) for x in labels],
                images=self.images[image],
                return_tensors="pt",
                padding=True,
            )
            with torch.inference_mode():
                if seed is None:
                    img = encode_image(self.model, inputs["pixel_values"])
                    txt = encode_text(self.model, inputs["input_ids"], inputs["attention_mask"])
                else:
                    folded = random_folded(self.config, seed)
                    img = encode_image(self.model, inputs["pixel_values"], folded.vision[None])
                    txt = encode_text(
                        self.model,
                        inputs["input_ids"],
                        inputs["attention_mask"],
                        folded.text[None].expand(len(labels), -1, -1, -1),
                    )
                img = img / img.norm(dim=-1, keepdim=True)
                txt = txt / txt.norm(dim=-1, keepdim=True)
                self.cache[key] = (self.model.logit_scale.exp() * img @ txt.T)[0].tolist()
        return self.cache[key]


@dataclass
class Life:
    """One content a key held: may exist from ``loose_start`` (upload sent), certainly
    exists from ``sure_start`` (201 received) until ``sure_end`` (delete sent), may exist
    until ``loose_end`` (delete answered)."""

    seed: int
    loose_start: float
    sure_start: float = float("inf")
    sure_end: float = float("inf")
    loose_end: float = float("inf")


@dataclass
class World:
    lives: dict[str, list[Life]] = field(default_factory=dict)  # "name@v" -> history
    current: dict[str, dict[int, Life]] = field(default_factory=dict)  # name -> live versions
    ever: set[str] = field(default_factory=set)  # every key ever created
    seeds: Iterator[int] = field(default_factory=lambda: itertools.count(1000))  # adapter contents

    def possible(self, key: str, t0: float, t1: float) -> list[Life]:
        return [life for life in self.lives.get(key, []) if life.loose_start <= t1 and life.loose_end >= t0]

    def surely_existed(self, target: str, t0: float, t1: float) -> bool:
        """True if ``target`` (name or name@v) certainly resolved during all of [t0, t1]."""
        if "@" in target:
            return any(life.sure_start <= t0 and life.sure_end >= t1 for life in self.lives.get(target, []))
        spans = sorted(
            (life.sure_start, life.sure_end)
            for k, ls in self.lives.items()
            if k.split("@")[0] == target
            for life in ls
        )
        covered = t0
        for start, end in spans:
            if start > covered:
                break
            covered = max(covered, end)
            if covered >= t1:
                return True
        return False


@dataclass
class Stats:
    requests: Counter = field(default_factory=Counter)  # kind -> n
    ok: Counter = field(default_factory=Counter)
    lost: Counter = field(default_factory=Counter)  # reason -> n
    wrong: list[str] = field(default_factory=list)
    client_errors: Counter = field(default_factory=Counter)  # (kind, status, code, expected) -> n
    admin: Counter = field(default_factory=Counter)  # (op, status) -> n
    latencies: list[float] = field(default_factory=list)


async def classify_worker(
    client: httpx.AsyncClient,
    url: str,
    ref: Reference,
    world: World,
    stats: Stats,
    rng: random.Random,
    deadline: float,
    max_requests: int,
) -> None:
    for _ in range(max_requests):
        if time.monotonic() > deadline:
            return
        image, labels = rng.randrange(N_IMAGES), rng.choice(LABEL_SETS)
        roll = rng.random()
        if roll < 0.3:
            kind, target = "zero-shot", None
        elif roll < 0.65:
            kind, target = "adapter=name", rng.choice(NAMES)
        else:
            kind = "adapter=name@version"
            live = [f"{n}@{v}" for n, vs in world.current.items() for v in vs]
            if live and rng.random() < 0.85:
                target = rng.choice(live)
            elif world.ever:
                target = rng.choice(sorted(world.ever))
            else:
                target = f"{rng.choice(NAMES)}@1"
        data: dict[str, object] = {"labels": list(labels)}
        if target is not None:
            data["adapter"] = target
        stats.requests[kind] += 1
        t0 = time.monotonic()
        try:
            resp = await client.post(
                url + "/v1/classify", files={"image": ("i.png", ref.pngs[image])}, data=data
            )
        except httpx.TimeoutException:
            stats.lost["timeout"] += 1
            continue
        except httpx.HTTPError as exc:
            stats.lost[type(exc).__name__] += 1
            continue
        t1 = time.monotonic()
        if resp.status_code >= 500:
            stats.lost[f"status {resp.status_code}"] += 1
            continue
        if resp.status_code != 200:
            try:
                code = resp.json()["error"]["code"]
            except Exception:
                code = "?"
            expected = (
                resp.status_code == 404 and target is not None and not world.surely_existed(target, t0, t1)
            )
            stats.client_errors[(kind, resp.status_code, code, expected)] += 1
            if not expected:
                stats.wrong.append(f"{kind} {target}: {resp.status_code} {resp.text[:120]}")
            continue
        stats.latencies.append(t1 - t0)
        body = resp.json()
        got = {row["label"]: row["logit"] for row in body["labels"]}
        key = body.get("adapter")
        if target is None:
            candidates: list[int | None] = [None] if key is None else []
        elif key is None or key.split("@")[0] != target.split("@")[0] or ("@" in target and key != target):
            candidates = []
        else:
            candidates = [life.seed for life in world.possible(key, t0, t1)]
        if set(got) != set(labels):
            stats.wrong.append(f"{kind} {target}: labels {sorted(got)}")
            continue
        answer = [got[x] for x in labels]
        if any(
            all(abs(a - e) <= TOL for a, e in zip(answer, ref.logits(image, labels, seed), strict=False))
            for seed in candidates
        ):
            stats.ok[kind] += 1
        else:
            stale = [
                life.seed
                for life in world.lives.get(key or "", [])
                if life.seed not in candidates
                and all(
                    abs(a - e) <= TOL
                    for a, e in zip(answer, ref.logits(image, labels, life.seed), strict=False)
                )
            ]
            mixed = [
                (a.seed, b.seed)
                for a in world.lives.get(key or "", [])
                for b in world.lives.get(key or "", [])
                if a is not b
                and all(
                    abs(x - e) <= TOL
                    for x, e in zip(answer, ref.logits(image, labels, a.seed, b.seed), strict=False)
                )
            ]
            why = (
                f"matches an earlier content of {key} (seed {stale})"
                if stale
                else f"image prompts of seed {mixed[0][0]} with TEXT embeddings of earlier content seed "
                f"{mixed[0][1]} of the same key"
                if mixed
                else "matches no content"
            )
            stats.wrong.append(f"{kind} {target} -> {key}: {why}; expected seed {candidates}")


async def admin_worker(
    client: httpx.AsyncClient,
    url: str,
    clip_dir: Path,
    world: World,
    stats: Stats,
    rng: random.Random,
    deadline: float,
    max_ops: int,
    pause_s: float,
    initial: bool = False,
) -> None:

    async def upload(name: str, op: str) -> None:
        seed = next(world.seeds)
        data = adapter_bytes(clip_dir, name, seed=seed)
        t0 = time.monotonic()
        try:
            resp = await client.post(
                url + "/v1/admin/adapters",
                headers=AUTH,
                data={"name": name},
                files={"file": (f"{name}.safetensors", data, "application/octet-stream")},
            )
        except httpx.HTTPError as exc:
            stats.admin[(op, type(exc).__name__)] += 1
            return  # unknown outcome: a later answer for it counts as wrong (conservative)
        stats.admin[(op, resp.status_code)] += 1
        if resp.status_code == 201:
            version = resp.json()["version"]
            key = f"{name}@{version}"
            life = Life(seed, loose_start=t0, sure_start=time.monotonic())
            world.lives.setdefault(key, []).append(life)
            world.current.setdefault(name, {})[version] = life
            world.ever.add(key)

    async def delete(target: str, op: str) -> None:
        name, _, v = target.partition("@")
        doomed = [world.current.get(name, {})[int(v)]] if v else list(world.current.get(name, {}).values())
        t0 = time.monotonic()
        for life in doomed:
            life.sure_end = t0
        try:
            resp = await client.delete(url + f"/v1/admin/adapters/{target}", headers=AUTH)
        except httpx.HTTPError as exc:
            stats.admin[(op, type(exc).__name__)] += 1
            return  # outcome unknown: leave its loose_end open
        stats.admin[(op, resp.status_code)] += 1
        t1 = time.monotonic()
        if resp.status_code == 200:
            for life in doomed:
                life.loose_end = t1
            if v:
                world.current[name].pop(int(v), None)
            else:
                world.current[name] = {}
        else:
            for life in doomed:  # refused: it still exists
                life.sure_end = float("inf")

    if initial:
        for name in NAMES:
            await upload(name, "initial upload")
    for _ in range(max_ops):
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(pause_s)
        name = rng.choice(NAMES)
        versions = sorted(world.current.get(name, {}))
        roll = rng.random()
        if not versions:
            await upload(name, "re-upload deleted adapter")
        elif roll < 0.5 and len(versions) < 4:
            await upload(name, "upload new version (hot swap)")
        elif roll < 0.85 and len(versions) > 1:
            await delete(f"{name}@{rng.choice(versions)}", "delete one version")
        elif roll < 0.95 or len(versions) >= 4:
            await delete(name, "delete whole adapter")
        else:
            await upload(name, "upload new version (hot swap)")


async def rss_sampler(
    pid: int, samples: list[tuple[float, float]], started: float, stop: asyncio.Event, every_s: float
) -> None:
    while not stop.is_set():
        try:
            samples.append((time.monotonic() - started, rss_mb(pid)))
        except OSError:
            return
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass


async def scrape_metric_totals(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    text = (await client.get(url + "/metrics")).text
    totals: Counter = Counter()
    for line in text.splitlines():
        if line.startswith(("promptswap_adapter_evictions_total", "promptswap_adapter_loads_total")):
            totals[line.split("{")[0].split(" ")[0]] += float(line.rsplit(" ", 1)[1])
    return dict(totals)


async def soak(args: argparse.Namespace) -> None:
    clip_dir = ensure_tiny_clip()
    ref = Reference(clip_dir)
    adapter_dir = OUT / "soak-adapters"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    port = servers.free_port()
    argv = servers.service_argv(
        clip_dir, port, adapter_dir, adapter_cache_bytes=args.cache_bytes, max_wait_ms=2, request_timeout_s=30
    )
    env = {"PROMPTSWAP_ADMIN_TOKEN": TOKEN, "PROMPTSWAP_DTYPE": "float32"}
    server = servers.start("soak", argv, env, port)
    check_loopback(server.url)
    world, stats = World(), Stats()
    samples: list[tuple[float, float]] = []
    stop = asyncio.Event()
    started = time.monotonic()
    try:
        limits = httpx.Limits(max_connections=args.clients + 2)
        async with httpx.AsyncClient(timeout=args.timeout, limits=limits, trust_env=False) as client:
            sampler = asyncio.ensure_future(
                rss_sampler(server.proc.pid, samples, started, stop, args.rss_every)
            )
            deadline = started + args.seconds
            rng = random.Random(args.seed)
            await admin_worker(
                client, server.url, clip_dir, world, stats, rng, started + 60, 0, 0, initial=True
            )
            tasks = [
                classify_worker(
                    client,
                    server.url,
                    ref,
                    world,
                    stats,
                    random.Random(args.seed + 1 + i),
                    deadline,
                    args.max_requests,
                )
                for i in range(args.clients)
            ]
            tasks.append(
                admin_worker(
                    client,
                    server.url,
                    clip_dir,
                    world,
                    stats,
                    rng,
                    deadline,
                    args.max_admin_ops,
                    args.admin_pause,
                )
            )
            await asyncio.gather(*tasks)
            wall = time.monotonic() - started
            metric_totals = await scrape_metric_totals(client, server.url)
            stop.set()
            await sampler
            try:
                samples.append((time.monotonic() - started, rss_mb(server.proc.pid)))
            except OSError:
                pass
        alive = server.proc.poll() is None
    finally:
        stop.set()
        server.stop()
    print_report(args, argv, stats, samples, wall, metric_totals, alive, world)


def print_report(args, argv, stats: Stats, samples, wall, metric_totals, alive, world: World) -> None:
    total = sum(stats.requests.values())
    lost = sum(stats.lost.values())
    print(
        f"## Soak: {wall:.0f} s, {args.clients} classify clients + 1 admin client, tiny CLIP, "
        f"`--adapter-cache-bytes {args.cache_bytes}`\n"
    )
    print(f"Server: `python {' '.join(argv)}` (alive at the end: {alive})\n")
    print("| classify kind | sent | correct 200 |")
    print("|---|---:|---:|")
    for kind in sorted(stats.requests):
        print(f"| {kind} | {stats.requests[kind]} | {stats.ok[kind]} |")
    print(f"| **all** | {total} | {sum(stats.ok.values())} |\n")
    lat = sorted(stats.latencies)
    if lat:
        pick = lambda q: lat[min(len(lat) - 1, round(q * (len(lat) - 1)))] * 1000  # noqa: E731
        print(
            f"Throughput {len(lat) / wall:.1f} answers/s; 200 latency p50 {pick(0.5):.1f} ms, "
            f"p95 {pick(0.95):.1f} ms, p99 {pick(0.99):.1f} ms\n"
        )
    print(
        f"- **lost** (transport errors, timeouts, 5xx): {lost}" + (f" — {dict(stats.lost)}" if lost else "")
    )
    print(f"- **wrong** (logits off by > {TOL}, wrong adapter key, or an unexpected 4xx): {len(stats.wrong)}")
    for line in stats.wrong[:10]:
        print(f"  - `{line}`")
    print("\n| 4xx: kind | status | code | expected (adapter deleted meanwhile) | n |")
    print("|---|---:|---|---|---:|")
    for (kind, status, code, expected), n in sorted(stats.client_errors.items()):
        print(f"| {kind} | {status} | {code} | {'yes' if expected else '**no**'} | {n} |")
    print("\n| admin op | status | n |")
    print("|---|---|---:|")
    for (op, status), n in sorted(stats.admin.items(), key=lambda kv: str(kv[0])):
        print(f"| {op} | {status} | {n} |")
    live = sum(len(v) for v in world.current.values())
    print(
        f"\nAdapter keys created: {len(world.ever)} distinct (`name@version`, never reused; "
        f"{sum(len(v) for v in world.lives.values())} contents), live at the end: {live}. "
        f"Server metrics: adapter loads {metric_totals.get('promptswap_adapter_loads_total', 0):.0f}, "
        f"evictions {metric_totals.get('promptswap_adapter_evictions_total', 0):.0f}.\n"
    )
    if samples:
        rss = [mb for _, mb in samples]
        print(f"RSS (MB): start {rss[0]:.1f}, peak {max(rss):.1f}, end {rss[-1]:.1f}\n")
        print("| t (s) | RSS (MB) |")
        print("|---:|---:|")
        step = max(1, len(samples) // 30)
        shown = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
        for t, mb in shown:
            print(f"| {t:.0f} | {mb:.1f} |")


def main() -> None:
    torch.set_num_threads(1)  # the in-process reference stays off the server's cores
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument(
        "--cache-bytes",
        type=int,
        default=12000,
        help="--adapter-cache-bytes; one tiny adapter is 3,840 bytes of tensors",
    )
    parser.add_argument("--timeout", type=float, default=30)
    parser.add_argument("--max-requests", type=int, default=20000, help="per classify client")
    parser.add_argument("--max-admin-ops", type=int, default=2000)
    parser.add_argument("--admin-pause", type=float, default=0.15, help="seconds between admin ops")
    parser.add_argument("--rss-every", type=float, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 < args.seconds <= 600:
        parser.error("--seconds must be in (0, 600]")
    asyncio.run(soak(args))


if __name__ == "__main__":
    main()
