"""Every setting of the service, read once from FINETUNE_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class Settings(BaseSettings):
    # Environment variables only: the .env file next to docker-compose.yml is compose's (its
    # addresses name compose services), and must not steer `make run` from the same folder.
    model_config = SettingsConfigDict(env_prefix="FINETUNE_", extra="ignore")

    # Jobs' folders lie under it at paths app.storage.job_files names.
    data_dir: Path = Path("finetune-data")
    # Where artifacts are kept (uploads, checkpoint zips, adapters, exports): empty, the data dir
    # itself (one host, or a disk every host mounts at the same data_dir); `s3://bucket/prefix`,
    # an S3-compatible object store, the data dir then being each host's scratch cache
    # (app/storage/). Credentials the standard AWS way (AWS_ACCESS_KEY_ID, a profile, a role).
    storage_url: str = Field("", pattern=r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[\w./-]*)?)?$")
    # The store's endpoint when it is not AWS S3 (MinIO: `http://minio:9000`; R2:
    # `https://<account>.r2.cloudflarestorage.com`).
    storage_endpoint_url: str = ""
    # Downloads from an object store: 0 streams them through the API (clients need to reach only
    # the API); more answers 307 to a presigned URL of the store valid this many seconds (the
    # bytes skip the API; clients must reach the store and follow redirects).
    storage_redirect_s: int = Field(0, ge=0, le=7 * 24 * 3600)
    # Empty means a SQLite file under data_dir.
    database_url: str = ""
    # Redis in production; `finetune dev` switches to an embedded SQLite broker
    # (kombu's sqla transport) when this is not set.
    broker_url: str = DEFAULT_REDIS_URL
    # The broker queue job ids go to; samples and uploads' token statistics go to
    # `<queue>.samples`. Deployments (or test runs) that share one broker use different names.
    queue: str = Field("finetune", pattern=r"^[\w.-]{1,64}$")
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "INFO"
    # Every endpoint but /healthz needs `Authorization: Bearer <key>` (`finetune keys create`).
    # Off only for `finetune dev` on a loopback address; everything then belongs to "local".
    auth: bool = True
    # Queued (not yet running) jobs one owner may have at a time; more gets 429.
    max_queued_jobs: int = 100
    # Jobs one owner may have running (on GPUs) at a time; 0 is no limit. The others wait queued,
    # in their turn (app/services/scheduler.py).
    max_running_per_owner: int = Field(0, ge=0)
    max_upload_bytes: int = 1 << 30
    # Every other request body (job specs, resume requests).
    max_body_bytes: int = 1 << 20
    # A request's header names and values together (cookies, tokens, a proxy's additions come to a
    # few KiB); more gets 431. The HTTP parser stops buffering a little above it (app/cli.py).
    max_header_bytes: int = Field(64 << 10, gt=0)
    # Local models and datasets a job may name must lie under one of these folders (an operator's
    # feature). The data dir never counts, even inside one: uploads are reached by their id only.
    local_roots: list[Path] = [Path("examples")]
    # Models that ship their own Python code (config auto_map) run only if the admin allows it.
    trust_remote_code: bool = False
    # Whether worker processes may fetch compiled kernels from the Hugging Face hub through the
    # `kernels` package (transformers' hub layers, bitsandbytes' CPU 4-bit kernel on AVX512-BF16
    # CPUs); off, they run the code their packages ship and never look the hub up for it
    # (worker/offline.py).
    hub_kernels: bool = False
    # A worker renews its job's lease every lease_s / 3; the sweeper re-queues jobs whose lease
    # expired (worker killed, host gone) from their last complete checkpoint, up to max_attempts.
    lease_s: float = 60.0
    # How long a SQLite write waits for another connection's lock; past it the database counts
    # as unreachable and the write is retried (app.db.retry_while_unreachable).
    sqlite_busy_timeout_s: float = Field(30.0, gt=0)
    sweep_interval_s: float = 10.0
    max_attempts: int = 3
    # A queued job's id is sent to the broker again when it has waited this long and the
    # broker holds fewer messages than there are such jobs (a broker restarted without
    # persistence). A duplicate delivery is harmless: only one worker can claim the job.
    # A queued export's id is sent again after it too (while the sampler is idle), up to
    # max_attempts times, then the export fails: no sampler is taking its queue.
    redispatch_after_s: float = 300.0
    # kombu transport options (JSON), over ours: for Redis a visibility_timeout of 7 days (an
    # unacknowledged task is then delivered again; the claim skips a second copy, and dead
    # workers are found by their lease long before).
    broker_transport_options: dict[str, Any] = {}
    # Job-end notifications (`notify_url` in a job spec) are signed with this key the Standard
    # Webhooks way (`whsec_<base64>`, or any text); jobs can ask for notifications only when set.
    notify_secret: str = ""
    # Notifications go to public addresses only; true allows loopback, private and link-local
    # receivers too (on-premises hooks on a network you trust).
    notify_allow_private: bool = False
    # Failed deliveries are retried after notify_retry_s, doubling, up to notify_max_attempts.
    notify_max_attempts: int = 5
    notify_retry_s: float = 10.0
    # GET /metrics shows every key holder totals only; a scrape with this token as its bearer
    # (an operator's: Prometheus' `authorization: {credentials: …}`) also gets per-job series,
    # labelled with job ids and owners.
    metrics_token: str = ""
    # Experiment tracking, a job spec's `integrations` (worker/training/tracking.py): the MLflow
    # tracking server runs go to (`http://host:5000`, or any URI mlflow takes); unset, jobs can't
    # ask for MLflow. W&B runs go where W&B's own variables say (WANDB_BASE_URL; WANDB_MODE=offline
    # keeps them in the job's folder); jobs can ask for W&B when WANDB_API_KEY is set or
    # WANDB_MODE is offline. The API and the workers need the same values.
    mlflow_tracking_uri: str = ""
    wandb_api_key: str = Field("", validation_alias="WANDB_API_KEY", repr=False)
    wandb_mode: str = Field("", validation_alias="WANDB_MODE")
    # Whether the sampler keeps its last model loaded between answers: "auto" keeps it on the CPU
    # and frees it after each answer on a GPU (which a training may need: a 16 GB T4 holds one
    # Phi-2 training, not a second copy of the base beside it); "true" / "false" force either.
    sampler_keep_model: Literal["auto", "true", "false"] = "auto"
    # How many adapters of one base the sampler keeps loaded on it (the least recently used one
    # is dropped beyond that): answering for another job of the same base switches adapters.
    sampler_adapters: int = Field(4, ge=1, le=64)
    # Where the sampler answers: "auto" on the GPU when the model fits beside what runs there
    # (a training on the same card), else on the CPU, slower but never out of memory; "cuda" /
    # "cpu" force either (worker/placement.py).
    sampler_device: Literal["auto", "cuda", "cpu"] = "auto"
    # GPU memory the service's processes on one card may use together, in GiB (default: all of
    # it). The sampler keeps within what the others leave of it.
    gpu_memory_gib: float | None = Field(default=None, gt=0)
    # How long POST /jobs/{id}/generate waits for the sampler before answering 202.
    sample_wait_s: float = 60.0
    # The address clients reach the API at, when a proxy stands in front of it
    # (`https://ft.example.com`, or with a path prefix): links in responses start with it.
    # Unset: the address each request was sent to.
    public_url: str | None = Field(None, pattern=r"^https?://[^\s]+$", max_length=512)
    # How long /v1/chat/completions and /v1/completions wait for the sampler before a 504 (the
    # openai client waits 600 s by default).
    completion_timeout_s: float = Field(300.0, gt=0)
    # How often the worker flushes metric rows and looks for a cancel request.
    flush_interval_s: float = 1.0
    # How often an SSE stream polls the database for new metric rows.
    stream_poll_s: float = 0.5
    # How long an open SSE stream waits for a database that stopped answering before it closes
    # (the client reconnects with Last-Event-ID; a new stream is refused with a 503 meanwhile).
    stream_outage_s: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _fill_derived(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        self.local_roots = [root.expanduser().resolve() for root in self.local_roots]
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'finetune.db'}"
        return self

    @property
    def worker_cwd(self) -> Path:
        """An empty folder workers run in: transformers and datasets try a hub id like
        'org/name' as a local folder first, so from here it can only mean the hub."""
        return self.data_dir / "worker-cwd"

    def dataset_dir(self, dataset_id: str) -> Path:
        return self.data_dir / "datasets" / dataset_id


@lru_cache
def get_settings() -> Settings:
    return Settings()
