"""The job spec: every field optional, `{}` is the seed recipe (Phi-2 QLoRA on English oasst1).

Shared by the API (validation) and the worker (training); it imports nothing heavy. A job's
spec is stored (jobs.spec) as JobSpec dumps it and read back through `stored_spec`, so every
default lives here, once.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    HttpUrl,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from app.ids import CHECKPOINT_NAME_PATTERN, DATASET_ID, JOB_ID_PATTERN
from app.local_paths import (
    NOT_A_MODEL_OR_DATASET,
    allowed_local_path,
    missing_local_path_problem,
    names_a_local_path,
)

# org/name, optionally pinned: org/name@revision
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}(@[\w./-]{1,128})?$")


def resolve_model_or_dataset(value: str) -> str:
    """An allowed local path (made absolute) or a hub id `org/name[@revision]`. A name spelled
    as a local path (`names_a_local_path`) never goes to the hub: missing, it is refused as
    missing. Anything else is refused with one message, so a refusal tells nothing about the
    server's files. Workers look hub ids up from an empty working folder, so a hub id never
    names a local file there."""
    value = value.strip()
    local = allowed_local_path(value)
    if local is not None:
        return str(local)
    if names_a_local_path(value):
        raise ValueError(missing_local_path_problem(value))
    if "://" in value or not HUB_ID.match(value):
        raise ValueError(NOT_A_MODEL_OR_DATASET)
    return value


# Longest hub id or local path a spec may name.
MAX_NAME_CHARS = 1024

# Validation context of a stored spec being read back (`stored_spec`).
STORED = "stored"


def _unless_stored(check: Callable[[str], str]) -> Callable[[str, ValidationInfo], str]:
    """`check` for a spec being submitted; a stored spec's names pass as they are: they were
    checked and made absolute when its job was created (a file gone since is the worker's to
    report when it opens it; a listing or a notification never fails over it)."""

    def validate(value: str, info: ValidationInfo) -> str:
        return value if isinstance(info.context, dict) and info.context.get(STORED) else check(value)

    return validate


# A field naming a model or dataset: validated and made absolute when local.
ModelOrDataset = Annotated[
    str,
    StringConstraints(max_length=MAX_NAME_CHARS),
    AfterValidator(_unless_stored(resolve_model_or_dataset)),
]

# The seed recipe's base model and sequence lengths: the defaults of a job spec and of an upload's
# token statistics alike.
DEFAULT_BASE_MODEL = "microsoft/phi-2"
DEFAULT_MAX_SEQ_LENGTH = 2048
MIN_SEQ_LENGTH, MAX_SEQ_LENGTH = 16, 131072

# An uploaded dataset (POST /datasets) is named by its id (app/ids.py); the job service checks
# that it exists and is valid.


# What a local dataset may be: one of these files, or a folder `datasets` loads (one written by
# `save_to_disk`, or one holding data files of these kinds).
DATASET_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
DATASET_FOLDER_FILE_SUFFIXES = (*DATASET_FILE_SUFFIXES, ".csv", ".arrow")
SAVED_TO_DISK_MARKERS = ("dataset_dict.json", "state.json")
LOCAL_DATASET_KINDS = (
    "a .jsonl, .json or .parquet file, or a folder written by `save_to_disk` or holding "
    ".jsonl, .json, .parquet, .csv or .arrow files"
)


def saved_to_disk(folder: Path) -> bool:
    return any((folder / marker).is_file() for marker in SAVED_TO_DISK_MARKERS)


def local_dataset_problem(path: Path) -> str | None:
    """Why a local path (allowed, existing) can't be a dataset, or None."""
    if path.is_file():
        if path.suffix not in DATASET_FILE_SUFFIXES:
            return (
                f"{path.name} is not a dataset this service reads; a local dataset is {LOCAL_DATASET_KINDS}"
            )
        if not os.access(path, os.R_OK):
            return f"{path.name} can't be read by the service"
        return None
    if saved_to_disk(path):
        return None
    files = (f for f in itertools.islice(path.rglob("*"), 10_000) if f.suffix in DATASET_FOLDER_FILE_SUFFIXES)
    if next(files, None) is None:
        return f"folder {path.name} holds no dataset; a local dataset is {LOCAL_DATASET_KINDS}"
    return None


