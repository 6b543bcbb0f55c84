"""Read a few figures from the service's Prometheus /metrics text."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import httpx

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([^\s]+)$")


def scrape(base_url: str) -> dict[str, float]:
    """``name{labels}`` -> value, for every sample (comments skipped)."""
    text = httpx.get(base_url + "/metrics", timeout=10, trust_env=False).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


@dataclass
class Hist:
    """A histogram's difference between two scrapes."""

    count: float
    total: float
    buckets: list[tuple[float, float]]  # (le, cumulative count)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding the q-quantile (what a histogram can say)."""
        if not self.count:
            return float("nan")
        for le, cum in self.buckets:
            if cum >= q * self.count:
                return le
        return math.inf


def hist(before: dict[str, float], after: dict[str, float], name: str, labels: str = "") -> Hist:
    def get(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    sel = "{" + labels + "}" if labels else ""
    buckets = []
    prefix = f"{name}_bucket{{" + (labels + "," if labels else "")
    for key in after:
        if key.startswith(prefix):
            le = key[len(prefix) :].split('le="')[1].split('"')[0]
            buckets.append((math.inf if le == "+Inf" else float(le), get(key)))
    buckets.sort()
    return Hist(get(f"{name}_count{sel}"), get(f"{name}_sum{sel}"), buckets)


def counter(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)
