"""Host cost per classify request (issue 16): promptswap against the best simple design
(``bench/baseline_app.py``), side by side in one run, plus a py-spy breakdown by stage.

Tiny CLIP (model cost negligible: what the host costs) and, with ``--b32``, the
ViT-B/32-shaped model at float32 and bfloat16 against the same baseline and the raw
image encoder in-process. JSON bodies (base64 640x480 JPEG photos, 10 labels), 16
closed-loop clients. Core-ms per request is the server process's user + system CPU
time (all its threads, from /proc) over the measured requests, divided by their number.

    python -m bench.host_cost [--requests 400] [--rounds 2] [--b32] [--profile]

Writes its section of bench/RESULTS.md (between the host-cost markers) and
bench/out/host_cost.json.

One file (about 400 lines) so that one command starts every system, loads them side by side
and writes the table: the systems differ only in what they start.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import servers
from .loadgen import LoadResult, run_load
from .models import OUT, ensure_model, ensure_tiny_clip
from .payloads import LABELS_10, Body, photos

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN, END = "<!-- host-cost: begin (bench/host_cost.py) -->", "<!-- host-cost: end -->"
TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def json_bodies() -> list[Body]:
    return [
        Body(
            json.dumps({"image": base64.b64encode(data).decode(), "labels": LABELS_10}).encode(),
            "application/json",
        )
        for _, data in photos()
    ]


def cpu_s(pid: int, thread: int | None = None) -> float:
    """User + system CPU seconds of every thread of ``pid`` so far (or of one ``thread``)."""
    stat = Path(f"/proc/{pid}/task/{thread}/stat" if thread else f"/proc/{pid}/stat")
    fields = stat.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S  # utime, stime


def descendants(pid: int) -> list[int]:
    """``pid``'s child processes and theirs (promptswap --frontends N starts N)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *descendants(int(child))]
    return found


@dataclass
class CpuClock:
    """CPU seconds of a server: all its processes, the first alone, and its main thread
    (the event loop: what one process's GIL serialises, with the model thread's Python)."""

    pid: int

    def read(self) -> tuple[float, float, float]:
        own = cpu_s(self.pid)
        tree = own
        for child in descendants(self.pid):
            try:
                tree += cpu_s(child)
            except FileNotFoundError:  # exited meanwhile
                pass
        return tree, own, cpu_s(self.pid, thread=self.pid)


@dataclass
class Row:
    model: str
    system: str
    round: int
    ok: float
    failed: float
    req_s: float
    p50_ms: float
    p99_ms: float
    core_ms: float  # server CPU per request: every process of it
    notes: dict = field(default_factory=dict)
    model_core_ms: float = float("nan")  # the process that owns the model, alone
    loop_core_ms: float = float("nan")  # its main thread (the event loop)


def json_load(server: servers.Server, clients: int) -> Callable[[int], LoadResult]:
    """``load(count)``: that many JSON classify requests from ``clients`` closed-loop clients."""
    bodies = json_bodies()
    url = server.url + "/v1/classify"

    def load(count: int) -> LoadResult:
        return asyncio.run(
            run_load(
                url, lambda i: bodies[i % len(bodies)], n_requests=count, concurrency=clients, max_seconds=900
            )
        )

    return load


def _measure(server: servers.Server, n: int, clients: int, warmup: int) -> tuple[float, ...]:
    load = json_load(server, clients)
    load(warmup)
    clock = CpuClock(server.proc.pid)
    before = clock.read()
    result = load(n)
    used = [after - start for after, start in zip(clock.read(), before, strict=True)]
    if result.failures:
        print(f"  {server.name}: failures {dict(result.failures)}", flush=True)
    per_request = [1000 * u / max(1, result.ok) for u in used]
    return (
        result.ok,
        result.failed,
        result.throughput,
        result.percentile(50) * 1000,
        result.percentile(99) * 1000,
        *per_request,
    )


def start_baseline(model: Path, dtype: str, torch_threads: int | None = None) -> servers.Server:
    port = servers.free_port()
    argv = ["-m", "uvicorn", "bench.baseline_app:app", "--host", servers.HOST, "--port", str(port)]
    env = {"BASELINE_MODEL": str(model), "BASELINE_DTYPE": dtype}
    if torch_threads is not None:
        env["BASELINE_TORCH_THREADS"] = str(torch_threads)
    return servers.start("baseline", [*argv, "--log-level", "warning"], env, port)


