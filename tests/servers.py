"""Servers the tests start: private Redis and PostgreSQL servers that a test may stop and
restart (the shared ones stay up for every other test), a webhook receiver and an S3-compatible
object store on loopback."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import wait_until
from tests.processes import free_port


@dataclass
class S3Server:
    """moto's S3 server in this process (no MinIO or other S3 server installs from PyPI here),
    one bucket; child processes reach it over HTTP as they would a real store."""

    server: Any
    endpoint_url: str
    bucket: str = "finetune-test"

    def env(self, prefix: str = "artifacts") -> dict[str, str]:
        """The settings that put a service's artifacts in this store, under `prefix`."""
        return {
            "FINETUNE_STORAGE_URL": f"s3://{self.bucket}/{prefix}",
            "FINETUNE_STORAGE_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        )

    def keys(self, prefix: str = "") -> list[str]:
        listed = self.client().list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return sorted(item["Key"] for item in listed.get("Contents", []))

    def stop(self) -> None:
        self.server.stop()


@contextmanager
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = S3Server(server, f"http://{host}:{port}")
    # moto keeps its buckets in the process, across servers: each test starts from none
    httpx.post(f"{s3.endpoint_url}/moto-api/reset").raise_for_status()
    s3.client().create_bucket(Bucket=s3.bucket)
    try:
        yield s3
    finally:
        server.stop()


@dataclass
class RedisServer:
    """A redis-server without persistence, like the one CI runs: a restart loses every message."""

    directory: Path
    port: int
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_until(
            lambda: (
                subprocess.run(
                    ["redis-cli", "-p", str(self.port), "ping"], capture_output=True
                ).stdout.strip()
                == b"PONG"
            ),
            30,
            what=f"redis-server on port {self.port} to answer PING",
            every=0.1,
        )

    def stop(self) -> None:
        assert self.process is not None
        self.process.kill()  # as a crash or an OOM kill would
        self.process.wait()


@contextmanager
def redis_server(directory: Path) -> Iterator[RedisServer]:
    server = RedisServer(directory, free_port())
    server.start()
    try:
        yield server
    finally:
        if server.process and server.process.poll() is None:
            server.stop()


@dataclass
class PostgresServer:
    directory: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str) -> None:
        command = ["pg_ctl", "-D", str(self.directory / "db"), "-w", *args]
        subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True, capture_output=True)

    def start(self) -> None:
        self._pg_ctl("-o", f"-p {self.port} -k {self.directory}", "-l", str(self.directory / "log"), "start")

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "stop")  # what a restart by an upgrade or an admin does


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A fresh cluster (initdb) owned by the `postgres` user, as initdb refuses to run as root."""
    directory = Path(tempfile.mkdtemp(prefix="finetune-pg-"))
    shutil.chown(directory, "postgres")
    server = PostgresServer(directory, free_port())
    subprocess.run(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            "initdb",
            "-D",
            str(directory / "db"),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
    )
    server.start()
    try:
        yield server
    finally:
        try:
            server.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(directory, ignore_errors=True)


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that records each POST (headers, body) and answers the
    n-th with `statuses[n]` (the last one repeats), with a `Location` header if given."""

    def __init__(self, statuses: tuple[int, ...] = (200,), location: str | None = None) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), body))
                self.send_response(statuses[min(len(receiver.requests), len(statuses)) - 1])
                if location:
                    self.send_header("Location", location)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
