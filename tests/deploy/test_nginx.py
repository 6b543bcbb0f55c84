"""Deployment: the shipped nginx config in front of real replicas, the compose file, the image.

Two real ``python -m service serve`` processes share one adapter store behind Debian's nginx
running the repository's ``docker/nginx/nginx.conf`` and ``upstream.conf``; only the listen
address, the upstream addresses and the container's temp/log paths are replaced. They check
what docker-compose.yml relies on: adapter-affinity routing, spread of header-less traffic,
store coherence across replicas, and no failed request while a replica stops.

nginx and promtool come from Debian (nginx-light, prometheus), the compose schema check from
check-jsonschema (PyPI, it ships the Compose Specification schema). When one is missing the
test skips, unless PROMPTSWAP_REQUIRE_CLUSTER_TOOLS=1 (CI), where it fails.

Over 400 lines: the real nginx and its two replicas start once per module, and every
check of what compose relies on runs against them.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.settings import Settings
from fixtures.adapters import adapter_bytes
from tests.conftest import encode, make_image

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
NGINX_DIR = DOCKER / "nginx"
COMPOSE_FILE = ROOT / "docker-compose.yml"
TOKEN = "deploy-test-admin-4d2b91"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
LABELS = ["cat", "dog", "boat"]
REPLICA_HEADER = "x-promptswap-replica"
# Container paths in nginx.conf that a test maps into its own temp dir.
NGINX_CONTAINER_PATHS = ("/var/cache/nginx/", "/var/log/nginx/")
SERVER_LINE = re.compile(r"^([ \t]*)server[ \t]+(\S+)([^;\n]*);[ \t]*\n", re.MULTILINE)


def cluster_tool(name: str, package: str) -> str:
    """The tool's path; skip without it, or fail where PROMPTSWAP_REQUIRE_CLUSTER_TOOLS=1."""
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if found:
        return found
    reason = f"{name} is not installed ({package})"
    if os.environ.get("PROMPTSWAP_REQUIRE_CLUSTER_TOOLS") == "1":
        pytest.fail(f"{reason}, and PROMPTSWAP_REQUIRE_CLUSTER_TOOLS=1 requires it")
    pytest.skip(reason)


def cluster_module(name: str, package: str) -> None:
    """The same rule for a Python module the deploy checks run."""
    try:
        __import__(name)
    except ImportError:
        cluster_tool(f"python module {name}", f"pip install {package}")  # never found: skips or fails


# ------------------------------------------------------------------ nginx config templating


def shipped_servers() -> list[tuple[str, str]]:
    """(address, parameters) of each ``server`` line in the shipped upstream.conf."""
    return [(m[2], m[3]) for m in SERVER_LINE.finditer((NGINX_DIR / "upstream.conf").read_text())]


def render_nginx(prefix: Path, listen_port: int, backends: list[str]) -> Path:
    """The shipped config under ``prefix``, changed only where a host differs from the
    container: listen address, upstream addresses (same parameters) and temp/log paths."""
    conf = (NGINX_DIR / "nginx.conf").read_text()
    assert conf.count("listen 8080;") == 1, "nginx.conf must listen on 8080 once (compose maps it)"
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{listen_port};")
    for container_path in NGINX_CONTAINER_PATHS:
        assert container_path in conf
        local = prefix / container_path.strip("/").replace("/", "_")
        local.mkdir(parents=True, exist_ok=True)
        conf = conf.replace(container_path, f"{local}/")

    upstream = (NGINX_DIR / "upstream.conf").read_text()
    servers = list(SERVER_LINE.finditer(upstream))
    params = {m[3] for m in servers}
    assert len(params) == 1, f"every replica should have the same health settings: {params}"
    first = servers[0]
    ours = "".join(f"{first[1]}server {address}{first[3]};\n" for address in backends)
    upstream = upstream[: first.start()] + ours + SERVER_LINE.sub("", upstream[first.start() :])

    (prefix / "nginx.conf").write_text(conf)
    (prefix / "upstream.conf").write_text(upstream)  # nginx.conf includes it from its own dir
    return prefix / "nginx.conf"


