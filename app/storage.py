"""Where a job's files live under the data dir. Only names the database knows are served."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from app.settings import get_settings


@dataclass(frozen=True)
class JobFiles:
    root: Path

    @property
    def output_dir(self) -> Path:
        """The trainer's output_dir: unzipped `checkpoint-N` folders, what resume reads."""
        return self.root / "output"

    def checkpoint_dir(self, name: str) -> Path:
        return self.output_dir / name

    def checkpoint_zip(self, name: str) -> Path:
        return self.root / "checkpoints" / f"{name}.zip"

    @property
    def adapter_dir(self) -> Path:
        return self.root / "adapter"

    @property
    def adapter_zip(self) -> Path:
        return self.root / "adapter.zip"

    def remove_checkpoint(self, name: str) -> None:
        shutil.rmtree(self.checkpoint_dir(name), ignore_errors=True)
        self.checkpoint_zip(name).unlink(missing_ok=True)

    def remove_unrecorded(self, recorded: set[str]) -> list[str]:
        """Delete what a kill during a save leaves behind: checkpoint folders and zips the
        database never recorded, and temporary zips. Returns what was removed."""
        removed = []
        for folder in self.output_dir.glob("checkpoint-*"):
            if folder.name not in recorded:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
        for file in (self.root / "checkpoints").glob("*"):
            if file.name.startswith(".") or file.stem not in recorded:
                file.unlink(missing_ok=True)
                removed.append(file.name)
        return removed

    def confine(self, path: str) -> Path | None:
        """`path` resolved, or None unless it is an existing file inside this job's folder."""
        resolved = Path(path).resolve()
        if resolved.is_relative_to(self.root.resolve()) and resolved.is_file():
            return resolved
        return None


def job_files(job_id: str) -> JobFiles:
    return JobFiles(get_settings().job_dir(job_id))