def start_promptswap(
    model: Path, dtype: str, env: dict[str, str] | None = None, **options: object
) -> servers.Server:
    port = servers.free_port()
    store = OUT / "host-cost-adapters"
    shutil.rmtree(store, ignore_errors=True)
    argv = servers.service_argv(model, port, store, request_timeout_s=300, **options)
    return servers.start("promptswap", argv, {"PROMPTSWAP_DTYPE": dtype, **(env or {})}, port)


def _systems() -> dict:
    from service.settings import default_torch_threads

    cores = os.cpu_count() or 1
    default = default_torch_threads(cores)
    systems = {
        "baseline": start_baseline,  # torch's own thread default: every core
        # The baseline given one core fewer, so the comparison is not only about threads.
        "baseline, torch threads cores - 1": lambda model, dtype: start_baseline(
            model, dtype, max(1, cores - 1)
        ),
        "promptswap": start_promptswap,  # the default: see service.settings.default_torch_threads
    }
    for threads, name in ((max(1, cores - 1), "cores - 1"), (cores, "all cores")):
        if threads != default:  # the other thread count, to show what the default buys or costs
            systems[f"promptswap --torch-threads {name}"] = lambda model, dtype, t=threads: start_promptswap(
                model, dtype, torch_threads=t
            )
    # Every core, with OpenMP's workers sleeping at once instead of spinning while they wait.
    systems["promptswap --torch-threads all cores, OMP_WAIT_POLICY=PASSIVE"] = lambda model, dtype: (
        start_promptswap(model, dtype, {"OMP_WAIT_POLICY": "PASSIVE"}, torch_threads=cores)
    )
    # Front-end processes parse and decode; the model's process batches and runs the model.
    for count in (1, cores):
        systems[f"promptswap --frontends {count}"] = lambda model, dtype, n=count: start_promptswap(
            model, dtype, frontends=n
        )
    return systems


SYSTEMS = _systems()


def compare(
    label: str, model: Path, dtype: str, n: int, rounds: int, clients: int, warmup: int, only: list[str]
) -> list[Row]:
    rows = []
    chosen = [name for name in SYSTEMS if not only or name in only]
    for r in range(rounds):
        order = chosen if r % 2 == 0 else list(reversed(chosen))  # alternate who goes first
        for name in order:
            server = SYSTEMS[name](model, dtype)
            try:
                ok, failed, rps, p50, p99, core, model_core, loop_core = _measure(server, n, clients, warmup)
            finally:
                server.stop()
            rows.append(Row(label, name, r, ok, failed, rps, p50, p99, core, {}, model_core, loop_core))
            print(f"  {label} {name} round {r}: {rps:.1f} req/s, {core:.1f} core-ms/req", flush=True)
    return rows


GIL_RATE = 250  # py-spy samples per second