def resolve_dataset_source(value: str) -> str:
    if DATASET_ID.match(value.strip()):
        return value.strip()
    resolved = resolve_model_or_dataset(value)
    problem = local_dataset_problem(Path(resolved)) if Path(resolved).is_absolute() else None
    if problem:
        raise ValueError(problem)
    return resolved


DatasetSource = Annotated[
    str, StringConstraints(max_length=MAX_NAME_CHARS), AfterValidator(_unless_stored(resolve_dataset_source))
]
# A dataset split: `train`, `validation[:10%]`, …
Split = Annotated[str, StringConstraints(pattern=r"^[\w.\-\[\]:%]+$", max_length=128)]
Language = Annotated[str, StringConstraints(min_length=1, max_length=16)]
ModuleName = Annotated[str, StringConstraints(min_length=1, max_length=128)]


def split_revision(hub_id: str) -> tuple[str, str | None]:
    name, _, revision = hub_id.partition("@")
    return name, revision or None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# What a dataset's records may be (`auto`: detected from the first record). Which training method
# each fits is app.preferences.METHODS_OF_FORMAT's.
DatasetFormat = Literal[
    "auto",
    "oasst_rows",
    "oasst_trees",
    "chat",
    "sharegpt",
    "alpaca",
    "prompt_completion",
    "text",
    "preference",
    "openai_preference",
]

# how conversations are written out (DatasetSpec.template); the default is the seed recipe's
Template = Literal["human_assistant", "chat_template"]
DEFAULT_TEMPLATE: Template = "human_assistant"


class DatasetSpec(_Strict):
    source: DatasetSource = Field(
        "OpenAssistant/oasst1", description="Hub id, local file or folder, or an uploaded dataset's id."
    )
    split: Split = "train"
    languages: list[Language] | None = Field(
        default_factory=lambda: ["en"],
        max_length=64,
        description="Keep messages in these languages; null keeps all.",
    )
    format: DatasetFormat = Field(
        "auto",
        description="Detected from the first record, or named: oasst1 message rows or tree export; "
        "chat `messages` (OpenAI's, with content parts and `weight`); ShareGPT `conversations`; Alpaca "
        "`instruction`/`input`/`output`; `prompt`/`completion` (text or messages); plain `text`. "
        "Preference pairs (method dpo): OpenAI's `input`/`preferred_output`/`non_preferred_output` "
        "(`openai_preference`), TRL's `prompt`/`chosen`/`rejected` as text or messages (`preference`); "
        "oasst1 rows and trees give pairs from their replies' ranks.",
    )
    conversations: Literal["all_replies", "best_path"] = Field(
        "all_replies",
        description="One sample per assistant reply with its ancestors, or the best-ranked path per tree.",
    )
    include_synthetic: bool = True
    template: Template = Field(
        DEFAULT_TEMPLATE,
        description="How conversations are written out: the seed recipe's `Human: …` / `Assistant: …` "
        "lines, or the base tokenizer's own chat template (`apply_chat_template`; Llama-3, Qwen2, "
        "Mistral-Instruct and other instruct bases have one). Samples are prompted the same way.",
    )
    train_on: Literal["assistant", "all"] = Field(
        "assistant", description="Which tokens carry loss: assistant replies only, or every token."
    )
    max_samples: int | None = Field(None, ge=1, description="Use at most this many samples.")
    validation_split: Split | None = Field(
        "validation",
        description="Split giving eval_loss, for hub or folder datasets; data without it (a file, an "
        "upload, a folder of one saved Dataset) has no validation, never its training rows.",
    )
    validation_source: DatasetSource | None = Field(
        None, description="A separate validation file or dataset; overrides validation_split."
    )
    max_eval_samples: int | None = Field(None, ge=1)


