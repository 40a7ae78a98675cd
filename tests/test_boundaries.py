"""Architecture rules that are easy to break by accident."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_the_api_and_the_worker_parent_never_import_torch_or_transformers():
    # worker.tasks is what the Celery parent process imports; training is imported in the child.
    code = (
        "import sys, app.api.main, app.cli, worker.tasks\n"
        "heavy = sorted({'torch', 'transformers', 'peft', 'bitsandbytes', 'datasets'} & set(sys.modules))\n"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_training_code_needs_no_queue_client():
    """Issue 17: the training child imported Celery through the upload service."""
    code = (
        "import sys, worker.training.recipe, worker.training.distributed\n"
        "queue = [m for m in sys.modules if m == 'app.queue' or m.split('.')[0] in ('celery', 'kombu')]\n"
        "print(queue); sys.exit(1 if queue else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
