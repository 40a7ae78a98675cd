"""API memory and /healthz latency while a large dataset is uploaded and validated.

Starts `finetune serve` (SQLite, embedded broker, auth off on loopback) from a checkout, writes
an oasst1-rows JSONL file of the asked size (the validation split's real rows, repeated under
new ids: the shape that needs the thread index), uploads it, and meanwhile reads the server's
resident memory (/proc) and times /healthz every 0.25 s. Prints one FIGURE line.

    .venv/bin/python bench/upload_memory.py --size-mb 1024
    .venv/bin/python bench/upload_memory.py --size-mb 100 --repo /path/to/older/checkout
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
ROWS = REPO / "examples" / "data" / "oasst1" / "en-validation.jsonl"


def write_rows(path: Path, size: int) -> int:
    rows = [json.loads(line) for line in ROWS.read_text().splitlines()]
    copy = 0
    with path.open("w") as out:
        while out.tell() < size:
            copy += 1
            for row in rows:
                fresh = {**row, "message_id": f"{copy}-{row['message_id']}"}
                fresh["parent_id"] = row["parent_id"] and f"{copy}-{row['parent_id']}"
                fresh["message_tree_id"] = f"{copy}-{row['message_tree_id']}"
                out.write(json.dumps(fresh) + "\n")
    return copy * len(rows)


def rss_kib(pid: int) -> tuple[int, int]:
    """(resident, peak resident) of `pid` in KiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose API to measure")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="upload-bench-"))
    data = tmp / "upload.jsonl"
    rows = write_rows(data, args.size_mb << 20)
    port = free_port()
    env = {
        **os.environ,
        "FINETUNE_DATA_DIR": str(tmp / "data"),
        "FINETUNE_BROKER_URL": f"sqla+sqlite:///{tmp / 'broker.sqlite'}",
        "FINETUNE_AUTH": "off",
        "FINETUNE_PORT": str(port),
        "FINETUNE_MAX_UPLOAD_BYTES": str(2 << 30),
        "TMPDIR": str(tmp),
    }
    subprocess.run([sys.executable, "-m", "app.cli", "migrate"], cwd=args.repo, env=env, check=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve"],
        cwd=args.repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(f"{base}/healthz", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        idle_rss, _ = rss_kib(server.pid)
        latencies: list[float] = []
        rss: list[int] = []
        done = threading.Event()

        def watch() -> None:
            with httpx.Client(timeout=60) as client:
                while not done.is_set():
                    rss.append(rss_kib(server.pid)[0])
                    started = time.perf_counter()
                    client.get(f"{base}/healthz")
                    latencies.append(time.perf_counter() - started)
                    time.sleep(0.25)

        watcher = threading.Thread(target=watch)
        watcher.start()
        started = time.perf_counter()
        with data.open("rb") as file, httpx.Client(timeout=3600) as client:
            response = client.post(f"{base}/datasets", files={"file": ("upload.jsonl", file)})
        took = time.perf_counter() - started
        done.set()
        watcher.join()
        _, peak = rss_kib(server.pid)
        report = response.json().get("report", {})
    finally:
        server.terminate()
        server.wait(timeout=30)
    latencies.sort()
    print(
        f"FIGURE upload of {data.stat().st_size / 2**20:.0f} MiB ({rows:,} oasst1 rows): HTTP "
        f"{response.status_code}, status {response.json().get('status')}, {report.get('samples')} samples, "
        f"{report.get('trees')} trees, in {took:.1f} s; API resident memory {idle_rss / 1024:.0f} MiB idle, "
        f"peak {peak / 1024:.0f} MiB (max sampled during the upload {max(rss) / 1024:.0f} MiB); /healthz "
        f"during it: {len(latencies)} calls, median {statistics.median(latencies) * 1000:.0f} ms, "
        f"p99 {latencies[int(0.99 * (len(latencies) - 1))] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
