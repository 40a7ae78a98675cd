"""OpenAI's fine-tuning job request, turned into the service's job spec.

`model` → `base_model`, `training_file` / `validation_file` → `dataset.source` /
`dataset.validation_source`, `suffix` → `name`, `seed` → `training.seed`, and the
hyperparameters (each a number or "auto", which keeps the recipe's value):
- `n_epochs` → `training.epochs`;
- `batch_size` (samples per optimizer step) → `training.batch_size` × `gradient_accumulation_steps`,
  keeping the recipe's micro-batch (4) where it divides the number;
- `learning_rate_multiplier` → `training.learning_rate` = the recipe's 2e-4 × multiplier.
`method` `supervised` or `dpo` → `method.type`; DPO's `beta` (and the spec's own DPO settings
`loss_type`, `label_smoothing`, `reference`, beside it in `method.dpo.hyperparameters`) →
`method.dpo.hyperparameters`. `model: ft:…` (a fine-tuned model or checkpoint of the caller's,
as /v1/models names them) → `init_from`: the job continues from that adapter, on its base.
`integrations` (OpenAI's `{"type": "wandb", "wandb": {…}}`, or the spec's MLflow one) →
`integrations` as they are.
Any of the spec's own sections (`lora`, `quantization`, `training`, `dataset`, `resources`,
`notify_url`) may come as extra body fields, e.g. the client's `extra_body={"lora": {"r": 8}}`.
"""

from __future__ import annotations

from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from app.errors import InvalidFields
from app.spec import MAX_NAME_CHARS, JobSpec, MetadataKey, MetadataValue, TrainingSpec, submitted_spec

RECIPE_LEARNING_RATE = TrainingSpec.model_fields["learning_rate"].default
RECIPE_MICRO_BATCH = TrainingSpec.model_fields["batch_size"].default

Auto = Literal["auto"]


# Each hyperparameter: "auto" or a number in (low, high], an int where the type says so.
LIMITS = {
    "n_epochs": (0, 1000, float),
    "batch_size": (0, 4096, int),
    "learning_rate_multiplier": (0, 100, float),
    "beta": (0, 100, float),
}


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: Auto | float = "auto"
    batch_size: Auto | int = "auto"
    learning_rate_multiplier: Auto | float = "auto"

    @field_validator("*", mode="before")
    @classmethod
    def _auto_or_in_range(cls, value: Any, info: ValidationInfo) -> Any:
        # one plain message, rather than one per member of the union
        low, high, kind = LIMITS[cast(str, info.field_name)]  # always set for a field validator
        if value == "auto":
            return value
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (kind is int and value != int(value)) or not low < value <= high:
            expected = "a whole number" if kind is int else "a number"
            raise ValueError(f"must be 'auto' or {expected} above {low} and at most {high}")
        return value


class DpoHyperparameters(Hyperparameters):
    """OpenAI's DPO hyperparameters; the spec's own DPO settings (`loss_type`, `label_smoothing`,
    `reference`) may sit beside them and are checked by the spec."""

    model_config = ConfigDict(extra="allow")

    beta: Auto | float = "auto"

    def spec_settings(self) -> dict[str, Any]:
        """What goes to the spec's `method.dpo.hyperparameters`: beta and the spec's own settings."""
        sent = self.model_dump(exclude_unset=True)
        return {name: value for name, value in sent.items() if name not in Hyperparameters.model_fields}


class Supervised(BaseModel):
    hyperparameters: Hyperparameters | None = None


class Dpo(BaseModel):
    hyperparameters: DpoHyperparameters | None = None


class Method(BaseModel):
    type: Literal["supervised", "dpo"] = Field(
        description="Supervised fine-tuning, or DPO on preference pairs (reinforcement is not offered)."
    )
    supervised: Supervised | None = None
    dpo: Dpo | None = None

    def hyperparameters(self) -> Hyperparameters | None:
        """The hyperparameters under this method's own section."""
        section = self.dpo if self.type == "dpo" else self.supervised
        return section.hyperparameters if section else None


