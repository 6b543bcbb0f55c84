"""Every Prometheus metric of the service, named once, in a registry per app.

Per-adapter series are labelled by adapter *name* (never version), and only for the
``adapter_labels`` names with the most requests; the rest share the label ``other``, so a
store of thousands of adapters cannot blow up the scrape. A name that later draws twice
the requests of the least-requested labelled one takes its place (its series start then,
the displaced name's series are removed); the factor keeps two names of similar traffic
from trading places on every request.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# A ``*_created`` sample per counter/histogram child doubles the series and no dashboard
# reads it (Prometheus infers resets itself). The switch is process-wide in prometheus-client.
disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


OTHER = "other"
PROMOTE_FACTOR = 2  # a newcomer needs this many times the requests of the name it displaces


class AdapterLabels:
    """Which adapter names have their own series: the top N by requests (thread-safe: the
    event loop counts requests, the model thread labels batch rows)."""

    def __init__(self, n: int, on_demote: Callable[[str], None]) -> None:
        self.n = n
        self._on_demote = on_demote
        self._counts: dict[str, int] = {}  # names that resolved in the store: bounded by it
        self._labelled: set[str] = set()
        self._lock = threading.Lock()

    def count(self, name: str) -> str:
        """One more request for ``name``; returns the label to record it under."""
        demoted = None
        with self._lock:
            seen = self._counts[name] = self._counts.get(name, 0) + 1
            if name not in self._labelled:
                if len(self._labelled) < self.n:
                    self._labelled.add(name)
                elif self.n > 0:
                    floor = min(self._labelled, key=lambda n: (self._counts[n], n))
                    if seen < PROMOTE_FACTOR * self._counts[floor]:
                        return OTHER
                    self._labelled.remove(floor)
                    self._labelled.add(name)
                    demoted = floor
                else:
                    return OTHER
        if demoted is not None:
            self._on_demote(demoted)
        return name

    def label(self, name: str) -> str:
        return name if name in self._labelled else OTHER


@dataclass
class RequestAdapter:
    """Set by the metrics middleware per request; the registry fills in the label of the
    adapter the request resolved, so the request's status and latency count for it."""

    label: str | None = None


REQUEST_ADAPTER: ContextVar[RequestAdapter | None] = ContextVar("promptswap_request_adapter", default=None)


class _LoadedAdapters(Collector):
    """``promptswap_adapter_loaded{adapter}``: versions on the device, computed at scrape time."""

    def __init__(self, labels: AdapterLabels) -> None:
        self.labels = labels
        self.names: Callable[[], Iterable[str]] = lambda: ()  # set by the registry

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "promptswap_adapter_loaded",
            "Adapter versions loaded on the device, by adapter",
            labels=["adapter"],
        )
        by_label: dict[str, int] = {}
        for name in self.names():
            label = self.labels.label(name)
            by_label[label] = by_label.get(label, 0) + 1
        for label, count in sorted(by_label.items()):
            family.add_metric([label], count)
        yield family


class Metrics:
    def __init__(self, adapter_labels: int = 50) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "promptswap_requests_total",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "promptswap_request_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "promptswap_batch_size",
            "Rows per model batch",
            ["queue"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "promptswap_queue_wait_seconds",
            "Time from admission to batch start",
            ["queue"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "promptswap_inference_seconds",
            "Model time per batch",
            ["queue"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "promptswap_queue_depth", "Requests waiting for a batch", ["queue"], registry=r
        )
        self.rejected = Counter(
            "promptswap_rejected_total",
            "Requests refused by the scheduler",
            ["queue", "reason"],
            registry=r,
        )
        self.text_cache_hits = Counter(
            "promptswap_text_cache_hits_total", "Text embeddings served from the cache", registry=r
        )
        self.text_cache_misses = Counter(
            "promptswap_text_cache_misses_total", "Text embeddings computed", registry=r
        )
        self.text_cache_entries = Gauge(
            "promptswap_text_cache_entries", "Text embeddings in the cache", registry=r
        )
        self.adapter_requests = Counter(
            "promptswap_adapter_requests_total", "Requests per adapter (by name)", ["adapter"], registry=r
        )
        self.adapter_errors = Counter(
            "promptswap_adapter_errors_total",
            "Requests per adapter answered with an error, by status class (4xx, 5xx)",
            ["adapter", "status"],
            registry=r,
        )
        self.adapter_latency = Histogram(
            "promptswap_adapter_request_seconds",
            "Request latency per adapter (by name)",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.adapter_batch_rows = Histogram(
            "promptswap_adapter_batch_rows",
            "Rows of one adapter in each classify batch or chat decode step it is part of",
            ["adapter"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.adapter_labels = AdapterLabels(adapter_labels, on_demote=self._remove_adapter_series)
        self.adapter_loaded = _LoadedAdapters(self.adapter_labels)
        r.register(self.adapter_loaded)
        self.adapter_loads = Counter(
            "promptswap_adapter_loads_total", "Adapters loaded onto the device", registry=r
        )
        self.adapter_load_seconds = Histogram(
            "promptswap_adapter_load_seconds",
            "Time to read, verify and place an adapter",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.adapter_evictions = Counter(
            "promptswap_adapter_evictions_total",
            "Adapters evicted from the device cache",
            registry=r,
        )
        self.adapter_load_oom = Counter(
            "promptswap_adapter_load_oom_total",
            "Adapter loads that hit device out-of-memory (then evict an idle adapter and retry)",
            registry=r,
        )
        self.adapter_device_bytes = Gauge(
            "promptswap_adapter_device_bytes", "Device bytes held by loaded adapters", registry=r
        )

    def _remove_adapter_series(self, name: str) -> None:
        for metric in (self.adapter_requests, self.adapter_latency, self.adapter_batch_rows):
            try:
                metric.remove(name)
            except KeyError:
                pass
        for status in ("4xx", "5xx"):
            try:
                self.adapter_errors.remove(name, status)
            except KeyError:
                pass

    def adapter_request(self, name: str) -> None:
        """A request resolved adapter ``name``: count it, and let the middleware record its
        status and latency under the same label."""
        label = self.adapter_labels.count(name)
        self.adapter_requests.labels(label).inc()
        holder = REQUEST_ADAPTER.get()
        if holder is not None:
            holder.label = label

    def adapter_answered(self, label: str, status: int, seconds: float) -> None:
        self.adapter_latency.labels(label).observe(seconds)
        if status >= 400:
            self.adapter_errors.labels(label, f"{status // 100}xx").inc()

    def adapter_rows(self, names: Iterable[str]) -> None:
        """One batch's (or decode step's) rows by adapter name (rows without an adapter are not
        counted)."""
        rows: dict[str, int] = {}
        for name in names:
            label = self.adapter_labels.label(name)
            rows[label] = rows.get(label, 0) + 1
        for label, count in rows.items():
            self.adapter_batch_rows.labels(label).observe(count)
