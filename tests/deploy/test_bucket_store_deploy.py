"""Deploying with the adapter store in a bucket: the Kubernetes overlays (bucket-store
component), the compose override and the Ray Serve config, checked as the shared-volume
ones are (rendered, schema-validated, then what the service relies on)."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from typing import Any

import pytest
import yaml

from service.registry.s3_store import parse_s3_url
from service.settings import Settings
from tests.deploy.test_k8s_manifests import ROOT, Overlay, env_entries, objects, setting, validate
from tests.deploy.test_nginx import cluster_module, compose, env_of, replica_services

DOCKER = ROOT / "docker"
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
STORE_ENV = {"PROMPTSWAP_ADAPTER_STORE", "PROMPTSWAP_STORE_REFRESH_S", "AWS_REGION", "AWS_ENDPOINT_URL", *CREDENTIALS}


@pytest.fixture(params=("cpu", "gpu"))
def pair(request: pytest.FixtureRequest) -> tuple[Overlay, Overlay]:
    return Overlay(request.param), Overlay(f"{request.param}-bucket")


def test_bucket_overlays_validate_and_have_no_claim(pair: tuple[Overlay, Overlay]):
    plain, bucket = pair
    for obj in bucket.objs:
        validate(obj)
    assert not objects(bucket.objs, "PersistentVolumeClaim"), "no ReadWriteMany claim"
    assert not any("persistentVolumeClaim" in v for v in bucket.spec["volumes"])
    kinds = sorted(o["kind"] for o in plain.objs if o["kind"] != "PersistentVolumeClaim")
    assert sorted(o["kind"] for o in bucket.objs) == kinds


def test_bucket_overlay_names_a_bucket_and_takes_credentials_from_a_secret(pair: tuple[Overlay, Overlay]):
    _, bucket = pair
    c = bucket.container
    env = env_entries(c)
    assert "PROMPTSWAP_ADAPTER_DIR" not in env
    assert all(m["mountPath"] != "/data/adapters" for m in c["volumeMounts"])
    settings = Settings(
        adapter_store=setting(c, "adapter_store"), store_refresh_s=setting(c, "store_refresh_s")
    )
    assert parse_s3_url(settings.adapter_store)[0] and settings.store_refresh_s == 2
    for name in CREDENTIALS:
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert "value" not in env[name] and ref == {"name": "promptswap-bucket", "key": name}
    assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True  # AWS S3 itself
    for secret in objects(bucket.objs, "Secret"):
        assert not secret.get("data") and not secret.get("stringData"), "a secret value is shipped"


def test_bucket_overlay_changes_nothing_but_the_store(pair: tuple[Overlay, Overlay]):
    plain, bucket = pair

    def without_store(overlay: Overlay) -> dict[str, Any]:
        deployment = copy.deepcopy(overlay.deployment)
        spec = deployment["spec"]["template"]["spec"]
        c = next(c for c in spec["containers"] if c["name"] == "promptswap")
        c["env"] = [e for e in c["env"] if e["name"] not in STORE_ENV | {"PROMPTSWAP_ADAPTER_DIR"}]
        c["volumeMounts"] = [m for m in c["volumeMounts"] if m["mountPath"] != "/data/adapters"]
        spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "adapters"]
        return deployment

    assert without_store(bucket) == without_store(plain)


def test_compose_bucket_override_follows_the_schema_and_keeps_credentials_out():
    cluster_module("check_jsonschema", "check-jsonschema")
    files = [str(ROOT / "docker-compose.yml"), str(DOCKER / "compose.bucket.yml")]
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", *files],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    override = yaml.safe_load((DOCKER / "compose.bucket.yml").read_text())
    assert set(override["services"]) == set(replica_services(compose()))  # every replica
    for name, service in override["services"].items():
        env = env_of(service)
        assert re.fullmatch(r"\$\{PROMPTSWAP_ADAPTER_STORE:\?[^}]+\}", env["PROMPTSWAP_ADAPTER_STORE"]), name
        assert not set(CREDENTIALS) & set(env), f"{name}: credentials belong in the secret file"
        assert env["AWS_SHARED_CREDENTIALS_FILE"] == "/run/secrets/aws_credentials"
        assert service["secrets"] == ["aws_credentials"]
        # Mounts merge by target: the shared volume at the adapter directory is replaced.
        assert {"type": "tmpfs", "target": "/data/adapters"} in service["volumes"]
    assert "file" in override["secrets"]["aws_credentials"]


def test_ray_serve_config_takes_the_bucket_setting():
    text = (ROOT / "deploy" / "ray" / "serve-config.yaml").read_text()
    # The commented alternative, switched on as a user would.
    enabled = re.sub(r"(?m)^(\s*)# (adapter_store|store_refresh_s):", r"\1\2:", text)
    assert enabled != text
    args = yaml.safe_load(enabled)["applications"][0]["args"]
    settings = Settings(**args)
    assert settings.adapter_store == "s3://promptswap-adapters/adapters" and settings.store_refresh_s == 2
