"""Write bench/RESULTS.md from the rows and measurements of one run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .scenarios import Row

RAY_SERVE = (23.8, 8.8)  # req/s of Ray Serve serve.batch and the naive server, measured here earlier


@dataclass
class Target:
    what: str
    goal: str
    measured: str
    met: bool | None  # None: not measured


@dataclass
class Run:
    mode: str
    command: str
    machine: dict[str, str]
    rows: list[Row]
    adapter_load: dict | None = None
    stages: dict | None = None
    pyspy: dict | None = None
    skipped: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def _f(x: float, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def find(rows: list[Row], group: str, scenario: str, system: str) -> Row | None:
    return next((r for r in rows if r.group == group and r.system == system and scenario in r.scenario), None)


def ratio(a: Row | None, b: Row | None) -> float:
    if a is None or b is None or not b.rps or math.isnan(b.rps):
        return float("nan")
    return a.rps / b.rps


def targets(run: Run) -> list[Target]:
    g = "B/32 float32"
    svc = find(run.rows, g, "zero-shot, 10", "promptswap")
    nv = find(run.rows, g, "zero-shot, 10", "naive")
    ceil = ceiling_row(run.rows, g)
    one = find(run.rows, g, "MaPLe, 1 adapter", "promptswap")
    many = find(run.rows, g, "adapters uniform", "promptswap")
    swap = find(run.rows, g, "hot swap", "promptswap")
    out = []
    r = ratio(svc, nv)
    out.append(
        Target(
            "classify B/32 fp32, 16 clients, 10 labels vs naive",
            ">= 2.5x",
            f"{_f(r)}x (Ray Serve serve.batch earlier: {RAY_SERVE[0] / RAY_SERVE[1]:.1f}x)",
            None if math.isnan(r) else r >= 2.5,
        )
    )
    r = ratio(svc, ceil)
    out.append(
        Target(
            "classify B/32 fp32, 16 clients, 10 labels vs raw model ceiling",
            ">= 0.8x",
            f"{_f(r)}x",
            None if math.isnan(r) else r >= 0.8,
        )
    )
    r = ratio(many, one)
    label = many.scenario.split(",")[1].strip() if many else "100 adapters"
    first = find(run.rows, g, "first use each", "promptswap")
    caveat = (
        " (warm-up pass cut by the time bound: some adapters were still cold)"
        if first and first.notes.get("truncated")
        else ""
    )
    out.append(
        Target(
            f"{label} vs 1 adapter throughput",
            ">= 0.9x",
            f"{_f(r)}x{caveat}",
            None if math.isnan(r) else r >= 0.9,
        )
    )
    p50 = run.adapter_load["p50_ms"] if run.adapter_load else float("nan")
    out.append(
        Target(
            "cold adapter load p50 (read + verify + place)",
            "< 10 ms",
            f"{_f(p50, 2)} ms",
            None if math.isnan(p50) else p50 < 10,
        )
    )
    out.append(
        Target(
            "hot swap under load: failed requests",
            "0",
            "–" if swap is None else f"{swap.failed} of {swap.n}",
            None if swap is None else swap.failed == 0,
        )
    )
    return out


def _table(rows: list[Row]) -> list[str]:
    lines = [
        "| scenario | system | clients | ok / sent | failed | req/s | p50 ms | p95 ms | p99 ms | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        notes = "; ".join(f"{k}: {v}" for k, v in r.notes.items() if k != "cmd")
        unit = " img/s" if r.system == "ceiling" else ""
        lat = (_f(r.p50_ms, 0) + " (per batch)") if r.system == "ceiling" else _f(r.p50_ms, 0)
        lines.append(
            f"| {r.scenario} | {r.system} | {r.clients or '–'} | {r.ok} / {r.n} | {r.failed} | "
            f"{_f(r.rps)}{unit} | {lat} | {_f(r.p95_ms, 0)} | {_f(r.p99_ms, 0)} | {notes} |"
        )
    return lines


def ceiling_row(rows: list[Row], group: str) -> Row | None:
    """The mean of the ceilings measured before and after the service (external load drifts)."""
    found = [r for r in rows if r.group == group and r.system == "ceiling"]
    if not found:
        return None
    return Row(group, "ceiling (mean)", "ceiling", rps=sum(r.rps for r in found) / len(found))


def _ratios(rows: list[Row], group: str) -> list[str]:
    ceil = ceiling_row(rows, group)
    lines = []
    for scenario in ("zero-shot, 10 labels", "zero-shot, 100 labels", "MaPLe, 1 adapter", "adapters uniform"):
        svc = find(rows, group, scenario, "promptswap")
        if svc is None:
            continue
        nv = find(rows, group, scenario, "naive")
        parts = [f"service/ceiling **{_f(ratio(svc, ceil))}x**"]
        if nv is not None:
            parts.insert(0, f"service/naive **{_f(ratio(svc, nv))}x**")
        lines.append(f"- {scenario}: " + ", ".join(parts))
    if lines:
        lines.append("- (ceiling = mean of the ceiling rows, measured before and after the service)")
    return lines


def write(run: Run, path: Path, proposals: list[str]) -> None:
    m = run.machine
    lines = [
        "# promptswap benchmark results",
        "",
        f"Regenerate: `{run.command}` ({run.mode} run, {run.wall_s / 60:.1f} min). Written by "
        "`bench/run.py`; every figure below comes from that one run.",
        "",
        "## Machine",
        "",
        *(f"- {k}: {v}" for k, v in m.items()),
        "",
        "Models: random weights in the exact shapes of `openai/clip-vit-base-patch32` / `-patch16` "
        "(`bench/models.py`), saved with `save_pretrained`, loaded by every system from the same "
        "directory. Payloads: scikit-image photographs (astronaut, chelsea, coffee, rocket, camera, "
        "retina, hubble_deep_field, immunohistochemistry) as 640x480 JPEG (q 90), label sets of 10 "
        "and 100 labels, one multipart body per request for every system. Closed loop: each client "
        "sends its next request when the previous one is answered. Servers run one at a time.",
        "",
        "## Targets",
        "",
        "| target | goal | measured | met |",
        "|---|---|---|---|",
    ]
    for t in targets(run):
        met = "n/a" if t.met is None else ("yes" if t.met else "**no**")
        lines.append(f"| {t.what} | {t.goal} | {t.measured} | {met} |")
    groups = list(dict.fromkeys(r.group for r in run.rows))
    for g in groups:
        rows = [r for r in run.rows if r.group == g]
        lines += [
            "",
            f"## {g}",
            "",
            *_table(rows),
            "",
            "Ratios (same run, same model files and payloads):",
            "",
            *_ratios(run.rows, g),
        ]
    if run.skipped:
        lines += ["", "Skipped: " + "; ".join(run.skipped)]
    lines += [
        "",
        "Reading the figures: this 2-core VM is shared with other jobs (see the load averages); "
        "the two ceiling rows of one run can differ by 10-50%, so compare rows of one run only. "
        "A churn row's req/s counts only successful requests over the whole run.",
    ]
    lines += ["", "## Cold adapter load", ""]
    if run.adapter_load:
        a = run.adapter_load
        lines.append(
            f"`AdapterRegistry._read_and_place` in-process (read + parse + sha256 verify + fingerprint "
            f"check + place), {a['n']} distinct files of {a['file_bytes']} bytes (n_ctx 2, depth 9, "
            f"B/32): p50 **{_f(a['p50_ms'])} ms**, p95 {_f(a['p95_ms'])} ms, max {_f(a['max_ms'])} ms. "
            "The churn row above gives the same load measured inside the loaded server "
            "(`promptswap_adapter_load_seconds`, which also counts waiting for an I/O thread)."
        )
    if run.stages:
        lines += [
            "",
            "## Where the time goes (B/32 float32)",
            "",
            "In-process, one image at a time unless a batch is named (`bench/profile.py`):",
            "",
            "| stage | value |",
            "|---|---:|",
        ]
        lines += [f"| {k} | {_f(v) if isinstance(v, float) else v} |" for k, v in run.stages.items()]
    if run.pyspy:
        lines += [
            "",
            f"py-spy on the running service during 48 one-adapter requests ({run.pyspy['samples']} "
            "on-CPU samples, all threads; raw stacks in `bench/out/pyspy-classify.txt`):",
            "",
        ]
        lines += [f"- {k}: {v}%" for k, v in run.pyspy["share %"].items()]
    lines += ["", "## Proposed service changes (ranked)", "", *proposals]
    cmds = list(dict.fromkeys(r.notes["cmd"] for r in run.rows if "cmd" in r.notes))
    lines += [
        "",
        "## Exact commands",
        "",
        "```",
        *cmds,
        "```",
        "",
        "Load generator: `bench/loadgen.py` (httpx.AsyncClient, 127.0.0.1 only, pre-encoded "
        "multipart bodies, fixed request count, time-bounded). Adapters: `bench/adapter_files.py` "
        "(`adapters.format.dump`), uploaded through `POST /v1/admin/adapters`.",
        "",
    ]
    text = "\n".join(lines)
    # bench/host_cost.py owns its own section; a full run keeps it as it was.
    from .host_cost import BEGIN, END

    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        text += "\n" + BEGIN + old.partition(BEGIN)[2].partition(END)[0] + END + "\n"
    path.write_text(text)
