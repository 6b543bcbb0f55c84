"""Cold adapter load, in-process: ``AdapterRegistry._read_and_place`` (read + verify + place).

``python -m bench.adapter_load --model DIR --dtype float32 --n 100`` prints one JSON line
with the p50/p95/max milliseconds over ``n`` distinct adapter files in the real shapes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from service.backbones.clip import ClipBackbone
from service.metrics import Metrics
from service.registry.adapter_registry import AdapterRegistry
from service.registry.placement import maple_placement
from service.registry.store import AdapterStore
from service.settings import Settings

from .adapter_files import adapter_bytes


def measure(model_dir: Path, dtype: str, n: int) -> dict:
    clip = ClipBackbone.load(str(model_dir), "cpu", dtype)  # the service's own placement
    with tempfile.TemporaryDirectory() as root, ThreadPoolExecutor(1) as pool:
        store = AdapterStore(Path(root))
        registry = AdapterRegistry(
            store,
            placements={"maple": maple_placement(clip)},
            cache_bytes=2**30,
            max_adapter_bytes=64 * 2**20,
            io_executor=pool,
            metrics=Metrics(),
            retry_after_s=Settings().retry_after_adapter_memory_s,
        )
        stored = [
            store.put(f"load-{i:03d}", lambda v, i=i: adapter_bytes(model_dir, f"load-{i:03d}", i))
            for i in range(n)
        ]
        times = []
        for version in stored:  # each file read once: cold for the registry
            t0 = time.perf_counter()
            registry._read_and_place(version)
            times.append(time.perf_counter() - t0)
    times.sort()
    ms = [1000 * t for t in times]
    return {
        "n": n,
        "p50_ms": ms[n // 2],
        "p95_ms": ms[int(0.95 * (n - 1))],
        "max_ms": ms[-1],
        "file_bytes": stored[0].size,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--n", type=int, default=100)
    a = p.parse_args()
    print(json.dumps(measure(a.model, a.dtype, a.n)))


if __name__ == "__main__":
    main()
