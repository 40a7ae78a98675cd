"""Architecture rules that are easy to break by accident."""

from __future__ import annotations

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
