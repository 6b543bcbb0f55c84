"""Classify throughput, B/32 fp32, 16 clients, 10 labels: the naive pipeline server and
promptswap at each ``--torch-threads`` setting, side by side in one run.

    python -m bench.threads [--requests 48] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import shutil

from . import servers
from .models import OUT, ensure_model
from .payloads import LABELS_10
from .scenarios import _bodies, _load


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    model = ensure_model("B/32")
    rows = []
    port = servers.free_port()
    naive = servers.start(
        "naive-threads", servers.naive_argv(port), {"NAIVE_MODEL": str(model), "NAIVE_DTYPE": "float32"}, port
    )
    try:
        _load(naive.url, _bodies(LABELS_10, [None] * 4), 4, 300)
        r = _load(naive.url, _bodies(LABELS_10, [None] * args.requests), 16, 600)
        rows.append(("naive pipeline server", r.throughput, r.percentile(50) * 1000))
    finally:
        naive.stop()
    for threads in args.threads:
        store = OUT / "threads-adapters"
        shutil.rmtree(store, ignore_errors=True)
        port = servers.free_port()
        argv = servers.service_argv(model, port, store, torch_threads=threads, request_timeout_s=300)
        server = servers.start(f"service-t{threads}", argv, {"PROMPTSWAP_DTYPE": "float32"}, port)
        try:
            _load(server.url, _bodies(LABELS_10, [None] * 8), 8, 300)
            r = _load(server.url, _bodies(LABELS_10, [None] * args.requests), 16, 600)
            rows.append((f"promptswap --torch-threads {threads}", r.throughput, r.percentile(50) * 1000))
        finally:
            server.stop()
    base = rows[0][1]
    print("| system | req/s | p50 ms | vs naive |")
    print("|---|---:|---:|---:|")
    for name, rps, p50 in rows:
        print(f"| {name} | {rps:.2f} | {p50:.0f} | {rps / base:.2f}x |")


if __name__ == "__main__":
    main()
