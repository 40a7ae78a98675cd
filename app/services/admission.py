"""What a job spec must satisfy beyond its own validation before it is stored and queued:
uploads of this owner's that exist and are valid, no remote code, notifications that can be
signed and sent. (Local paths are checked by the spec itself when it is submitted:
`app.local_paths`; `local_source_problems` checks a stored spec's again before it is resumed.)"""

from __future__ import annotations

import json
from pathlib import Path

from app.errors import InvalidFields
from app.local_paths import LocalPathRefused, confined
from app.native_model_types import CAUSAL_LM_MODEL_TYPES
from app.services.datasets import dataset_reference_problems
from app.services.outbound import url_problem
from app.settings import get_settings
from app.spec import JobSpec


def _remote_code_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """A local model that would run its own Python code: its config maps to that code
    (`auto_map`) for a `model_type` transformers has no class of its own for. (One it knows, as
    microsoft/phi-2's download, loads with transformers' class: trust_remote_code stays off.)"""
    config = Path(spec.base_model) / "config.json"
    # a hub id is not looked at here (a relative name must never reach the API's own files)
    if get_settings().trust_remote_code or not config.is_absolute() or not config.is_file():
        return []
    try:
        fields = json.loads(config.read_text())
        needs_its_code = (
            bool(fields.get("auto_map")) and fields.get("model_type") not in CAUSAL_LM_MODEL_TYPES
        )
    except (OSError, ValueError, AttributeError):
        return [("base_model", "config.json is not readable JSON")]
    if needs_its_code:
        return [
            (
                "base_model",
                f"this model ships its own code (auto_map) for a model_type transformers has no class for "
                f"({fields.get('model_type')!r}); the server does not run remote code",
            )
        ]
    return []


def _template_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """A local base asked to render with its chat template must have one (a hub base's is
    checked by the worker, which fetches its tokenizer)."""
    folder = Path(spec.base_model)
    if spec.dataset.template != "chat_template" or not folder.is_absolute():
        return []
    if any((folder / name).is_file() for name in ("chat_template.jinja", "chat_template.json")):
        return []
    try:
        if json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template"):
            return []
    except (OSError, ValueError, AttributeError):
        pass
    return [
        (
            "dataset.template",
            "the base's tokenizer has no chat template (none in tokenizer_config.json, chat_template.jinja "
            "or chat_template.json); use 'human_assistant'",
        )
    ]


def _notification_problems(spec: JobSpec) -> list[tuple[str, str]]:
    if spec.notify_url is None:
        return []
    if not get_settings().notify_secret:
        return [("notify_url", "this server has no FINETUNE_NOTIFY_SECRET to sign notifications with")]
    problem = url_problem(str(spec.notify_url))
    return [("notify_url", problem)] if problem else []


def local_source_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """A stored spec's local model and data that are no longer there or no longer allowed (moved,
    deleted, or a link added since the job was submitted), by field."""
    named = {
        "base_model": spec.base_model,
        "dataset.source": spec.dataset.source,
        "dataset.validation_source": spec.dataset.validation_source,
    }
    problems = []
    for field, value in named.items():
        if value is None or not Path(value).is_absolute():
            continue
        try:
            confined(value)
        except LocalPathRefused as exc:
            problems.append((field, f"{exc} (it has moved or changed since the job was created)"))
    return problems


def check_admissible(spec: JobSpec, owner: str) -> None:
    problems = (
        dataset_reference_problems(spec, owner) + _notification_problems(spec) + _template_problems(spec)
    )
    if not problems:
        problems = _remote_code_problems(spec)
    if problems:
        raise InvalidFields(*problems)
