"""No network the operator didn't ask for (issue 28 item 7): the demo job on its local base and
data, a sample, exports and an upload's token statistics, run by `finetune dev` in a network
namespace of its own, look nothing up; bitsandbytes never fetches its CPU kernel from the hub."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, demo_spec, sqlite_only

# Every Python process of the service, forked or started, reports each name lookup and each
# connection to anything but loopback into $FINETUNE_TEST_NETWORK_LOG (an audit hook, PEP 578).
AUDIT_HOOK = """
import ipaddress, os, socket, sys

_LOG = os.environ.get("FINETUNE_TEST_NETWORK_LOG")


def _remote(host):
    if host is None:
        return False
    host = host.decode() if isinstance(host, bytes) else str(host)
    if host in ("", "localhost"):
        return False
    try:
        return not ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return True  # a name to resolve


def _hook(event, args):
    if event == "socket.getaddrinfo":
        host = args[0]
    elif event in ("socket.gethostbyname", "socket.gethostbyaddr"):
        host = args[0]
    elif event in ("socket.connect", "socket.sendto"):
        sock, address = args[0], args[-1]
        if getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
            return  # a unix socket, netlink
        host = address[0]
    else:
        return
    if _remote(host):
        with open(_LOG, "a") as out:
            out.write(f"{os.getpid()} {event} {host!r} {' '.join(sys.argv[:3])}\\n")


if _LOG:
    sys.addaudithook(_hook)
"""


def own_network_namespace() -> list[str] | None:
    """A command prefix that runs a command in a new network namespace with only loopback (up),
    or None where this machine doesn't allow one."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        return None
    prefix = ["unshare", "--map-root-user", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    probe = subprocess.run([*prefix, "true"], capture_output=True)
    return prefix if probe.returncode == 0 else None


def wait(client: httpx.Client, path: str, done: set[str], timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(path).json()
        if body["status"] in done or time.monotonic() > deadline:
            return body
        time.sleep(0.5)


def run_offline(env_file: str, result_file: str) -> None:
    """Inside the namespace: `finetune dev`, then the demo job (4 steps), a sample, a merged and
    a GGUF export, and an upload's token statistics under the default tokenizer; what each ended
    as goes to `result_file`."""
    from tests.processes import running_service

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.pop(name, None)  # what is tested is that nothing is looked up, not that it fails
    env = json.loads(Path(env_file).read_text())
    result: dict = {}
    with running_service(env, Path(result_file).parent, dev=True) as client:
        spec = demo_spec(max_steps=4, save_steps=4, eval_samples=4, max_seq_length=128)
        spec["dataset"]["max_samples"] = 32
        job = client.post("/jobs", json=spec).json()
        upload = client.post(
            "/datasets",
            files={"file": ("rows.jsonl", (REPO / spec["dataset"]["validation_source"]).read_bytes())},
        ).json()
        result["job"] = wait(client, f"/jobs/{job['id']}", {"succeeded", "failed", "cancelled"})["status"]
        sample = client.post(f"/jobs/{job['id']}/generate", json={"prompt": "Hello", "max_new_tokens": 4})
        result["sample"] = sample.json().get("status", sample.text)
        for fmt in ("merged", "gguf"):
            export = client.post(f"/jobs/{job['id']}/exports", json={"format": fmt})
            path = f"/jobs/{job['id']}/exports/{export.json().get('id')}"
            result[fmt] = (
                wait(client, path, {"succeeded", "failed"})["status"] if export.is_success else export.text
            )
        deadline = time.monotonic() + 120
        while (tokens := client.get(f"/datasets/{upload['id']}").json()["report"]["tokens"])[
            "status"
        ] == "pending" and time.monotonic() < deadline:
            time.sleep(0.5)
        result["tokens"] = tokens
        result["events"] = [e["message"] for e in client.get(f"/jobs/{job['id']}/events").json()["items"]]
    Path(result_file).write_text(json.dumps(result))


@pytest.mark.e2e
@pytest.mark.usefixtures("demo_model")
@sqlite_only
def test_the_demo_job_its_sample_exports_and_upload_statistics_look_nothing_up(service_env, tmp_path):
    namespace = own_network_namespace()
    if namespace is None:
        pytest.skip("this machine gives no network namespace to an unprivileged process (unshare -rn)")
    hook = tmp_path / "audit"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(AUDIT_HOOK)
    lookups = tmp_path / "lookups.log"
    env = {k: v for k, v in service_env.items() if k != "FINETUNE_BROKER_URL"}  # dev's SQLite broker
    env_file, result_file = tmp_path / "env.json", tmp_path / "result.json"
    env_file.write_text(json.dumps(env))
    started = time.monotonic()

    subprocess.run(
        [
            *namespace,
            sys.executable,
            "-c",
            f"from tests.test_offline import run_offline; run_offline(*{[str(env_file), str(result_file)]})",
        ],
        cwd=REPO,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)]),
            "FINETUNE_TEST_NETWORK_LOG": str(lookups),
        },
        check=True,
        timeout=540,
    )

    print(f"offline run took {time.monotonic() - started:.1f} s")
    result = json.loads(result_file.read_text())
    assert (result["job"], result["sample"], result["merged"], result["gguf"]) == (
        "succeeded",
        "succeeded",
        "succeeded",
        "succeeded",
    ), result
    tokens = result["tokens"]
    assert tokens["status"] == "done" and tokens["tokenizer"] == "microsoft/phi-2", tokens
    assert "the service's copy of microsoft/phi-2's tokenizer" in tokens["read_from"]
    assert not lookups.exists(), lookups.read_text()


def test_bitsandbytes_never_imports_hub_kernels_in_a_worker(tmp_path):
    """bitsandbytes 0.50 imports `kernels` and fetches `kernels-community/quantization-bitsandbytes`
    from the hub at import on a CPU with AVX512-BF16: forced on here, with a stand-in `kernels`
    that records being imported. Behind the worker's guard bitsandbytes reaches that import, is
    refused it and goes on with its own code; the stand-in is never run."""
    stand_in = tmp_path / "kernels"
    stand_in.mkdir()
    (stand_in / "__init__.py").write_text(
        "import os\n"
        "open(os.environ['KERNELS_IMPORTED'], 'w').close()\n"
        "def get_kernel(*args, **kwargs):\n"
        "    raise RuntimeError('a stand-in: there is no hub here')\n"
    )
    script = textwrap.dedent(
        """
        import importlib.abc, importlib.machinery, sys

        class Avx512Bf16(importlib.abc.MetaPathFinder):
            # bitsandbytes.functional, once run, reports AVX512-BF16 (as a Sapphire Rapids CPU does)
            def find_spec(self, name, path, target=None):
                if name != "bitsandbytes.functional":
                    return None
                spec = importlib.machinery.PathFinder.find_spec(name, path)
                run = spec.loader.exec_module
                def exec_module(module):
                    run(module)
                    module.has_avx512bf16 = lambda: True
                spec.loader.exec_module = exec_module
                return spec

        sys.meta_path.insert(0, Avx512Bf16())
        from worker import offline
        import bitsandbytes
        assert bitsandbytes.functional.has_avx512bf16()
        """
    )
    marker = tmp_path / "imported"

    run = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]),
            "KERNELS_IMPORTED": str(marker),
        },
        capture_output=True,
        text=True,
    )

    assert run.returncode == 0, run.stderr
    # bitsandbytes' own warning: it tried, and `import kernels` was refused
    assert "Failed to load CPU gemm_4bit_forward from kernels-community" in run.stderr, run.stderr
    assert "import of kernels halted" in run.stderr
    assert not marker.exists()