def gil_held(pid: int, run: Callable[[], LoadResult]) -> dict:
    """``run()`` under ``py-spy --gil`` (it samples only the thread holding the GIL): GIL-held
    ms per answered request, in all and by thread. 1000 over it is the most requests per
    second that process can serve however many cores the host has."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    raw = OUT / f"pyspy-gil-{pid}.txt"
    argv = [exe, "record", "--pid", str(pid), "--rate", str(GIL_RATE), "--format", "raw"]
    spy = subprocess.Popen(
        [*argv, "--output", str(raw), "--nonblocking", "--gil", "--threads"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # py-spy attaches; idle samples before the load hold no GIL
    result = run()
    spy.send_signal(signal.SIGINT)
    spy.wait()
    by_thread: Counter = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        by_thread[stack.split(";")[0].rpartition(":")[2].strip()] += int(count)
    per_request = {k: 1000 * v / GIL_RATE / max(1, result.ok) for k, v in by_thread.most_common()}
    return {"req_s": result.throughput, "ms_per_request": sum(per_request.values()), "by_thread": per_request}


def classify_gil(model: Path, n: int, clients: int, frontends: int = 0) -> dict:
    """GIL held per JSON classify request in promptswap's one process, or with ``frontends=1``
    in its one front end (1000 over it is what one front end can pass on, so how many a model
    process needs)."""
    server = start_promptswap(model, "float32", **({"frontends": frontends} if frontends else {}))
    try:
        pid = server.proc.pid
        if frontends:
            pid = next(
                child
                for child in descendants(pid)
                if "resource_tracker" not in Path(f"/proc/{child}/cmdline").read_text()
            )
        load = json_load(server, clients)
        load(n)
        return gil_held(pid, lambda: load(n))
    finally:
        server.stop()


def model_process(model: Path, n: int, clients: int, gil: bool) -> dict:
    """The model's process alone (``--frontends 1``), fed finished rows straight on its private
    socket: what it sustains and costs per request once front ends do every host stage, i.e.
    the most one model process can take from any number of front ends on a larger host."""
    from service.classify.request import ClassifyCall
    from service.frontend.app import ClipImages
    from service.frontend.rows import ROWS_TYPE, encode_call
    from service.http.images import decode_image

    private = OUT / "model-process-tmp"
    shutil.rmtree(private, ignore_errors=True)
    private.mkdir(parents=True)
    server = start_promptswap(model, "float32", {"TMPDIR": str(private)}, frontends=1)
    try:
        sock = str(next(private.glob("promptswap-*/model.sock")))
        images = ClipImages(str(model))
        call = ClassifyCall(image=b"", labels=LABELS_10, template=None, top_k=None, adapter=None)
        bodies = [
            Body(encode_call(call, [images(decode_image(data, max_pixels=10**8))], many=False), ROWS_TYPE)
            for _, data in photos()
        ]

        def load(count: int):
            return asyncio.run(
                run_load(
                    f"http://{servers.HOST}/v1/classify",
                    lambda i: bodies[i % len(bodies)],
                    n_requests=count,
                    concurrency=clients,
                    max_seconds=600,
                    uds=sock,
                )
            )

        load(32)
        clock = CpuClock(server.proc.pid)
        before = clock.read()
        result = load(n)
        _, own, loop = [after - start for after, start in zip(clock.read(), before, strict=True)]
        held = gil_held(server.proc.pid, lambda: load(n)) if gil else None
    finally:
        server.stop()
    if result.failures:
        print(f"  model process: failures {dict(result.failures)}", flush=True)
    return {
        "req_s": result.throughput,
        "ok": result.ok,
        "core_ms": 1000 * own / max(1, result.ok),
        "loop_core_ms": 1000 * loop / max(1, result.ok),
        "row_bytes": len(bodies[0].content),
        "gil": held,
    }


def ceiling(model: Path, dtype: str) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.ceiling",
            "--model",
            str(model),
            "--dtype",
            dtype,
            "--batch",
            "32",
            "--seconds",
            "5",
            "--end-to-end",
        ],
        cwd=servers.REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- py-spy: where a loaded server's CPU goes --------------------------------------------

# Walking a stack from its innermost frame out, the first rule whose text is in a frame names
# the stage. Order inside one frame does not matter: the rules' texts do not overlap.
STAGES = (
    ("JPEG/PNG decode", ("decode_image", "JpegImagePlugin", "PngImagePlugin", "ImageFile.py")),
    ("resize/crop/normalise", ("clip_pixels.py", "image_processing", "preprocess (service")),
    ("base64", ("b64decode", "decode_base64_image")),
    (
        "JSON/multipart parsing",
        (
            "model_validate_json",
            "_parse_classify",
            "_parse_multipart",
            "multipart",
            "decoder.py",
            "form (starlette",
        ),
    ),
    ("body read", ("body (starlette", "stream (starlette", "receive (uvicorn")),
    ("model forward (image/text)", ("encode_image", "encode_text", "torch/nn/")),
    ("batch assembly + logits", ("handler.py",)),
    ("queueing (batcher)", ("batcher.py",)),
    (
        "response building",
        (
            "ClassifyResponse",
            "serialize_response",
            "jsonable_encoder",
            "render (",
            "encoder.py",
            "_softmax",
            "pydantic",
        ),
    ),
    (
        "middleware + metrics",
        ("service/http/middleware.py", "prometheus_client", "admission.py", "deps.py", "disconnect.py"),
    ),
    ("FastAPI/Starlette routing", ("fastapi/", "starlette/")),
    ("uvicorn/HTTP", ("uvicorn/", "h11", "httptools")),
    ("thread hops (executor, wake-ups)", ("concurrent/futures", "threading.py", "queue.py")),
    ("event loop (asyncio/uvloop)", ("asyncio/", "uvloop", "base_events", "selector")),
)


def stage_of(stack: str) -> str:
    for frame in reversed(stack.split(";")):
        for stage, keys in STAGES:
            if any(k in frame for k in keys):
                return stage
    return "other"


def summarise(raw: Path) -> dict[str, float]:
    counts: Counter = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if n.isdigit():
            counts[stage_of(stack)] += int(n)
    total = sum(counts.values()) or 1
    return {k: round(100 * v / total, 1) for k, v in counts.most_common()}


def profile(model: Path, n: int, clients: int) -> dict:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    # one core left to the host's stages, so the breakdown shows them and not OpenMP spinning
    threads = max(1, (os.cpu_count() or 1) - 1)
    server = start_promptswap(model, "float32", torch_threads=threads)
    raw = OUT / "pyspy-host-cost.txt"
    try:
        bodies = json_bodies()
        url = server.url + "/v1/classify"
        asyncio.run(
            run_load(url, lambda i: bodies[i % 8], n_requests=64, concurrency=clients, max_seconds=300)
        )
        spy = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(server.proc.pid),
                "--rate",
                "200",
                "--format",
                "raw",
                "--output",
                str(raw),
                "--nonblocking",
                "--threads",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)
        before = cpu_s(server.proc.pid)
        result = asyncio.run(
            run_load(url, lambda i: bodies[i % 8], n_requests=n, concurrency=clients, max_seconds=600)
        )
        used = cpu_s(server.proc.pid) - before
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
    finally:
        server.stop()
    shares = summarise(raw)
    core_ms = 1000 * used / max(1, result.ok)
    return {
        "requests": result.ok,
        "req_s": result.throughput,
        "core_ms_per_request": core_ms,
        "share %": shares,
        "core-ms per request by stage": {k: round(core_ms * v / 100, 2) for k, v in shares.items()},
    }


# --- report ------------------------------------------------------------------------------


def _table(rows: list[Row]) -> list[str]:
    out = [
        "| model | system | round | ok | failed | req/s | p50 ms | p99 ms | server core-ms/req | "
        "model process | its event loop |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    out += [
        f"| {r.model} | {r.system} | {r.round} | {r.ok} | {r.failed} | {r.req_s:.1f} | {r.p50_ms:.0f} | "
        f"{r.p99_ms:.0f} | {r.core_ms:.1f} | {r.model_core_ms:.1f} | {r.loop_core_ms:.1f} |"
        for r in rows
    ]
    return out


def _ratio_lines(rows: list[Row]) -> list[str]:
    lines = []
    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model]
        rounds = sorted({r.round for r in mine})
        for rnd in rounds:
            by = {r.system: r for r in mine if r.round == rnd}
            ps = by.get("promptswap")
            for name, other in by.items():
                if ps is None or name == "promptswap" or other.req_s <= 0:
                    continue
                lines.append(
                    f"- {model}, round {rnd}: promptswap / {name}: req/s **{ps.req_s / other.req_s:.2f}x**; "
                    f"core-ms/req {ps.core_ms:.1f} vs {other.core_ms:.1f}"
                )
    return lines


def section(data: dict) -> str:
    lines = [
        BEGIN,
        "",
        "## Host cost per classify request (issue 16)",
        "",
        f"Regenerate: `{data['command']}` ({data['wall_s'] / 60:.1f} min). CPU: {data['cpu']}; "
        f"load average at start {data['load_start']}, at end {data['load_end']}. 16 closed-loop "
        "clients, JSON bodies (base64 640x480 JPEG, 10 labels), each system started fresh, warmed "
        "up, then measured; systems alternate within a round. Baseline: `bench/baseline_app.py` "
        "(asyncio queue micro-batcher, decode + transformers' processor in a thread pool, one model "
        "thread, label cache). Server core-ms/req: the server's CPU time over the measured "
        "requests (from /proc; every process of it, front ends included), divided by their number; "
        "model process: the process that owns the model alone; its event loop: that process's "
        "main thread.",
        "",
        *_table([Row(**r) for r in data["rows"]]),
        "",
        *_ratio_lines([Row(**r) for r in data["rows"]]),
    ]
    if data.get("model_process"):
        m = data["model_process"]
        lines += [
            "",
            "Model process alone (`promptswap --frontends 1`, tiny CLIP, its rows sent straight to its "
            f"private socket by the load generator, {m['row_bytes']} bytes each: what front ends hand it): "
            f"**{m['req_s']:.1f} req/s** at {m['core_ms']:.1f} core-ms per request, "
            f"{m['loop_core_ms']:.1f} of them on its event loop.",
        ]
    if data.get("single_process_gil") and data["model_process"].get("gil"):
        lines += [
            "",
            "GIL held per request (`py-spy --gil`, tiny CLIP; 1000 / it = the most req/s one such "
            "process serves on any number of cores):",
            "",
        ]
        measured = [
            ("promptswap, one process", data["single_process_gil"]),
            ("model process alone (--frontends)", data["model_process"]["gil"]),
        ]
        if data.get("frontend_gil"):
            measured.append(("one front end (--frontends 1)", data["frontend_gil"]))
        for name, g in measured:
            threads = ", ".join(f"{k} {v:.2f}" for k, v in g["by_thread"].items())
            lines.append(
                f"- {name}: **{g['ms_per_request']:.2f} ms** at {g['req_s']:.1f} req/s "
                f"(cap {1000 / g['ms_per_request']:.0f} req/s); by thread: {threads}"
            )
    if data.get("ceilings"):
        lines += [
            "",
            "In-process limits (`bench.ceiling`, batch 32): raw image encoder, and end to end (JPEG "
            "decode + exact preprocessing on one thread, then the encoder): "
            + "; ".join(
                f"{k}: {v['images_per_s']:.1f} and {v['end_to_end_images_per_s']:.1f} img/s, "
                f"promptswap at {_promptswap_rps(data, k) / v['end_to_end_images_per_s']:.2f}x the end-to-end limit"
                for k, v in data["ceilings"].items()
            ),
        ]
    if data.get("profile"):
        p = data["profile"]
        lines += [
            "",
            f"py-spy on promptswap `--torch-threads cores - 1`, tiny CLIP, {p['requests']} requests at {p['req_s']:.1f} req/s, "
            f"{p['core_ms_per_request']:.1f} core-ms/req; on-CPU samples of all threads by the "
            "innermost recognised frame (`bench.host_cost.STAGES`; raw stacks in "
            "`bench/out/pyspy-host-cost.txt`):",
            "",
            "| stage | share % | core-ms/req |",
            "|---|---:|---:|",
        ]
        lines += [f"| {k} | {v} | {p['core-ms per request by stage'][k]} |" for k, v in p["share %"].items()]
    lines += ["", END]
    return "\n".join(lines)


def _promptswap_rps(data: dict, model: str) -> float:
    rows = [r["req_s"] for r in data["rows"] if r["model"] == model and r["system"] == "promptswap"]
    return sum(rows) / len(rows) if rows else float("nan")


def write_section(text: str) -> None:
    current = RESULTS.read_text() if RESULTS.exists() else ""
    if BEGIN in current and END in current:
        head, _, rest = current.partition(BEGIN)
        _, _, tail = rest.partition(END)
        RESULTS.write_text(head + text + tail)
    else:
        RESULTS.write_text(current.rstrip("\n") + "\n\n" + text + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument(
        "--b32", action="store_true", help="also the B/32 rows (fp32 and bf16) and the raw encoder"
    )
    p.add_argument("--b32-requests", type=int, default=96)
    p.add_argument("--profile", action="store_true", help="py-spy breakdown of promptswap on the tiny CLIP")
    p.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    p.add_argument(
        "--gil",
        action="store_true",
        help="GIL-held ms per request (py-spy --gil): one process, model process alone",
    )
    p.add_argument(
        "--systems", default="", help="comma-separated system names to run (default: all); see SYSTEMS"
    )
    a = p.parse_args()
    only = [name.strip() for name in a.systems.split(",") if name.strip()]
    unknown = [name for name in only if name not in SYSTEMS]
    if unknown:
        p.error(f"unknown systems {unknown}; known: {list(SYSTEMS)}")
    from .run import machine

    started = time.perf_counter()
    m = machine()
    load_start = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = compare("tiny CLIP", ensure_tiny_clip(), "float32", a.requests, a.rounds, a.clients, 32, only)
    ceilings = {}
    if a.b32:
        b32 = ensure_model("B/32")
        for dtype in ("float32", "bfloat16"):
            ceilings[f"B/32 {dtype}"] = ceiling(b32, dtype)
            rows += compare(f"B/32 {dtype}", b32, dtype, a.b32_requests, 1, a.clients, 16, only)
    alone = model_process(ensure_tiny_clip(), a.requests, a.clients, a.gil)
    single_gil = classify_gil(ensure_tiny_clip(), a.requests, a.clients) if a.gil else None
    front_gil = classify_gil(ensure_tiny_clip(), a.requests, a.clients, frontends=1) if a.gil else None
    print(f"  tiny CLIP model process alone: {alone['req_s']:.1f} req/s, {alone['core_ms']:.1f} core-ms/req")
    prof = profile(ensure_tiny_clip(), a.requests, a.clients) if a.profile else None
    data = {
        "command": "python -m bench.host_cost " + " ".join(sys.argv[1:]),
        "cpu": m["CPU"],
        "load_start": load_start,
        "load_end": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
        "wall_s": time.perf_counter() - started,
        "rows": [asdict(r) for r in rows],
        "ceilings": ceilings,
        "profile": prof,
        "model_process": alone,
        "single_process_gil": single_gil,
        "frontend_gil": front_gil,
    }
    (OUT / "host_cost.json").write_text(json.dumps(data, indent=1))
    text = section(data)
    print(text)
    if not a.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
