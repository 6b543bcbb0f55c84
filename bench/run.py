"""One command for the whole benchmark: ``python -m bench.run [--quick]`` -> bench/RESULTS.md.

Full: B/32 float32 with every scenario, then B/32 bfloat16 and B/16 float32 (zero-shot,
side by side with naive and ceiling) while the time budget lasts. --quick: B/32
float32 only, fewer requests, no profiling (a couple of minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
import traceback

import torch
import transformers

from . import scenarios as sc
from .findings import proposals
from .models import OUT, ensure_model
from .report import Run, write
from .servers import REPO

RESULTS = REPO / "bench" / "RESULTS.md"


def machine() -> dict[str, str]:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return {
        "CPU": f"{cpu}, {os.cpu_count()} cores; ISA flags present: {', '.join(isa) or 'none'} "
        f"(torch uses {torch.backends.cpu.get_cpu_capability()})",
        "software": f"Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}",
        "load average at start (1/5/15 min)": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _subprocess_json(module: str, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="B/32 float32 only, fewer requests")
    p.add_argument(
        "--budget-min", type=float, default=None, help="skip later groups past this (default 9 / 3)"
    )
    p.add_argument(
        "--report-only", action="store_true", help="rewrite RESULTS.md from bench/out/results.json"
    )
    args = p.parse_args()
    if args.report_only:
        report_only()
        return
    started = time.perf_counter()
    budget_s = 60 * (args.budget_min or (3 if args.quick else 9))
    if args.quick:
        plan = sc.Plan(
            n=32,
            n_naive=16,
            n_adapters=20,
            churn_adapters=12,
            churn_cache_adapters=3,
            labels_100=False,
            profile=False,
            max_seconds=60,
            ceiling_seconds=1,
        )
        groups = [("B/32", "float32", True)]
    else:
        plan = sc.Plan(n=48, n_naive=32, max_seconds=90, ceiling_seconds=10)
        groups = [("B/32", "float32", True), ("B/32", "bfloat16", False), ("B/16", "float32", False)]
    run = Run(
        "quick" if args.quick else "full",
        "python -m bench.run" + (" --quick" if args.quick else ""),
        machine(),
        [],
    )
    OUT.mkdir(parents=True, exist_ok=True)

    def elapsed() -> float:
        return time.perf_counter() - started

    for i, (arch, dtype, full) in enumerate(groups):
        group = sc.group_name(arch, dtype)
        if i > 0 and elapsed() > budget_s * 0.6:
            run.skipped.append(f"{group}: time budget ({elapsed() / 60:.1f} min used)")
            continue
        print(f"[{elapsed():6.0f}s] {group}", flush=True)
        model = ensure_model(arch)
        try:
            run.rows.append(
                sc.ceiling(model, dtype, plan.max_batch, plan.ceiling_seconds if full else 1, group)
            )
            print(f"[{elapsed():6.0f}s]   ceiling done", flush=True)
            run.rows += sc.naive(
                model,
                dtype,
                group,
                plan.n_naive if full else plan.n_slow_naive,
                plan,
                plan.labels_100 and full,
            )
            print(f"[{elapsed():6.0f}s]   naive done", flush=True)
            run.rows += sc.service_suite(model, dtype, group, plan, full)
            print(f"[{elapsed():6.0f}s]   promptswap done", flush=True)
            run.rows.append(sc.ceiling(model, dtype, plan.max_batch, 1, group, tag=", after"))
            if full:
                run.rows.append(sc.chat(group))
                run.adapter_load = _subprocess_json(
                    "bench.adapter_load", "--model", str(model), "--dtype", dtype
                )
                if plan.profile:
                    run.stages = _subprocess_json("bench.profile", "--model", str(model), "--dtype", dtype)
                    summary = OUT / "pyspy-classify-summary.json"
                    run.pyspy = json.loads(summary.read_text()) if summary.exists() else None
        except Exception as exc:  # keep what was measured; say what failed
            traceback.print_exc()
            run.skipped.append(f"{group}: failed ({type(exc).__name__}: {exc})")
    run.machine["load average at end (1/5/15 min)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    run.wall_s = elapsed()
    (OUT / "results.json").write_text(json.dumps(dataclasses.asdict(run), indent=1, default=str))
    write(run, RESULTS, proposals(run))
    print(f"[{elapsed():6.0f}s] wrote {RESULTS}", flush=True)


def report_only() -> None:
    data = json.loads((OUT / "results.json").read_text())
    data["rows"] = [sc.Row(**r) for r in data["rows"]]
    data.setdefault("mode", "full")
    data.setdefault("command", "python -m bench.run")
    run = Run(**data)
    write(run, RESULTS, proposals(run))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