def nginx_command(nginx: str, prefix: Path, conf: Path, *extra: str, foreground: bool = False) -> list[str]:
    main = f"pid {prefix}/nginx.pid; error_log {prefix}/error.log notice;"
    if foreground:
        main += " daemon off;"  # a child the test can stop, not a daemon
    if os.geteuid() == 0:
        # As root, workers would drop to nobody, who cannot enter pytest's 0700 temp dirs.
        main += " user root;"
    return [nginx, "-p", f"{prefix}/", "-c", str(conf), "-g", main, *extra]


# ------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Replica:
    name: str
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Cluster:
    replicas: list[Replica]
    nginx_url: str
    nginx: subprocess.Popen
    prefix: Path
    clip_dir: Path

    def replica(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.name == name)


def start_replica(clip_dir: Path, store: Path, name: str, logs: Path) -> Replica:
    port = free_port()
    log = logs / f"{name}.log"
    args = [
        "--clip-model",
        str(clip_dir),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--port",
        str(port),
        "--replica-id",
        name,
        "--adapter-dir",
        str(store),
        "--torch-threads",
        "1",
        "--decode-threads",
        "1",
        "--log-level",
        "warning",
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PROMPTSWAP_ADMIN_TOKEN": TOKEN,
    }  # from the environment, as compose passes it
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Replica(name, port, proc, log)


def logs_text(*logs: Path) -> str:
    return "\n".join(log.read_text() for log in logs if log.exists())