class QuantizationSpec(_Strict):
    bits: Literal[4] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "float16", description="'auto' picks bfloat16 where the GPU supports it, else float16."
    )


class LoraSpec(_Strict):
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: (
        Literal["auto", "all-linear"] | Annotated[list[ModuleName], Field(min_length=1, max_length=64)]
    ) = Field(
        "auto",
        description="Which linear layers get LoRA. `auto`: the seed recipe's for Phi (q_proj, k_proj, "
        "v_proj, dense), the attention projections (q_proj, k_proj, v_proj, o_proj) for Llama, Mistral, "
        "Qwen2, Gemma and the like; `all-linear`: every linear layer but the output head; or names. "
        "Names that match no layer of the base are refused before training, listing those that exist.",
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        "none", description="Which bias vectors train beside the LoRA weights (peft's `bias`)."
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _module_names(cls, value: Any) -> Any:
        """One error naming the field (not one per shape the union allows)."""
        if isinstance(value, str):
            if value not in ("auto", "all-linear"):
                raise ValueError(f"{value[:64]!r} is not 'auto', 'all-linear' or a list of module names")
            return value
        if not isinstance(value, list) or not 1 <= len(value) <= 64:
            raise ValueError("'auto', 'all-linear', or a list of 1 to 64 module names")
        for name in value:
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w.]{0,127}", name):
                raise ValueError(f"{str(name)[:64]!r} is not a module name")
        return value


# Optimizer steps a job may ask for (several days at the fastest step measured).
MAX_STEPS = 1_000_000

LrScheduler = Literal[
    "cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"
]
Optimizer = Literal[
    "paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch", "adamw_bnb_8bit", "sgd", "adafactor"
]


class TrainingSpec(_Strict):
    epochs: float = Field(1.0, gt=0, le=1000)
    max_steps: int | None = Field(
        None,
        ge=1,
        le=MAX_STEPS,
        description="Overrides epochs when set. At most a million: beyond that the warmup alone "
        "(warmup_ratio of the steps) would keep the learning rate near 0 for days.",
    )
    batch_size: int = Field(4, ge=1, le=1024)
    gradient_accumulation_steps: int = Field(4, ge=1, le=1024)
    learning_rate: float = Field(2e-4, gt=0, le=1)
    lr_scheduler: LrScheduler = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    optimizer: Optimizer = "paged_adamw_32bit"
    max_seq_length: int = Field(DEFAULT_MAX_SEQ_LENGTH, ge=MIN_SEQ_LENGTH, le=MAX_SEQ_LENGTH)
    gradient_checkpointing: bool = True
    packing: bool = Field(
        True,
        description="Pack each optimizer step's batch_size × gradient_accumulation_steps samples into "
        "at most batch_size rows of max_seq_length tokens, each sample attending only to itself "
        "(no padding computed). false pads every sample as the seed recipe did.",
    )
    packing_mode: Literal["per_step", "full_rows"] = Field(
        "per_step",
        description="per_step: each optimizer step packs batch_size × gradient_accumulation_steps "
        "samples (the seed's recipe). full_rows: rows filled to max_seq_length, a step is "
        "gradient_accumulation_steps micro-batches of batch_size full rows (~16× fewer steps per epoch "
        "on oasst1; docs/benchmarks.md says how to set the learning rate). Needs packing: true.",
    )
    save_steps: int = Field(100, ge=1)
    save_total_limit: int = Field(2, ge=1, le=1000)
    logging_steps: int = Field(10, ge=1)
    eval_steps: int | None = Field(None, ge=1, description="Default: save_steps.")
    seed: int = Field(42, ge=0, le=2**32 - 1)