class CreateJobRequest(BaseModel):
    # Extra fields are the service's own spec sections (checked by `submitted_spec` below).
    model_config = ConfigDict(extra="allow")

    model: str = Field(
        min_length=1, max_length=MAX_NAME_CHARS, description="A hub id or a local model folder."
    )
    training_file: str = Field(
        min_length=1, max_length=MAX_NAME_CHARS, description="A file id from POST /v1/files."
    )
    validation_file: str | None = Field(None, max_length=MAX_NAME_CHARS)
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = None
    metadata: dict[MetadataKey, MetadataValue] | None = Field(None, max_length=16)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    integrations: list[Any] | None = Field(None, max_length=16, description="W&B or MLflow (the spec's).")

    def merged_hyperparameters(self) -> Hyperparameters:
        """The method's hyperparameters over the top-level (deprecated) ones."""
        top = self.hyperparameters.model_dump(exclude_unset=True) if self.hyperparameters else {}
        method = self.method.hyperparameters() if self.method else None
        if method:
            top.update(method.model_dump(exclude_unset=True, include=set(Hyperparameters.model_fields)))
        return Hyperparameters(**top)

    def method_spec(self) -> dict[str, Any]:
        """The spec's `method` section; InvalidFields for the other method's section."""
        method = self.method
        if method is None:
            return {}
        other = "supervised" if method.type == "dpo" else "dpo"
        if getattr(method, other) is not None:
            raise InvalidFields((f"method.{other}", f"is for method.type {other!r}, not {method.type!r}"))
        if method.type != "dpo":
            return {"type": method.type}
        hyper = method.dpo.hyperparameters if method.dpo else None
        return {"type": "dpo", "dpo": {"hyperparameters": hyper.spec_settings() if hyper else {}}}


# Spec fields a user of this API sets through OpenAI's names.
OPENAI_NAMES = {
    "base_model": "model",
    "init_from": "model",
    "init_from.job": "model",
    "init_from.checkpoint": "model",
    "name": "suffix",
    "dataset.source": "training_file",
    "dataset.validation_source": "validation_file",
}


def job_spec(request: CreateJobRequest, init_from: dict[str, str | None] | None = None) -> JobSpec:
    """The job spec a request asks for; InvalidFields (param named as the user sent it) if not.
    `init_from`: what `model` names when it is a fine-tuned model (the route resolves it); the
    base model then comes from that job."""
    extra = dict(request.model_extra or {})
    dataset = dict(extra.pop("dataset", None) or {})
    training = dict(extra.pop("training", None) or {})
    taken: list[str] = [f for f in ("base_model", "name", "init_from") if f in extra]
    taken += [f"dataset.{f}" for f in ("source", "validation_source") if f in dataset]
    if taken:
        raise InvalidFields(*((f, f"set it with `{OPENAI_NAMES[f]}`") for f in taken))

    dataset["source"] = request.training_file
    if request.validation_file is not None:
        dataset["validation_source"] = request.validation_file
    hyper = request.merged_hyperparameters()
    params: dict[str, str] = {}  # spec field → the OpenAI parameter it came from, for errors
    if hyper.n_epochs != "auto":
        training["epochs"] = hyper.n_epochs
        params["training.epochs"] = "hyperparameters.n_epochs"
    if hyper.batch_size != "auto":
        micro = training.get("batch_size", RECIPE_MICRO_BATCH)
        micro = max(d for d in range(1, min(micro, hyper.batch_size) + 1) if hyper.batch_size % d == 0)
        training.update(batch_size=micro, gradient_accumulation_steps=hyper.batch_size // micro)
        params["training.batch_size"] = params["training.gradient_accumulation_steps"] = (
            "hyperparameters.batch_size"
        )
    if hyper.learning_rate_multiplier != "auto":
        training["learning_rate"] = training.get("learning_rate", RECIPE_LEARNING_RATE) * (
            hyper.learning_rate_multiplier
        )
        params["training.learning_rate"] = "hyperparameters.learning_rate_multiplier"
    if request.seed is not None:
        training["seed"] = request.seed
        params["training.seed"] = "seed"
    fields = {
        **extra,
        **({"init_from": init_from} if init_from else {"base_model": request.model}),
        "method": request.method_spec(),
        "dataset": dataset,
        "training": training,
        "name": request.suffix,
        "metadata": request.metadata,
        "integrations": request.integrations or [],
    }
    try:
        return submitted_spec(fields)
    except ValidationError as exc:
        problems = [(".".join(str(part) for part in e["loc"]), e["msg"]) for e in exc.errors()]
        raise InvalidFields(*problems).renamed({**OPENAI_NAMES, **params}) from None
