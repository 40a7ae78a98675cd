"""Real service processes for end-to-end tests: `finetune serve`, `finetune worker`, `finetune dev`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from tests.conftest import REPO, bearer
from tests.helpers import wait_until


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def finetune_process(
    command: str, env: dict[str, str], log_dir: Path, name: str | None = None
) -> Iterator[subprocess.Popen]:
    """`finetune COMMAND` in its own process group (so a test can kill it and its children)."""
    with service_process(
        [sys.executable, "-m", "app.cli", command], env, log_dir / f"{name or command}.log"
    ) as process:
        yield process


@contextmanager
def service_process(argv: list[str], env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    """A long-running command in its own process group, stopped with SIGTERM at the end."""
    command = " ".join(argv[-2:])
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv,
            cwd=REPO,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            try:  # whatever it left behind in its group (a training child, a pool process)
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if process.returncode not in (0, -15, 143):
        print(f"--- {command} exited {process.returncode}; log tail:\n{log_path.read_text()[-4000:]}")


def wait_healthy(base_url: str, timeout: float = 60) -> None:
    def healthy() -> bool:
        try:
            return httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(healthy, timeout, what=f"{base_url}/healthz to answer 200")


@contextmanager
def running_service(
    env: dict[str, str], log_dir: Path, dev: bool = False, worker: bool = True
) -> Iterator[httpx.Client]:
    """API and worker as separate processes (or one `finetune dev`); yields a client for the API,
    with an API key of TEST_OWNER's (`finetune dev` runs without auth on loopback)."""
    port = free_port()
    env = {**env, "FINETUNE_HOST": "127.0.0.1", "FINETUNE_PORT": str(port)}
    with ExitStack() as stack:
        if dev:
            stack.enter_context(finetune_process("dev", env, log_dir))
        else:
            if worker:
                stack.enter_context(finetune_process("worker", env, log_dir))
            stack.enter_context(finetune_process("serve", env, log_dir))
        base_url = f"http://127.0.0.1:{port}"
        wait_healthy(base_url)
        headers = {} if dev else bearer()
        with httpx.Client(base_url=base_url, timeout=30, headers=headers) as client:
            yield client


def read_job(client: httpx.Client, job_id: str) -> dict | None:
    """The job, or None while the API can't answer (a test restarting the database or broker)."""
    try:
        response = client.get(f"/jobs/{job_id}")
    except httpx.TransportError:
        return None
    return response.json() if response.status_code == 200 else None


def job_state(client: httpx.Client, job_id: str) -> str:
    """Where the job is now, for a failure message."""
    job = read_job(client, job_id)
    return f"it is {job['status']} at step {job['current_step']}" if job else "the API does not answer"


def wait_for(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 300) -> dict:
    def reached() -> dict | None:
        job = read_job(client, job_id)
        return job if job and job["status"] in statuses else None

    return wait_until(
        reached,
        timeout,
        what=f"job {job_id} to be {' or '.join(sorted(statuses))}",
        every=0.25,
        state=lambda: job_state(client, job_id),
    )


def wait_for_step(client: httpx.Client, job_id: str, step: int, timeout: float = 300) -> dict:
    def reached() -> dict | None:
        job = read_job(client, job_id)
        return job if job and job["current_step"] >= step else None

    return wait_until(
        reached,
        timeout,
        what=f"job {job_id} to reach step {step}",
        every=0.1,
        state=lambda: job_state(client, job_id),
    )