class ResourcesSpec(_Strict):
    gpus: int = Field(
        1,
        ge=1,
        le=16,
        description="GPUs of one worker host the job trains on, data-parallel (torchrun). Each optimizer "
        "step still takes batch_size × gradient_accumulation_steps samples, split between the GPUs.",
    )


Priority = Literal["high", "normal", "low"]
# The rank the dispatcher sorts on (app/models.py Job.priority): lower goes first.
PRIORITY_RANKS: dict[str, int] = {"high": 0, "normal": 1, "low": 2}


SUPERVISED, DPO = "supervised", "dpo"
DEFAULT_DPO_BETA = 0.1


def _auto_beta(value: Any) -> Any:
    """OpenAI's `"auto"` is the usual beta."""
    return DEFAULT_DPO_BETA if value == "auto" else value


class DpoHyperparameters(_Strict):
    beta: Annotated[float, BeforeValidator(_auto_beta)] = Field(
        DEFAULT_DPO_BETA,
        gt=0,
        le=100,
        description="How far the model may move from the reference: small lets it move further "
        "('auto': 0.1).",
    )
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid",
        description="sigmoid: DPO's own loss; ipo: IPO's squared loss (log-ratios averaged per completion "
        "token, as TRL computes it); hinge: SLiC's hinge loss. Each as TRL 1.16's DPOTrainer computes it.",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="sigmoid only: the share of pairs assumed mislabelled (conservative DPO); 0: plain DPO.",
    )
    reference: Literal["auto", "base", "init"] = Field(
        "auto",
        description="What the policy is compared with: `base`, the base model (the adapter switched off: no "
        "second copy of the model); `init`, the adapter this job continues from (`init_from`), kept frozen; "
        "`auto`: `init` when the job continues from an adapter, else `base`.",
    )


class DpoSettings(_Strict):
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class MethodSpec(_Strict):
    """How the job teaches: `supervised` (imitate the replies: the recipe) or `dpo` (Direct Preference
    Optimization on chosen/rejected pairs). Shaped like OpenAI's fine-tuning `method`."""

    type: Literal["supervised", "dpo"] = "supervised"
    dpo: DpoSettings | None = Field(None, description="DPO's settings; filled with defaults for a dpo job.")

    @model_validator(mode="after")
    def _settings_of_the_method(self) -> MethodSpec:
        if self.type == DPO and self.dpo is None:
            self.dpo = DpoSettings()
        if self.type != DPO and self.dpo is not None:
            raise ValueError("method.dpo is for method.type 'dpo'")
        return self


class InitFrom(_Strict):
    """An earlier job of yours whose adapter this job starts from (its final adapter, or a kept
    checkpoint); the base model, quantization and LoRA shape come from that job."""

    job: str = Field(pattern=f"^{JOB_ID_PATTERN}$", max_length=64, description="The earlier job's id.")
    checkpoint: str | None = Field(
        None,
        pattern=f"^{CHECKPOINT_NAME_PATTERN}$",
        max_length=64,
        description="One of its kept checkpoints; null: its final adapter (the job must have succeeded).",
    )


# Experiment tracking (OpenAI's `integrations`, MLflow beside W&B): the job's run, with its metric
# rows, its spec as parameters and (MLflow) its adapter, goes where the server's operator points
# each tracker (worker/training/tracking.py); a job may name one of each.
TRACKERS = ("wandb", "mlflow")
TrackerName = Annotated[str, StringConstraints(min_length=1, max_length=128)]
TrackerTag = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class WandbSettings(_Strict):
    project: TrackerName = Field(description="The W&B project the run is made in.")
    name: TrackerName | None = Field(None, description="The run's display name; default: the job's id.")
    entity: TrackerName | None = Field(None, description="Team or user; default: the server's API key's.")
    tags: list[TrackerTag] | None = Field(None, max_length=32)