def wait_answering(proc: subprocess.Popen, url: str, *logs: Path, limit_s: float = 120) -> None:
    give_up = time.monotonic() + limit_s
    while time.monotonic() < give_up:
        if proc.poll() is not None:
            raise AssertionError(f"{url} exited early ({proc.returncode}):\n{logs_text(*logs)}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)  # polling a child's readiness, not a timing assertion
    raise AssertionError(f"{url} did not become ready:\n{logs_text(*logs)}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session (nginx's workers too), nothing else
            proc.wait()


@pytest.fixture(scope="module")
def cluster(tiny_clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    nginx = cluster_tool("nginx", "Debian package nginx-light")
    root = tmp_path_factory.mktemp("cluster")
    store = root / "adapters"  # the shared volume
    procs: list[subprocess.Popen] = []
    try:
        replicas = []
        for name in ("r1", "r2"):  # both start loading before either is waited for
            replica = start_replica(tiny_clip_dir, store, name, root)
            procs.append(replica.proc)
            replicas.append(replica)
        for replica in replicas:
            wait_answering(replica.proc, replica.url, replica.log)

        prefix = root / "nginx"
        prefix.mkdir()
        port = free_port()
        conf = render_nginx(prefix, port, [f"127.0.0.1:{r.port}" for r in replicas])
        with open(prefix / "stdout.log", "w") as out:
            proc = subprocess.Popen(
                nginx_command(nginx, prefix, conf, foreground=True),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_answering(proc, url, prefix / "stdout.log", prefix / "error.log")
        yield Cluster(replicas, url, proc, prefix, tiny_clip_dir)
    finally:
        for proc in reversed(procs):
            stop(proc)


# ------------------------------------------------------------------ requests


@functools.cache
def image() -> bytes:
    return encode(make_image(3))


def classify(
    client: httpx.Client | None, url: str, adapter: str | None = None, header: str | None = None
) -> httpx.Response:
    data: dict[str, Any] = {"labels": LABELS}
    if adapter is not None:
        data["adapter"] = adapter
    headers = {"X-Adapter": header} if header is not None else {}
    post = client.post if client is not None else httpx.post
    return post(
        f"{url}/v1/classify", files={"image": ("i.png", image())}, data=data, headers=headers, timeout=60
    )


def upload(url: str, clip_dir: Path, name: str, seed: int) -> dict[str, Any]:
    r = httpx.post(
        f"{url}/v1/admin/adapters",
        headers=ADMIN,
        timeout=60,
        files={"file": ("a.safetensors", adapter_bytes(clip_dir, name, seed=seed))},
    )
    assert r.status_code == 201, r.text
    return r.json()


def versions(url: str, name: str) -> list[int]:
    r = httpx.get(f"{url}/v1/adapters/{name}", timeout=30)
    return [] if r.status_code == 404 else [v["version"] for v in r.json()["versions"]]


def same_scores(one: httpx.Response, other: httpx.Response) -> None:
    a, b = one.json(), other.json()
    assert a["adapter"] == b["adapter"]
    assert [x["label"] for x in a["labels"]] == [x["label"] for x in b["labels"]]
    assert [x["logit"] for x in a["labels"]] == pytest.approx([x["logit"] for x in b["labels"]], abs=1e-5)


# ------------------------------------------------------------------ end to end


def test_store_is_coherent_across_replicas(cluster: Cluster):
    """Each request resolves its adapter against the shared store before the device cache,
    so a write through one replica is seen by the other on its very next request."""
    a, b = cluster.replicas
    assert upload(a.url, cluster.clip_dir, "coherent", seed=1)["version"] == 1
    r = classify(None, b.url, adapter="coherent")  # through B, at once
    assert r.status_code == 200, r.text
    assert r.json()["adapter"] == "coherent@1" and r.headers[REPLICA_HEADER] == b.name
    assert classify(None, a.url, adapter="coherent@1").status_code == 200  # now on A's device too

    # A new version through B: A serves it on its next request; both give the same numbers.
    assert upload(b.url, cluster.clip_dir, "coherent", seed=2)["version"] == 2
    on_a, on_b = classify(None, a.url, adapter="coherent"), classify(None, b.url, adapter="coherent")
    assert on_a.json()["adapter"] == "coherent@2"
    same_scores(on_a, on_b)

    # Deleted through B: A, which holds both versions on its device, answers 404 for each.
    r = httpx.delete(f"{b.url}/v1/admin/adapters/coherent", headers=ADMIN, timeout=30)
    assert r.status_code == 200 and sorted(r.json()["deleted"]) == ["coherent@1", "coherent@2"]
    for ref in ("coherent", "coherent@1", "coherent@2"):
        r = classify(None, a.url, adapter=ref)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (ref, r.text)
    assert versions(a.url, "coherent") == []

    # Version numbers are never reused, whichever replica writes next.
    assert upload(a.url, cluster.clip_dir, "coherent", seed=3)["version"] == 3
    assert classify(None, b.url, adapter="coherent").json()["adapter"] == "coherent@3"


def test_nginx_routes_by_adapter_and_spreads_the_rest(cluster: Cluster):
    a, b = cluster.replicas
    nginx = cluster.nginx_url
    # An upload through nginx's admin route is stored once (never resent), seen by both.
    assert upload(nginx, cluster.clip_dir, "pets", seed=7)["version"] == 1
    assert versions(a.url, "pets") == versions(b.url, "pets") == [1]

    with httpx.Client() as client:
        # Every request naming one adapter, with or without a version, lands on one replica.
        pets: list[httpx.Response] = []
        for ref in ("pets", "pets@1") * 6:
            r = classify(client, nginx, adapter=ref, header=ref)
            assert r.status_code == 200, r.text
            pets.append(r)
        assert len({r.headers[REPLICA_HEADER] for r in pets}) == 1

        # Any affinity key is sticky (zero-shot requests here: the header only routes).
        for key in (f"tenant-{i}" for i in range(6)):
            seen = {classify(client, nginx, header=key).headers[REPLICA_HEADER] for _ in range(3)}
            assert len(seen) == 1, (key, seen)

        # Without the header requests spread: 20 random keys over 2 replicas (all 20 on one
        # of them has a probability of about 1e-5).
        spread = [classify(client, nginx) for _ in range(20)]
        assert all(r.status_code == 200 for r in spread)
        counts = {name: sum(r.headers[REPLICA_HEADER] == name for r in spread) for name in ("r1", "r2")}
        assert all(counts.values()), counts
        print(
            f"\nheader-less requests per replica: {counts}; 'pets' served by "
            f"{pets[0].headers[REPLICA_HEADER]}"
        )

        # Through nginx, the answer is the replica's own.
        for replica in (a, b):
            same_scores(pets[0], classify(None, replica.url, adapter="pets"))

        # nginx's own refusals keep the service's JSON error shape; metrics are per replica.
        r = client.get(f"{nginx}/metrics")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    for replica in (a, b):
        assert httpx.get(f"{replica.url}/metrics", timeout=30).text.startswith("# HELP")
    status, headers, body = raw_post_headers(nginx, "/v1/classify", content_length=64 * 2**20)
    assert status == 413 and b'"payload_too_large"' in body and "application/json" in headers


def raw_post_headers(url: str, path: str, content_length: int) -> tuple[int, str, bytes]:
    """Send only a request's headers; nginx refuses an over-bound Content-Length at once."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {content_length}\r\n\r\n".encode()
        )
        answer = b""
        while chunk := sock.recv(65536):  # nginx closes after refusing the body
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head.decode().lower(), body


def test_image_healthcheck_probes_healthz(cluster: Cluster):
    script = DOCKER / "healthcheck.py"
    alive = subprocess.run(
        [sys.executable, str(script)],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PROMPTSWAP_PORT": str(cluster.replicas[0].port)},
    )
    assert alive.returncode == 0, alive.stderr
    dead = subprocess.run(
        [sys.executable, str(script)],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PROMPTSWAP_PORT": str(free_port())},
    )
    assert dead.returncode == 1 and "unhealthy" in dead.stderr


@dataclass
class Outcome:
    index: int
    keyed: bool  # sent with X-Adapter
    after_exit: bool  # sent after the stopped replica's process had exited
    status: int | None
    replica: str | None
    error: str | None = None


def test_no_request_fails_while_a_replica_stops(cluster: Cluster):
    """SIGTERM the replica that serves an adapter while a client keeps sending requests
    for it (and header-less ones) through nginx: every request is answered 200."""
    nginx = cluster.nginx_url
    upload(cluster.replicas[0].url, cluster.clip_dir, "failover", seed=11)
    first = classify(None, nginx, adapter="failover", header="failover")
    assert first.status_code == 200, first.text
    victim = cluster.replica(first.headers[REPLICA_HEADER])
    survivor = next(r for r in cluster.replicas if r is not victim)

    outcomes: list[Outcome] = []
    changed = threading.Condition()
    exited, done = threading.Event(), threading.Event()

    def client_loop() -> None:
        with httpx.Client() as client:
            for i in range(400):  # a bound; the test stops it far earlier
                if done.is_set():
                    return
                keyed, after = i % 2 == 0, exited.is_set()
                try:
                    r = classify(client, nginx, adapter="failover", header="failover" if keyed else None)
                    outcome = Outcome(
                        i,
                        keyed,
                        after,
                        r.status_code,
                        r.headers.get(REPLICA_HEADER),
                        None if r.status_code == 200 else r.text,
                    )
                except httpx.HTTPError as exc:
                    outcome = Outcome(i, keyed, after, None, None, repr(exc))
                with changed:
                    outcomes.append(outcome)
                    changed.notify_all()

    thread = threading.Thread(target=client_loop, daemon=True)
    thread.start()
    try:
        with changed:
            assert changed.wait_for(lambda: len(outcomes) >= 6, timeout=120)
        victim.proc.send_signal(signal.SIGTERM)
        assert victim.proc.wait(timeout=60) in (0, -signal.SIGTERM)
        exited.set()
        with changed:
            assert changed.wait_for(lambda: sum(o.after_exit for o in outcomes) >= 12, timeout=120)
    finally:
        done.set()
        thread.join(timeout=120)

    failed = [o for o in outcomes if o.status != 200]
    assert not failed, failed
    after = [o for o in outcomes if o.after_exit]
    assert {o.replica for o in after} == {survivor.name}
    before = [o for o in outcomes if not o.after_exit]
    assert any(o.keyed and o.replica == victim.name for o in before)  # it was the adapter's replica
    # nginx did meet the stopped replica, and resent those requests to the survivor.
    log = (cluster.prefix / "error.log").read_text()
    met = [line for line in log.splitlines() if f"127.0.0.1:{victim.port}" in line and "[error]" in line]
    assert met, log
    print(
        f"\n{len(outcomes)} requests, {len(failed)} failed; before the exit: "
        f"{sum(o.replica == victim.name for o in before)} on {victim.name} (stopped), "
        f"{sum(o.replica == survivor.name for o in before)} on {survivor.name}; "
        f"after: {len(after)}, all on {survivor.name}; nginx resent {len(met)} attempts "
        f"that met {victim.name}"
    )

    # With no replica left, nginx answers in the service's error shape, with Retry-After.
    stop(survivor.proc)
    r = classify(None, nginx, adapter="failover", header="failover")
    assert r.status_code == 502 and r.json()["error"]["code"] == "no_replica"
    assert r.headers["retry-after"] == "5"


# ------------------------------------------------------------------ config checks


def test_nginx_accepts_the_shipped_config(tmp_path: Path):
    nginx = cluster_tool("nginx", "Debian package nginx-light")
    # Every shipped server, at a loopback address of its own (no DNS at test time).
    backends = [f"127.0.0.{i + 1}:8000" for i in range(len(shipped_servers()))]
    conf = render_nginx(tmp_path, free_port(), backends)
    result = subprocess.run(
        nginx_command(nginx, tmp_path, conf, "-t"), check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_promtool_accepts_the_prometheus_config():
    promtool = cluster_tool("promtool", "Debian package prometheus")
    result = subprocess.run(
        [promtool, "check", "config", str(DOCKER / "prometheus.yml")],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def nginx_blocks(text: str, kind: str) -> dict[str, str]:
    """``location ARGS { ... }`` bodies by ARGS (the shipped config nests no deeper)."""
    out = {}
    for m in re.finditer(rf"^\s*{kind}\s+([^{{]+?)\s*\{{", text, re.MULTILINE):
        depth, i = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        out[m[1]] = text[m.end() : i - 1]
    return out


def directive(block: str, name: str) -> str | None:
    found = re.findall(rf"^\s*{name}\s+([^;]+);", block, re.MULTILINE)
    return found[0].strip() if found else None


def size_bytes(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", value).groups()
    return int(number) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit.lower()]


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m)?", value).groups()
    return int(number) * {"ms": 0.001, "s": 1, None: 1, "m": 60}[unit]


def test_nginx_config_matches_the_service_bounds():
    text = (NGINX_DIR / "nginx.conf").read_text()
    defaults = {name: f.default for name, f in Settings.model_fields.items()}
    locations = nginx_blocks(text, "location")
    admin, chat, inference = locations["/v1/admin/"], locations["/v1/chat"], locations["/"]

    # Uploads and deletes are never resent; inference (pure) is, POST included.
    assert directive(admin, "proxy_next_upstream") == "off"
    for block in (chat, inference):
        retry = directive(block, "proxy_next_upstream").split()
        assert {"error", "timeout", "http_503", "non_idempotent"} <= set(retry)
        assert "http_429" not in retry  # overload backs off; it does not spill onto the others
    # Bodies the service accepts pass nginx, so the service's own JSON 413 answers past them.
    assert size_bytes(directive(admin, "client_max_body_size")) >= defaults["max_adapter_bytes"] + 2**20
    for block in (chat, inference):
        assert size_bytes(directive(block, "client_max_body_size")) >= defaults["max_body_bytes"]
    # The service's deadline answers (504) before nginx gives up on it.
    assert seconds(directive(inference, "proxy_read_timeout")) > defaults["request_timeout_s"]
    assert seconds(directive(chat, "proxy_read_timeout")) > defaults["chat_timeout_s"]
    assert directive(chat, "proxy_buffering") == "off"  # server-sent events flow as written

    # Affinity: the X-Adapter header, and a random key (never "") without it.
    affinity = nginx_blocks(text, "map")["$http_x_adapter $promptswap_affinity"]
    assert re.search(r'^\s*""\s+\$request_id;', affinity, re.MULTILINE)
    upstream = (NGINX_DIR / "upstream.conf").read_text()
    assert re.search(r"^\s*hash\s+\$promptswap_affinity\s+consistent;", upstream, re.MULTILINE)
    for _, params in shipped_servers():
        assert "max_fails=" in params and "fail_timeout=" in params


# ------------------------------------------------------------------ compose


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())  # YAML merge keys resolved


def replica_services(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in spec["services"].items() if re.fullmatch(r"promptswap-\d+", n)}


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_file_follows_the_compose_schema():
    cluster_module("check_jsonschema", "check-jsonschema")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE_FILE),
            str(DOCKER / "compose.gpu.yml"),
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_compose_config_accepts_the_files():
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run([docker, "compose", "version"], check=False, capture_output=True).returncode
    ):
        pytest.skip("no docker client with the compose plugin here")
    env = {**os.environ, "PROMPTSWAP_ADMIN_TOKEN": "not-a-real-token"}
    for files in (
        ["-f", str(COMPOSE_FILE)],
        ["-f", str(COMPOSE_FILE), "-f", str(DOCKER / "compose.gpu.yml")],
    ):
        result = subprocess.run(
            [docker, "compose", *files, "config", "-q"],
            check=False,
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr


def test_compose_replicas_share_the_store_and_take_secrets_from_the_environment():
    spec = compose()
    replicas = replica_services(spec)
    assert len(replicas) >= 2
    dockerfile = (DOCKER / "Dockerfile").read_text()
    store = re.search(r"PROMPTSWAP_ADAPTER_DIR=(\S+)", dockerfile)[1]
    secret_like = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|CREDENTIAL", re.IGNORECASE)
    ids = set()
    for name, service in replicas.items():
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
        assert service["image"] == replicas["promptswap-1"]["image"]  # one image for all
        assert f"adapters:{store}" in service["volumes"], name  # the one shared store
        assert "promptswap-healthcheck" in " ".join(service["healthcheck"]["test"])
        assert "ports" not in service, f"{name}: only nginx is published"
        env = env_of(service)
        ids.add(env["PROMPTSWAP_REPLICA_ID"])
        assert env["PROMPTSWAP_REPLICA_ID"] == name
        assert re.fullmatch(r"\$\{PROMPTSWAP_ADMIN_TOKEN:\?[^}]+\}", env["PROMPTSWAP_ADMIN_TOKEN"])
        for key, value in env.items():
            if secret_like.search(key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+(:?[-?][^}]*)?\}", value), f"{name}: {key} is a literal"
    assert len(ids) == len(replicas)
    assert "adapters" in spec["volumes"]

    nginx = spec["services"]["nginx"]
    assert set(nginx["depends_on"]) == set(replicas)
    assert any(str(p).endswith(":8080") for p in nginx["ports"])  # nginx.conf listens on 8080
    mounts = {m.split(":")[1]: m.split(":")[0] for m in nginx["volumes"]}
    assert mounts["/etc/nginx/nginx.conf"] == "./docker/nginx/nginx.conf"
    assert mounts["/etc/nginx/upstream.conf"] == "./docker/nginx/upstream.conf"  # nginx.conf's dir
    # nginx's upstream and Prometheus's targets are exactly the replica services.
    assert {address for address, _ in shipped_servers()} == {f"{n}:8000" for n in replicas}
    prometheus = spec["services"]["prometheus"]
    assert "./docker/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    scrape = yaml.safe_load((DOCKER / "prometheus.yml").read_text())["scrape_configs"]
    job = next(j for j in scrape if j["job_name"] == "promptswap")
    assert {t for c in job["static_configs"] for t in c["targets"]} == {f"{n}:8000" for n in replicas}

    gpu = yaml.safe_load((DOCKER / "compose.gpu.yml").read_text())["services"]
    assert set(gpu) == set(replicas)  # the GPU override covers every replica


# ------------------------------------------------------------------ image


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_builds_a_non_root_image_with_a_torch_build_argument():
    steps = dockerfile_instructions()
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]
    assert all(args.startswith("python:${PYTHON_VERSION}-slim") for op, args in steps if op == "FROM")

    # One build argument picks the torch build: the CPU index by default, a CUDA one by choice,
    # at the version CI tests.
    args = dict(a.split("=", 1) for op, a in steps if op == "ARG" and "=" in a)
    assert args["TORCH_INDEX"] == "cpu"
    assert any(
        op == "RUN" and "download.pytorch.org/whl/${TORCH_INDEX}" in a and "torch==${TORCH_VERSION}" in a
        for op, a in steps
    )
    assert f"torch=={args['TORCH_VERSION']}" in (ROOT / ".ci" / "run").read_text()
    # The Ray image is the same file with the project's own "ray" extra.
    assert args["EXTRAS"] == '""' and "optional-dependencies" in next(
        a for op, a in steps if "EXTRAS" in a and op == "RUN"
    )
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("ray[serve]") for d in extras["ray"])

    users = [a for op, a in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    healthcheck = next(a for op, a in final if op == "HEALTHCHECK")
    assert "promptswap-healthcheck" in healthcheck
    assert ("COPY", "docker/healthcheck.py /usr/local/bin/promptswap-healthcheck") in final
    assert "/healthz" in (DOCKER / "healthcheck.py").read_text()

    env = dict(pair.split("=", 1) for op, a in final if op == "ENV" for pair in shlex.split(a))
    assert env["PROMPTSWAP_HOST"] == "0.0.0.0"
    volumes = [v for op, a in final if op == "VOLUME" for v in re.findall(r'"([^"]+)"', a)]
    assert env["PROMPTSWAP_ADAPTER_DIR"] in volumes
    assert any(env["HF_HOME"] == v or env["HF_HOME"].startswith(v + "/") for v in volumes)
    secret_like = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|CREDENTIAL", re.IGNORECASE)
    named = list(env) + [a.split("=")[0] for op, a in steps if op == "ARG"]
    assert not [n for n in named if secret_like.search(n)], "no secret is baked into the image"

    assert ("ENTRYPOINT", '["promptswap"]') in final and ("CMD", '["serve"]') in final


def test_dockerignore_admits_only_what_the_image_copies():
    lines = [x.strip() for x in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [x for x in lines if x and not x.startswith("#")]
    assert rules[0] == "*"  # an allowlist: .env files, keys and checkpoints never enter the context
    admitted = [r[1:].rstrip("/") for r in rules if r.startswith("!")]
    for op, args in dockerfile_instructions():
        if op == "COPY" and not args.startswith("--from"):
            *sources, _ = args.split()
            for source in sources:
                assert source.rstrip("/") in admitted, f"COPY {source} is excluded by .dockerignore"
                assert (ROOT / source).exists()
