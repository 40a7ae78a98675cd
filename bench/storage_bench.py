"""What keeping checkpoints in an object store adds to a save and to a resume on another host:
the service's own store calls (app/storage) on a checkpoint-sized folder, timed.

    python bench/storage_bench.py                      # moto's S3 server on loopback
    python bench/storage_bench.py --storage-url s3://bucket/bench --endpoint-url http://minio:9000

A save: zip the Trainer's folder (as the worker does, stored, not deflated), then `put` it (the
upload the database waits for). A resume elsewhere: `unpacked` (download, sha256 check, unzip)
into an empty cache. On loopback moto this measures the service's side (hashing, zip, HTTP), not
a network; against a real store, pass its URL and endpoint (credentials the AWS way).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

# A Phi-2 LoRA r16 checkpoint (q, k, v, dense × 32 layers): 10.5 M adapter parameters in fp32,
# AdamW's two states, the rest small; and the demo job's (tests/test_storage.py: 4.7 MB).
CHECKPOINT_FILES = {
    "phi-2 r16": {
        "adapter_model.safetensors": 42_000_000,
        "optimizer.pt": 84_000_000,
        "rng_state.pth": 16_000,
    },
    "demo": {"adapter_model.safetensors": 1_600_000, "optimizer.pt": 3_100_000, "rng_state.pth": 16_000},
}


def moto_store() -> tuple[str, str]:
    """moto's S3 server on a free loopback port with one bucket: (storage URL, endpoint URL)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return "s3://bench/checkpoints", endpoint


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--storage-url", help="s3://bucket/prefix (default: moto on loopback)")
    parser.add_argument("--endpoint-url", default="")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    storage_url, endpoint = (args.storage_url, args.endpoint_url) if args.storage_url else moto_store()

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update(
            FINETUNE_DATA_DIR=str(Path(tmp) / "host-a"),
            FINETUNE_STORAGE_URL=storage_url,
            FINETUNE_STORAGE_ENDPOINT_URL=endpoint,
        )
        from app.settings import Settings
        from app.storage import job_files
        from worker.training.artifacts import zip_directory

        print(f"store {storage_url} at {endpoint or 'AWS'}; {args.repeats} runs each, median")
        print(f"{'checkpoint':<11} {'MB':>6} {'zip s':>7} {'put s':>7} {'unpack s':>9} {'put MB/s':>9}")
        for label, files in CHECKPOINT_FILES.items():
            zips, puts, unpacks, size = [], [], [], 0
            for run in range(args.repeats):
                writer = job_files(f"job_bench{run:019d}")
                folder = writer.checkpoint_dir("checkpoint-100")
                folder.mkdir(parents=True)
                for name, length in files.items():
                    (folder / name).write_bytes(os.urandom(length))
                started = time.perf_counter()
                info = zip_directory(folder, writer.checkpoint_zip("checkpoint-100"))
                zipped = time.perf_counter()
                writer.store.put(info.path)
                zips.append(zipped - started)
                puts.append(time.perf_counter() - zipped)
                size = info.size_bytes
                # another host: its own data dir, nothing of the first's
                reader = job_files(writer.root.name, Settings(data_dir=Path(tmp) / f"host-b-{run}"))
                started = time.perf_counter()
                unpacked = reader.unzipped_checkpoint("checkpoint-100", info.sha256)
                unpacks.append(time.perf_counter() - started)
                assert (unpacked / "optimizer.pt").stat().st_size == files["optimizer.pt"]
                writer.remove_checkpoint("checkpoint-100")
            put_s = statistics.median(puts)
            print(
                f"{label:<11} {size / 1e6:>6.1f} {statistics.median(zips):>7.2f} {put_s:>7.2f} "
                f"{statistics.median(unpacks):>9.2f} {size / 1e6 / put_s:>9.0f}"
            )


if __name__ == "__main__":
    main()
