"""A job's folder: the one place that names its paths. Only names the database knows are served.
With an object store (FINETUNE_STORAGE_URL) the folder is this host's scratch copy and the zips,
exports and uploads are also keys in the store (app/storage/stores.py); the unzipped folders are
the trainer's working copies.

    <data dir>/jobs/<job id>/
        output/checkpoint-N/       the trainer's output_dir: unzipped checkpoints, what resume reads
        checkpoints/checkpoint-N.zip
        adapter/                   the trained adapter (and its README.md, the model card)
        adapter.new/               the adapter while the trainer writes it
        adapter.zip
        exports/exp_….zip|.gguf    merged models made from the adapter or a checkpoint
        run/                       a data-parallel job's exchange with its torchrun ranks

Everything that reads or writes these (the API, the sweeper, the sampler, the training recipe,
its callbacks and the torchrun launcher) asks `job_files(job_id)` instead of joining paths, and
`JobFiles.store` to keep or find them.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import StorageUnavailable
from app.settings import Settings, get_settings
from app.storage.stores import ArtifactStore, artifact_store

log = logging.getLogger(__name__)


def being_written(path: Path) -> Path:
    """Where `path` is written before a rename makes it whole: a hidden `.<name>.tmp` beside it
    (what `JobFiles.remove_unrecorded` deletes when a kill left one behind)."""
    return path.with_name(f".{path.name}.tmp")


@dataclass(frozen=True)
class RunFiles:
    """What a data-parallel job's process and its torchrun ranks exchange (`JobFiles.run`)."""

    root: Path

    @property
    def claim(self) -> Path:
        """The claim the ranks train, as JSON."""
        return self.root / "claim.json"

    @property
    def stop(self) -> Path:
        """Created by the job's process to ask rank 0 for a checkpoint and a stop."""
        return self.root / "stop"

    @property
    def outcome(self) -> Path:
        """Rank 0's Outcome, as JSON."""
        return self.root / "outcome.json"

    @property
    def outcome_partial(self) -> Path:
        """Where rank 0 writes the outcome before renaming it to `outcome`."""
        return self.outcome.with_suffix(".part")

    @property
    def log(self) -> Path:
        """torchrun's and the ranks' output."""
        return self.root / "torchrun.log"


@dataclass(frozen=True)
class JobFiles:
    root: Path
    store: ArtifactStore = field(default_factory=artifact_store)

    @property
    def output_dir(self) -> Path:
        """The trainer's output_dir: unzipped `checkpoint-N` folders, what resume reads."""
        return self.root / "output"

    def checkpoint_dir(self, name: str) -> Path:
        return self.output_dir / name

    @property
    def checkpoint_zips_dir(self) -> Path:
        """The zipped checkpoints users download."""
        return self.root / "checkpoints"

    def checkpoint_zip(self, name: str) -> Path:
        return self.checkpoint_zips_dir / f"{name}.zip"

    @property
    def adapter_dir(self) -> Path:
        return self.root / "adapter"

    @property
    def adapter_staging_dir(self) -> Path:
        """Where the trainer saves the adapter; renamed to `adapter_dir` once complete."""
        return self.root / "adapter.new"

    @property
    def model_card(self) -> Path:
        """The adapter's README.md."""
        return self.adapter_dir / "README.md"

    @property
    def adapter_zip(self) -> Path:
        return self.root / "adapter.zip"

    @property
    def exports_dir(self) -> Path:
        return self.root / "exports"

    def export_file(self, export_id: str, export_format: str) -> Path:
        """An export's one file: a `.gguf` for the gguf format, else a `.zip` of a model folder."""
        return self.exports_dir / f"{export_id}{'.gguf' if export_format == 'gguf' else '.zip'}"

    @property
    def run(self) -> RunFiles:
        """A data-parallel job's files for its torchrun ranks."""
        return RunFiles(self.root / "run")

    def remove_checkpoint(self, name: str) -> None:
        """Called once the database dropped the checkpoint, so it can't fail the caller: a zip the
        store would not delete now is an unrecorded one, which the job's next run removes."""
        shutil.rmtree(self.checkpoint_dir(name), ignore_errors=True)
        try:
            self.store.delete(self.checkpoint_zip(name))
        except StorageUnavailable as exc:
            log.warning("%s: %s.zip stays in the store for now: %s", self.root.name, name, exc)

    def remove_unrecorded(self, recorded: set[str] | dict[str, str]) -> list[str]:
        """Delete what a kill during a save leaves behind: checkpoint folders and zips (here and
        in the store) the database never recorded, and temporary zips (`being_written`). Returns
        what was removed."""
        removed = []
        for folder in self.output_dir.glob("checkpoint-*"):
            if folder.name not in recorded:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
        here = {file.name for file in self.checkpoint_zips_dir.glob("*")}
        for name in sorted(here | self.store.names(self.checkpoint_zips_dir)):
            if name.startswith(".") or name.removesuffix(".zip") not in recorded:
                self.store.delete(self.checkpoint_zips_dir / name)
                removed.append(name)
        return removed

    def unzipped_checkpoint(self, name: str, sha256: str | None) -> Path:
        """The unzipped checkpoint `name` (its zip's recorded `sha256`), to resume or sample from: the
        trainer's own folder, or unpacked from the store on a host that didn't write it."""
        return self.store.unpacked(self.checkpoint_dir(name), self.checkpoint_zip(name), sha256)

    def unzipped_adapter(self, sha256: str | None) -> Path:
        """The unzipped final adapter (its zip's recorded `sha256`), as `unzipped_checkpoint`."""
        return self.store.unpacked(self.adapter_dir, self.adapter_zip, sha256)

    def clear_scratch(self) -> None:
        """Drop this host's working copies once a run ends, where the store keeps the artifacts
        (the folder may hold more: an offline W&B run stays, and `exports/`, where a sampler on
        this host may be making one, which drops its own file once stored)."""
        for path in (
            self.output_dir,
            self.checkpoint_zips_dir,
            self.adapter_dir,
            self.adapter_staging_dir,
            self.adapter_zip,
            self.run.root,
        ):
            self.store.evict(path)


def job_files(job_id: str, settings: Settings | None = None) -> JobFiles:
    """Job `job_id`'s folder under the data dir of `settings` (default: the service's)."""
    settings = settings if settings is not None else get_settings()
    return JobFiles(settings.data_dir / "jobs" / job_id, artifact_store(settings))
