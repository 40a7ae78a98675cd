"""Architecture rules that are easy to break by accident."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import REPO


def assert_imports_leave_out(modules: str, unwanted: str) -> None:
    """Import `modules` in a fresh interpreter; fail naming every loaded module `unwanted` (a
    Python expression over the module name `m`) matches."""
    code = (
        f"import sys, {modules}\n"
        f"found = sorted(m for m in sys.modules if {unwanted})\n"
        "print(found); sys.exit(1 if found else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_api_and_the_worker_parent_never_import_torch_or_transformers():
    # worker.tasks is what the Celery parent process imports; training is imported in the child.
    assert_imports_leave_out(
        "app.api.main, app.cli, worker.tasks",
        "m in {'torch', 'transformers', 'peft', 'bitsandbytes', 'datasets'}",
    )


def test_training_code_needs_no_queue_client():
    """Issue 17: the training child imported Celery through the upload service."""
    assert_imports_leave_out(
        "worker.training.recipe, worker.training.distributed",
        "m == 'app.queue' or m.split('.')[0] in ('celery', 'kombu')",
    )


def test_stored_specs_are_read_only_through_stored_spec():
    """Issue 27: four places re-validated a job's stored spec as if it were being submitted, so a
    local file moved since made a resume (or a claim) fail with a 500. A spec is built with
    JobSpec's checks only in app/spec.py: `submitted_spec` for a new one, `stored_spec` for a
    stored one (the REST body is validated by FastAPI)."""
    offenders = []
    for path in sorted([*REPO.glob("app/**/*.py"), *REPO.glob("worker/**/*.py")]):
        if path == REPO / "app" / "spec.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            validates = (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("model_validate")
                and isinstance(node.value, ast.Name)
                and node.value.id == "JobSpec"
            )
            unpacks = (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "JobSpec"
                and any(keyword.arg is None for keyword in node.keywords)
            )
            if validates or unpacks:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == [], "use app.spec.stored_spec / submitted_spec"


def test_the_apis_list_of_native_causal_lm_types_is_transformers_own():
    """The API judges `auto_map` without importing transformers, from app/native_model_types.py."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from app.native_model_types import CAUSAL_LM_MODEL_TYPES

    missing = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - CAUSAL_LM_MODEL_TYPES
    every = " ".join(sorted(CAUSAL_LM_MODEL_TYPES | set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)))
    assert not missing, f"add {sorted(missing)} to app/native_model_types.py; the whole list: {every}"


def test_the_pool_childs_warm_up_leaves_cuda_to_the_job():
    """worker.warmup imports these on a CUDA build before a job has said how many GPUs it uses:
    none may initialize CUDA (bitsandbytes' import does), or CUDA would fix this process's GPUs
    before a one-GPU job narrows CUDA_VISIBLE_DEVICES to GPU 0."""
    from worker.warmup import WITHOUT_CUDA

    assert_imports_leave_out(", ".join(WITHOUT_CUDA), "m.split('.')[0] in ('peft', 'bitsandbytes')")
    code = (
        "import torch\n"
        "calls = []\n"
        "def recorder(name, real):\n"
        "    def called(*args, **kwargs):\n"
        "        calls.append(name)\n"
        "        return real(*args, **kwargs)\n"
        "    return called\n"
        "for name in ('is_available', 'device_count', 'init', '_lazy_init', 'current_device',\n"
        "             'get_device_capability', 'get_device_properties', 'get_device_name'):\n"
        "    setattr(torch.cuda, name, recorder(name, getattr(torch.cuda, name)))\n"
        f"import {', '.join(WITHOUT_CUDA)}\n"
        "print(calls)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