class MlflowSettings(_Strict):
    experiment: TrackerName = Field("finetune", description="The run's experiment (made if new).")
    run_name: TrackerName | None = Field(None, description="The run's name; default: the job's id.")


class Integration(_Strict):
    """A tracker the job's run is sent to: `{"type": "wandb", "wandb": {"project": …}}` as OpenAI
    has it, or `{"type": "mlflow", "mlflow": {"experiment"?, "run_name"?}}`."""

    type: Literal["wandb", "mlflow"]
    wandb: WandbSettings | None = None
    mlflow: MlflowSettings | None = None

    @model_validator(mode="after")
    def _settings_of_the_type(self) -> Integration:
        if self.type == "mlflow" and self.mlflow is None:
            self.mlflow = MlflowSettings()
        if self.type == "wandb" and self.wandb is None:
            raise ValueError("type 'wandb' needs its settings, with at least the project: wandb.project")
        other = "mlflow" if self.type == "wandb" else "wandb"
        if getattr(self, other) is not None:
            raise ValueError(f"{other} is for type {other!r}, not {self.type!r}")
        return self


def tracker_problem(tracker: str) -> str | None:
    """Why this server can't send runs to `tracker`, or None (read when a job is submitted)."""
    from app.settings import get_settings

    settings = get_settings()
    if tracker == "mlflow" and not settings.mlflow_tracking_uri:
        return "this server has no MLflow tracking server (FINETUNE_MLFLOW_TRACKING_URI)"
    if tracker == "wandb" and not (settings.wandb_api_key or settings.wandb_mode == "offline"):
        return "this server has no W&B account (WANDB_API_KEY, or WANDB_MODE=offline)"
    return None


# Labels a user attaches to a job (OpenAI's `metadata`: up to 16 pairs, keys ≤ 64 characters,
# values ≤ 512).
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


