"""Every Prometheus metric of the service, named once, in a registry per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
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
            "promptswap_adapter_requests_total", "Requests per adapter", ["adapter"], registry=r
        )
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
