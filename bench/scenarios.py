"""The benchmark scenarios; each returns table rows for RESULTS.md.

(a) classify zero-shot / one adapter, (b) 100 adapters drawn uniformly, (c) adapter
churn past the device cache, (d) hot swap under load, (e) chat: a row pointing to bench/chat.py,
which measures chat on its own.
Servers run one at a time: this is a 2-core machine.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from . import scrape, servers
from .adapter_files import DEPTH, N_CTX, adapter_bytes, upload, upload_many
from .loadgen import LoadResult, run_load
from .models import OUT
from .payloads import LABELS_10, LABELS_100, Body, multipart, photos

ADMIN_TOKEN = "bench-admin-token"  # loopback-only throwaway server


@dataclass
class Row:
    group: str  # "B/32 float32"
    scenario: str
    system: str  # promptswap / naive / ceiling
    clients: int = 0
    n: int = 0
    ok: int = 0
    failed: int = 0
    rps: float = float("nan")
    p50_ms: float = float("nan")
    p95_ms: float = float("nan")
    p99_ms: float = float("nan")
    notes: dict = field(default_factory=dict)

    @classmethod
    def of(cls, group: str, scenario: str, system: str, clients: int, r: LoadResult, **notes) -> Row:
        if r.truncated:
            notes["truncated"] = "time bound hit"
        if r.failures:
            notes["failures"] = dict(r.failures)
        return cls(
            group,
            scenario,
            system,
            clients,
            r.sent,
            r.ok,
            r.failed,
            r.throughput,
            1000 * r.percentile(50),
            1000 * r.percentile(95),
            1000 * r.percentile(99),
            notes,
        )


@dataclass
class Plan:
    """How much to send; --quick shrinks it."""

    clients: int = 16
    max_batch: int = 32  # the service's default --max-batch-size; the ceiling's batch
    n: int = 96  # requests per promptswap scenario
    n_naive: int = 48
    n_slow: int = 32  # slow configurations (bf16 / B/16 on this CPU)
    n_slow_naive: int = 16
    n_adapters: int = 100
    churn_adapters: int = 24
    churn_cache_adapters: int = 4
    swap_every_s: float = 5.0
    request_timeout_s: float = 120  # the service's 30 s default is shorter than a cold batch here
    max_seconds: float = 120  # per load run
    ceiling_seconds: float = 10
    n_100_labels_naive: int = 8
    labels_100: bool = True
    profile: bool = True


def group_name(arch: str, dtype: str) -> str:
    return f"{arch} {dtype}"


def _bodies(labels: list[str], adapters: list[str | None]) -> list[Body]:
    """Request i uses photo i mod 7 and adapter adapters[i]."""
    pics = photos()
    return [multipart(pics[i % len(pics)][1], labels, a) for i, a in enumerate(adapters)]


def _load(url: str, bodies: list[Body], clients: int, max_s: float, keep: int = 0) -> LoadResult:
    return asyncio.run(
        run_load(
            url + "/v1/classify",
            lambda i: bodies[i],
            n_requests=len(bodies),
            concurrency=clients,
            max_seconds=max_s,
            keep_answers=keep,
        )
    )


def _server_notes(before: dict, after: dict) -> dict:
    batch = scrape.hist(before, after, "promptswap_batch_size", 'queue="classify"')
    infer = scrape.hist(before, after, "promptswap_inference_seconds", 'queue="classify"')
    wait = scrape.hist(before, after, "promptswap_queue_wait_seconds", 'queue="classify"')
    return {
        "mean batch": round(batch.mean, 1),
        "model s/batch": round(infer.mean, 3),
        "queue wait mean s": round(wait.mean, 3),
    }


def measure_service(
    server: servers.Server, group: str, scenario: str, bodies: list[Body], plan: Plan, keep: int = 0
) -> tuple[Row, LoadResult]:
    before = scrape.scrape(server.url)
    result = _load(server.url, bodies, plan.clients, plan.max_seconds, keep)
    notes = _server_notes(before, scrape.scrape(server.url))
    return Row.of(group, scenario, "promptswap", plan.clients, result, **notes), result


# ---------------------------------------------------------------- side by side


def ceiling(model: Path, dtype: str, batch: int, seconds: float, group: str, tag: str = "") -> Row:
    """In-process get_image_features at the service's max batch, in its own process."""
    cmd = [
        sys.executable,
        "-m",
        "bench.ceiling",
        "--model",
        str(model),
        "--dtype",
        dtype,
        "--batch",
        str(batch),
        "--seconds",
        str(seconds),
    ]
    out = subprocess.run(
        cmd,
        cwd=servers.REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    figures = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    return Row(
        group,
        f"image encoder, batch {batch}{tag}",
        "ceiling",
        n=figures["batch"] * figures["batches"],
        ok=figures["batch"] * figures["batches"],
        rps=figures["images_per_s"],
        p50_ms=1000 * figures["batch_s_median"],
        notes={"cmd": "python " + " ".join(cmd[1:]), "threads": figures["threads"]},
    )


def naive(model: Path, dtype: str, group: str, n: int, plan: Plan, labels_100: bool) -> list[Row]:
    port = servers.free_port()
    env = {"NAIVE_MODEL": str(model), "NAIVE_DTYPE": dtype}
    server = servers.start(
        f"naive-{group.replace('/', '').replace(' ', '-')}", servers.naive_argv(port), env, port
    )
    rows = []
    try:
        warm = _bodies(LABELS_10, [None] * 2)
        _load(server.url, warm, 2, plan.max_seconds)
        r = _load(server.url, _bodies(LABELS_10, [None] * n), plan.clients, plan.max_seconds)
        rows.append(Row.of(group, "zero-shot, 10 labels", "naive", plan.clients, r, cmd=_cmd(server)))
        if labels_100:
            r = _load(
                server.url,
                _bodies(LABELS_100, [None] * plan.n_100_labels_naive),
                plan.clients,
                plan.max_seconds,
            )
            rows.append(Row.of(group, "zero-shot, 100 labels", "naive", plan.clients, r))
    finally:
        server.stop()
    return rows


def _cmd(server: servers.Server) -> str:
    env = " ".join(f"{k}={'***' if 'TOKEN' in k else v}" for k, v in server.env.items())
    return f"{env} python {' '.join(server.argv)}".strip()


def start_service(
    model: Path, dtype: str, group: str, tag: str, adapter_dir: Path, **options: object
) -> servers.Server:
    port = servers.free_port()
    env = {"PROMPTSWAP_DTYPE": dtype, "PROMPTSWAP_ADMIN_TOKEN": ADMIN_TOKEN}
    name = f"promptswap-{group.replace('/', '').replace(' ', '-')}-{tag}"
    return servers.start(name, servers.service_argv(model, port, adapter_dir, **options), env, port)


# ---------------------------------------------------------------- promptswap scenarios


def task_name(i: int) -> str:
    return f"task-{i:03d}"


def service_suite(model: Path, dtype: str, group: str, plan: Plan, full_suite: bool) -> list[Row]:
    """(a) zero-shot and one adapter, (b) 100 adapters, (d) hot swap; (c) churn separately."""
    n = plan.n if full_suite else plan.n_slow
    adapter_dir = OUT / "adapters" / group.replace("/", "").replace(" ", "-")
    shutil.rmtree(adapter_dir, ignore_errors=True)
    server = start_service(model, dtype, group, "main", adapter_dir, request_timeout_s=plan.request_timeout_s)
    rows: list[Row] = []
    try:
        _load(server.url, _bodies(LABELS_10, [None] * plan.clients), plan.clients, plan.max_seconds)
        row, _ = measure_service(server, group, "zero-shot, 10 labels", _bodies(LABELS_10, [None] * n), plan)
        row.notes["cmd"] = _cmd(server)
        rows.append(row)
        if plan.labels_100 and full_suite:
            _load(server.url, _bodies(LABELS_100, [None] * 2), 2, plan.max_seconds)  # text into cache
            row, _ = measure_service(
                server, group, "zero-shot, 100 labels", _bodies(LABELS_100, [None] * n), plan
            )
            rows.append(row)
        if not full_suite:
            return rows
        files = {task_name(i): adapter_bytes(model, task_name(i), seed=i) for i in range(plan.n_adapters)}
        asyncio.run(upload_many(server.url, ADMIN_TOKEN, files))
        one = [task_name(0)] * n
        _load(server.url, _bodies(LABELS_10, one[: plan.clients]), plan.clients, plan.max_seconds)
        row, _ = measure_service(server, group, "MaPLe, 1 adapter, 10 labels", _bodies(LABELS_10, one), plan)
        row.notes["adapter"] = f"n_ctx {N_CTX}, depth {DEPTH}"
        rows.append(row)
        first = [task_name(i) for i in range(plan.n_adapters)]
        row, _ = measure_service(
            server,
            group,
            f"MaPLe, {plan.n_adapters} adapters, first use each",
            _bodies(LABELS_10, first),
            plan,
        )
        row.notes["what"] = "cold: adapter load + 10 text embeddings per adapter"
        rows.append(row)
        rng = random.Random(6)
        drawn = [task_name(rng.randrange(plan.n_adapters)) for _ in range(n)]
        row, _ = measure_service(
            server,
            group,
            f"MaPLe, {plan.n_adapters} adapters uniform, 10 labels",
            _bodies(LABELS_10, drawn),
            plan,
        )
        row.notes["distinct per batch"] = "up to 16"
        rows.append(row)
        rows.append(hot_swap(server, model, group, n, plan))
        if plan.profile:
            from .profile import pyspy_during

            pyspy_during(
                server,
                lambda: _load(
                    server.url, _bodies(LABELS_10, [task_name(0)] * 32), plan.clients, plan.max_seconds
                ),
            )
    finally:
        server.stop()
    rows.append(churn(model, dtype, group, adapter_dir, n, plan))
    return rows


def hot_swap(server: servers.Server, model: Path, group: str, n: int, plan: Plan) -> Row:
    """(d) 16 clients on adapter ``swap`` (latest) while new versions are uploaded."""
    data = adapter_bytes(model, "swap", seed=1000)
    asyncio.run(upload_many(server.url, ADMIN_TOKEN, {"swap": data}))
    bodies = _bodies(LABELS_10, ["swap"] * n)
    uploads: list[int] = []
    upload_errors: list[str] = []

    async def run() -> LoadResult:
        stop = asyncio.Event()

        async def uploader() -> None:
            async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
                seed = 1001
                while not stop.is_set():
                    await asyncio.sleep(plan.swap_every_s)
                    try:
                        got = await upload(
                            client, server.url, ADMIN_TOKEN, "swap", adapter_bytes(model, "swap", seed)
                        )
                        uploads.append(got["version"])
                    except httpx.HTTPError as exc:
                        upload_errors.append(repr(exc))
                    seed += 1

        task = asyncio.create_task(uploader())
        try:
            return await run_load(
                server.url + "/v1/classify",
                lambda i: bodies[i],
                n_requests=n,
                concurrency=plan.clients,
                max_seconds=plan.max_seconds,
                keep_answers=n,
            )
        finally:
            stop.set()
            await task

    before = scrape.scrape(server.url)
    result = asyncio.run(run())
    notes = _server_notes(before, scrape.scrape(server.url))
    seen = sorted({a["adapter"] for a in result.answers}, key=lambda k: int(k.split("@")[1]))
    notes.update(
        {
            "versions uploaded": len(uploads),
            "upload errors": len(upload_errors),
            "versions answered": f"{len(seen)} ({seen[0]} .. {seen[-1]})" if seen else "0",
        }
    )
    row = Row.of(
        group,
        f"hot swap: new version every {plan.swap_every_s:g} s",
        "promptswap",
        plan.clients,
        result,
        **notes,
    )
    row.failed += len(upload_errors)
    return row


def churn(model: Path, dtype: str, group: str, adapter_dir: Path, n: int, plan: Plan) -> Row:
    """(c) adapters drawn uniformly from more than the device cache holds."""
    per_adapter = DEPTH * N_CTX * (512 + 768) * (2 if dtype in ("bfloat16", "float16") else 4)
    cache = plan.churn_cache_adapters * per_adapter
    server = start_service(
        model,
        dtype,
        group,
        "churn",
        adapter_dir,
        adapter_cache_bytes=cache,
        request_timeout_s=plan.request_timeout_s,
    )
    try:
        names = [task_name(i) for i in range(plan.churn_adapters)]
        _load(server.url, _bodies(LABELS_10, names), plan.clients, plan.max_seconds)  # text cache warm
        rng = random.Random(7)
        drawn = [names[rng.randrange(len(names))] for _ in range(n)]
        before = scrape.scrape(server.url)
        row, _ = measure_service(
            server,
            group,
            f"churn: {plan.churn_adapters} adapters, cache holds {plan.churn_cache_adapters}",
            _bodies(LABELS_10, drawn),
            plan,
        )
        after = scrape.scrape(server.url)
        loads = scrape.hist(before, after, "promptswap_adapter_load_seconds")
        row.notes.update(
            {
                "adapter loads": int(loads.count),
                "evictions": int(scrape.counter(before, after, "promptswap_adapter_evictions_total")),
                "load mean ms (in server)": round(1000 * loads.mean, 2),
                "load p50 <= ms (bucket)": 1000 * loads.quantile(0.5),
                "cmd": _cmd(server),
            }
        )
        return row
    finally:
        server.stop()


def chat(group: str) -> Row:
    """(e) Chat (LLaVA), not measured yet. Hook: build a LLaVA checkpoint in real shapes in
    bench/models.py, start the service with ``--llava-model DIR``, send image + instruction
    bodies to /v1/chat with ``run_load`` and report tokens/s and time to first token."""
    return Row(
        group,
        "chat (LLaVA)",
        "promptswap",
        notes={
            "skipped": "not wired in yet; bench/chat_http.py measures chat on its own (hook: scenarios.chat)"
        },
    )