# A job's spec is stored with every field written out (`model_dump(mode="json")`) and read back
# only through `stored_spec`.
#
# Rule: changing a default, or adding a field whose default means something other than what jobs
# stored before it did, needs an Alembic data migration that writes the old meaning into every
# stored spec lacking the field (as app/migrations/versions/0007_stored_spec_defaults.py does for
# `training.packing`); without it an old job, resumed, silently trains under the new default.
class JobSpec(_Strict):
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        max_length=64,
        description="A short label for the job and its adapter (OpenAI's `suffix`).",
    )
    metadata: dict[MetadataKey, MetadataValue] | None = Field(
        None, max_length=16, description="Up to 16 key-value labels, kept with the job."
    )
    base_model: ModelOrDataset = DEFAULT_BASE_MODEL
    # before `dataset`, whose validator reads it
    method: MethodSpec = Field(default_factory=MethodSpec)
    init_from: InitFrom | None = Field(
        None, description="Start from an earlier job's adapter instead of a new one (OpenAI: `model: ft:…`)."
    )
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    priority: Priority = Field(
        "normal",
        description="high, normal or low: a free GPU goes to the highest priority waiting; among equal "
        "priorities owners take turns. A high job that fits no free GPU may pause a low one at its next "
        "checkpoint (it resumes by itself).",
    )
    notify_url: HttpUrl | None = Field(
        None,
        description="Gets a JSON POST signed the Standard Webhooks way (webhook-id, webhook-timestamp, "
        "webhook-signature) when the job ends; public addresses only (docs/deploy.md).",
    )
    integrations: list[Integration] = Field(
        default_factory=list,
        max_length=len(TRACKERS),
        description="Trackers the run is sent to (W&B as OpenAI's `integrations`, or MLflow): each "
        "logged step's figures, the spec as parameters, the adapter (MLflow). One of each type.",
    )

    @model_validator(mode="after")
    def _dpo_trains_packed(self) -> JobSpec:
        if self.method.type == DPO:
            if not self.training.packing or self.training.packing_mode != "per_step":
                raise ValueError(
                    "method 'dpo' trains packed, a step's pairs at a time: leave training.packing true and "
                    "training.packing_mode 'per_step'"
                )
            dpo = self.method.dpo.hyperparameters if self.method.dpo else DpoHyperparameters()
            if dpo.label_smoothing and dpo.loss_type != "sigmoid":
                raise ValueError("method.dpo.hyperparameters.label_smoothing is for loss_type 'sigmoid'")
            if dpo.reference == "init" and self.init_from is None:
                raise ValueError("method.dpo.hyperparameters.reference 'init' needs init_from")
        return self

    @field_validator("dataset")
    @classmethod
    def _data_fits_the_method(cls, dataset: DatasetSpec, info: ValidationInfo) -> DatasetSpec:
        """A named format, or a local file's first record, that can't feed this job's method is
        refused with the method it fits (uploads: app.services.datasets; the worker checks the
        rest)."""
        method = info.data.get("method")
        if method is None or (isinstance(info.context, dict) and info.context.get(STORED)):
            return dataset
        from app.dataset_report import first_record_format
        from app.preferences import method_fit_problem

        for name in ("source", "validation_source"):
            value, fmt = getattr(dataset, name), dataset.format
            if value is None or (fmt == "auto" and not Path(value).is_absolute()):
                continue
            detected = first_record_format(Path(value)) if fmt == "auto" else fmt
            problem = method_fit_problem(detected, method.type)
            if problem:
                raise ValueError(f"{name}: {problem}")
        return dataset

    @field_validator("integrations")
    @classmethod
    def _trackers_this_server_has(
        cls, integrations: list[Integration], info: ValidationInfo
    ) -> list[Integration]:
        types = [integration.type for integration in integrations]
        if len(set(types)) < len(types):
            raise ValueError("one integration of each type")
        if isinstance(info.context, dict) and info.context.get(STORED):
            return integrations  # a tracker gone since is the worker's to report (an event)
        for tracker in types:
            if problem := tracker_problem(tracker):
                raise ValueError(f"{tracker}: {problem}")
        return integrations

    @property
    def dpo(self) -> DpoHyperparameters | None:
        """The DPO settings of a dpo job; None for a supervised one."""
        return self.method.dpo.hyperparameters if self.method.type == DPO and self.method.dpo else None

    @model_validator(mode="after")
    def _full_rows_need_packing(self) -> JobSpec:
        if self.training.packing_mode == "full_rows" and not self.training.packing:
            raise ValueError("training.packing_mode 'full_rows' needs training.packing: true")
        return self

    @model_validator(mode="after")
    def _steps_split_between_gpus(self) -> JobSpec:
        gpus, t = self.resources.gpus, self.training
        if gpus > 1:
            samples = t.batch_size * t.gradient_accumulation_steps
            if t.packing and samples % gpus:
                raise ValueError(
                    f"resources.gpus ({gpus}) must divide training.batch_size × "
                    f"gradient_accumulation_steps ({samples}): each GPU takes an equal share of a step"
                )
            if not t.packing and t.gradient_accumulation_steps % gpus:
                raise ValueError(
                    f"resources.gpus ({gpus}) must divide training.gradient_accumulation_steps "
                    f"({t.gradient_accumulation_steps}) when packing is off"
                )
        return self


def submitted_spec(fields: Mapping[str, Any]) -> JobSpec:
    """A spec being submitted, built from another shape than the REST body (which FastAPI
    validates as a JobSpec): every check runs and local paths are made absolute."""
    return JobSpec.model_validate(fields)


def stored_spec(spec: Mapping[str, Any]) -> JobSpec:
    """A job's stored spec (the `jobs.spec` column) as a JobSpec: the one way specs are read
    back, so a field an old row lacks takes its default from here (and the data migrations
    write the old meaning where a default changed: see JobSpec). Local paths are not checked
    again (`_unless_stored`)."""
    return JobSpec.model_validate(spec, context={STORED: True})
