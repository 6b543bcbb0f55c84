"""The Grafana dashboard compose provisions: every query names metrics the service exports,
on the datasource the provisioning defines, and compose mounts both where Grafana reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.metrics_core import Metric

from service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "promptswap.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def exported_series() -> set[str]:
    """Series names the service exposes (what its /metrics can hold)."""
    families: list[Metric] = list(Metrics().registry.collect())
    return {family.name + suffix for family in families for suffix in SUFFIXES[family.type]}


def label_names() -> dict[str, set[str]]:
    """Label names by metric, from the service's own metric objects."""
    metrics = Metrics()
    out: dict[str, set[str]] = {}
    for attr in vars(metrics).values():
        names = getattr(attr, "_labelnames", None)
        name = getattr(attr, "_name", None)
        if name is not None and names is not None:
            out[name] = set(names)
    out["promptswap_adapter_loaded"] = {"adapter"}
    return out


def queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


def test_every_query_names_metrics_the_service_exports():
    exported = exported_series()
    labels = label_names()
    assert len(queries()) >= 14
    for title, expr in queries():
        names = re.findall(r"\bpromptswap_[a-z_]+\b", expr)
        assert names, f"{title}: the query names no promptswap metric"
        for name in names:
            assert name in exported, f"{title}: {name} is not exported by the service"
        # every label a query groups or filters by is one of its metrics' labels (or the
        # replica label Prometheus adds per target, see docker/prometheus.yml)
        allowed = {"replica", "le"} | set().union(
            *(labels.get(re.sub(r"_(total|bucket|count|sum)$", "", n), set()) for n in names)
        )
        used = set(re.findall(r"by \(([^)]*)\)", expr))
        used = {label.strip() for group in used for label in group.split(",")}
        used |= set(re.findall(r"[{,]\s*([a-z_]+)\s*=~?", expr))
        assert used <= allowed, f"{title}: labels {used - allowed} are not on {names}"


def test_the_dashboard_covers_what_operators_ask_and_uses_the_provisioned_datasource():
    dashboard = json.loads(DASHBOARD.read_text())
    text = " ".join(expr for _, expr in queries())
    for needed in (
        "promptswap_requests_total",  # throughput
        "promptswap_request_seconds_bucket",  # latency
        "promptswap_queue_depth",
        "promptswap_batch_size_bucket",
        "promptswap_text_cache_hits_total",  # cache hit rate
        "topk(10, sum by (adapter) (rate(promptswap_adapter_requests_total",  # hottest adapters
    ):
        assert needed in text
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["url"] == "http://prometheus:9090"  # the compose service
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"]
        assert all(t["datasource"]["uid"] == source["uid"] for t in panel["targets"])
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_compose_provisions_grafana_beside_prometheus():
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana = spec["services"]["grafana"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in grafana["volumes"]}
    assert mounts["/etc/grafana/provisioning"] == "./docker/grafana/provisioning"
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "promptswap.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert mounts[path] == "./docker/grafana/dashboards"
    assert "prometheus" in grafana["depends_on"]
    assert all(str(p).startswith("127.0.0.1:") for p in grafana["ports"])  # no auth in front
