"""`finetune submit | jobs | status | logs | cancel | pause | resume | download | upload | generate`:
the service from a terminal. Each command is a thin layer over `ServiceClient`; the server URL
and key come from `--url` / `--api-key` or FINETUNE_URL / FINETUNE_API_KEY."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Column, Table

from app.client.http import DEFAULT_URL, RequestFailed, ServiceClient
from app.models import STOPPED_STATUSES, ExportFormat

console = Console()
errors = Console(stderr=True)

Url = Annotated[str, typer.Option("--url", envvar="FINETUNE_URL", help="The service's address.")]
ApiKey = Annotated[
    str | None, typer.Option("--api-key", envvar="FINETUNE_API_KEY", help="`finetune keys create` made it.")
]
JobId = Annotated[str, typer.Argument(help="A job id (job_…).")]
Wait = Annotated[bool, typer.Option("--wait", help="Return once the job has stopped.")]
Timeout = Annotated[float, typer.Option("--timeout", min=1, help="Seconds to wait at most.")]


def _fail(message: str, code: int = 1) -> typer.Exit:
    errors.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


@contextmanager
def service(url: str, api_key: str | None) -> Iterator[ServiceClient]:
    """The client; a failed request ends the command with the service's message, exit code 1."""
    try:
        with ServiceClient(url, api_key) as client:
            yield client
    except RequestFailed as exc:
        raise _fail(str(exc)) from exc


def apply_override(spec: dict[str, Any], assignment: str) -> None:
    """`training.max_steps=100` sets spec["training"]["max_steps"] = 100 (the value is read as
    YAML: numbers, booleans, null, lists)."""
    path, sep, raw = assignment.partition("=")
    if not sep or not path.strip():
        raise typer.BadParameter(f"{assignment!r} is not KEY=VALUE", param_hint="--set")
    *parents, leaf = path.strip().split(".")
    node = spec
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise typer.BadParameter(f"{part!r} in {path!r} is not a section", param_hint="--set")
        node = child
    node[leaf] = yaml.safe_load(raw) if raw.strip() else ""


def load_spec(path: Path | None, overrides: list[str]) -> dict[str, Any]:
    spec: Any = {}
    if path is not None:
        try:
            spec = yaml.safe_load(path.read_text()) or {}  # YAML is a superset of JSON
        except (OSError, yaml.YAMLError) as exc:
            raise typer.BadParameter(f"cannot read {path}: {exc}", param_hint="SPEC") from exc
        if not isinstance(spec, dict):
            raise typer.BadParameter(f"{path} must hold a mapping (a job spec)", param_hint="SPEC")
    for assignment in overrides:
        apply_override(spec, assignment)
    return spec


def submit(
    spec_file: Annotated[
        Path | None, typer.Argument(help="Job spec, YAML or JSON; none = the default recipe.")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override one field, e.g. training.max_steps=100.")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Then show live progress (like `logs -f`).")
    ] = False,
    wait: Wait = False,
    timeout: Timeout = 24 * 3600,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Submit a fine-tune job and print its id. With --wait (or --follow), return when it has
    stopped; the exit code is 0 only if it succeeded."""
    spec = load_spec(spec_file, set_ or [])
    with service(url, api_key) as client:
        job = client.submit(spec)
        console.print(job["id"], highlight=False)
        if follow:
            _follow(client, job["id"])
        elif wait:
            _report_end(client.wait_for_job(job["id"], STOPPED_STATUSES, timeout))


def preflight_report(spec_file: Path | None, overrides: list[str], url: str, api_key: str | None) -> bool:
    """`finetune doctor SPEC`: the service's memory estimate for a spec against its registered
    GPUs, as POST /jobs would judge it; False when it would be refused."""
    spec = load_spec(spec_file, overrides)
    with service(url, api_key) as client:
        result = client.preflight(spec)
    if result["needs_gib"] is not None:
        console.print(
            f"[bold]needs ~{result['needs_gib']} GiB[/bold] of GPU memory at its largest micro-batch "
            f"({result['micro_batch']}); PyTorch's peak allocation ~{result['peak_allocated_gib']} GiB:"
        )
        table = Table("holds", Column("GiB", justify="right"), box=None)
        for part, size in result["parts_gib"].items():
            table.add_row(part, f"{size:.2f}")
        console.print(table)
    gpus = Table("worker", "GPU", Column("GiB", justify="right"), "bf16", "holds it", box=None)
    for gpu in result["gpus"]:
        holds = {True: "yes", False: "[red]no[/red]", None: "?"}[gpu["holds_job"]]
        bf16 = "yes" if gpu["bf16"] else "no"
        gpus.add_row(str(gpu["worker"]), gpu["name"], f"{gpu['memory_gib']:.1f}", bf16, holds)
    console.print(f"{result['workers']} worker(s) registered", highlight=False)
    if result["gpus"]:
        console.print(gpus)
    for note in result["notes"]:
        console.print(note, highlight=False)
    for problem in result["problems"]:
        errors.print(f"[red]{problem['field']}:[/red] {problem['message']}", highlight=False)
    return not result["problems"]


def jobs(
    status: Annotated[str | None, typer.Option(help="Only jobs in this status.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """The newest jobs: id, status, progress, base model."""
    with service(url, api_key) as client:
        rows = client.jobs(status, limit)
    id_column = Column("id", no_wrap=True, min_width=28)
    table = Table(id_column, "status", "step", "created", "base model", box=None)
    for job in rows:
        fields = (
            job["id"],
            job["status"],
            f"{job['current_step']}/{job['total_steps'] or '?'}",
            job["created_at"][:19],
            job["spec"]["base_model"],
        )
        if console.is_terminal:
            table.add_row(*fields)
        else:  # a pipe or a file: one tab-separated line a job, whatever the width
            typer.echo("\t".join(fields))  # (rich would expand the tabs)
    if console.is_terminal:
        console.print(table)


def status(
    job_id: JobId,
    as_json: Annotated[bool, typer.Option("--json", help="Print the job object as JSON.")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """One job: status, progress, latest loss, checkpoints, error."""
    with service(url, api_key) as client:
        job = client.job(job_id)
        checkpoints = client.checkpoints(job_id)
        last = client.get(f"/jobs/{job_id}/logs", after_step=max(job["current_step"] - 1, 0))["items"]
    if as_json:
        console.print_json(json.dumps(job))
        return
    console.print(
        f"[bold]{job['id']}[/bold]  {job['status']}  step {job['current_step']}/{job['total_steps'] or '?'}"
    )
    console.print(f"  base model   {job['spec']['base_model']}", highlight=False)
    console.print(f"  dataset      {job['spec']['dataset']['source']}", highlight=False)
    if job.get("waiting_for"):  # queued: its place in line and what it waits for (the dispatcher's)
        place = f"place {job['queue_position']}" if job["queue_position"] else "on its way to a worker"
        console.print(f"  in line      {place}, {job['spec']['priority']} priority", highlight=False)
        console.print(f"  waiting for  {job['waiting_for']}", highlight=False)
    if last and last[-1].get("loss") is not None:
        console.print(f"  loss         {last[-1]['loss']:.4f} at step {last[-1]['step']}")
    for checkpoint in checkpoints:
        console.print(f"  checkpoint   {checkpoint['name']}  {checkpoint['size_bytes']:,} bytes")
    if job["adapter_sha256"]:
        console.print(f"  adapter      {job['adapter_size_bytes']:,} bytes, sha256 {job['adapter_sha256']}")
    if job["error"]:
        console.print(f"  [red]error[/red]        {job['error']}", highlight=False)
    # what the server allows now (app/lifecycle.py), as `finetune ACTION JOB` commands
    if job["actions"]:
        actions = ", ".join(job["actions"])
        console.print(f"  you can      {actions}  (finetune ACTION {job['id']})", highlight=False)


def logs(
    job_id: JobId,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Live progress until the job ends.")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Metric rows (step, loss, learning rate, tokens/s). With --follow: a live progress bar,
    then the final status; the exit code is 0 only if the job succeeded."""
    with service(url, api_key) as client:
        if follow:
            _follow(client, job_id)
            return
        text = client.request("GET", f"/jobs/{job_id}/logs", params={"format": "text", "limit": 10000}).text
        console.out(text, end="", highlight=False)


def _metric_text(row: dict[str, Any]) -> str:
    parts = []
    if row.get("loss") is not None:
        parts.append(f"loss {row['loss']:.4f}")
    if row.get("eval_loss") is not None:
        parts.append(f"eval {row['eval_loss']:.4f}")
    if row.get("learning_rate") is not None:
        parts.append(f"lr {row['learning_rate']:.2e}")
    if row.get("tokens_per_second"):
        parts.append(f"{row['tokens_per_second']:,.0f} tok/s")
    # DPO's: how often the chosen reply wins and by how much; the eval set's once evaluated
    figures = row.get("figures") or {}
    for label, prefix in (("", ""), ("eval ", "eval_")):
        accuracy, margin = figures.get(f"{prefix}rewards/accuracies"), figures.get(f"{prefix}rewards/margins")
        if accuracy is not None and margin is not None:
            parts.append(f"{label}acc {accuracy:.2f} margin {margin:.3g}")
    return "  ".join(parts)


def _follow(client: ServiceClient, job_id: str) -> None:
    """A live progress bar on a terminal; elsewhere (a pipe, a log file) a line per row as it
    arrives. Then the final status; exit code 0 only if the job succeeded."""
    if not console.is_terminal:
        end: dict[str, Any] = {}
        for event in client.follow(job_id):
            if event.event == "end":
                end = event.data
                break
            row = event.data
            label = "eval" if event.event == "eval" else "step"
            console.out(f"{label} {row['step']}  {_metric_text(row)}", highlight=False)
        _report_end(end, job_id)
        return
    job = client.job(job_id)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[metrics]}"),
        TimeRemainingColumn(),
        console=console,
    )
    end = {}
    with progress:
        task = progress.add_task(job_id, total=job["total_steps"], metrics=job["status"])
        for event in client.follow(job_id):
            if event.event == "end":
                end = event.data
                break
            row = event.data
            if progress.tasks[0].total is None:  # known once the worker has built the dataset
                progress.update(task, total=client.job(job_id)["total_steps"])
            progress.update(task, completed=row["step"], metrics=_metric_text(row))
    _report_end(end, job_id)


def _report_end(job: dict[str, Any], job_id: str | None = None) -> None:
    """Print how a job ended (a job object or the stream's end event); exit 1 unless it
    succeeded."""
    final = job.get("status", "unknown")
    colour = "green" if final == "succeeded" else "red"
    console.print(f"[{colour}]{job_id or job['id']} {final}[/{colour}]", highlight=False)
    if job.get("error"):
        console.print(f"error: {job['error']}", highlight=False)
    if final != "succeeded":
        raise typer.Exit(1)


def cancel(
    job_id: JobId, wait: Wait = False, timeout: Timeout = 600, url: Url = DEFAULT_URL, api_key: ApiKey = None
) -> None:
    """Cancel a queued job at once, a running one at its next step (--wait: return once it has)."""
    with service(url, api_key) as client:
        job = client.cancel(job_id)
        if wait:
            job = client.wait_for_job(job_id, STOPPED_STATUSES, timeout)
    state = "cancel requested" if job["status"] == "running" else job["status"]
    console.print(f"{job_id}: {state}", highlight=False)


def pause(
    job_id: JobId, wait: Wait = False, timeout: Timeout = 600, url: Url = DEFAULT_URL, api_key: ApiKey = None
) -> None:
    """Pause a queued job at once; a running one saves a checkpoint at its next step and stops
    (--wait: return once it has)."""
    with service(url, api_key) as client:
        job = client.pause(job_id)
        if wait:
            job = client.wait_for_job(job_id, STOPPED_STATUSES, timeout)
    state = "pause requested" if job["status"] == "running" else job["status"]
    console.print(f"{job_id}: {state}", highlight=False)


def resume(
    job_id: JobId,
    checkpoint: Annotated[str | None, typer.Option(help="e.g. checkpoint-200; default the latest.")] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Queue a paused, failed or cancelled job again from a checkpoint."""
    with service(url, api_key) as client:
        job = client.resume(job_id, checkpoint)
    console.print(f"{job_id}: {job['status']}, from {job['resume_from'] or 'the start'}", highlight=False)


def download(
    job_id: JobId,
    what: Annotated[
        str,
        typer.Argument(help="`adapter`, `checkpoint` (the latest) or a checkpoint name like checkpoint-200."),
    ] = "adapter",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Default: JOB-WHAT.zip here.")] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Download the adapter or a checkpoint (zip), checking its SHA-256 against the service's."""
    with service(url, api_key) as client:
        if what == "adapter":
            job = client.job(job_id)
            path, name, expected = f"/jobs/{job_id}/adapter", "adapter", job["adapter_sha256"]
        else:
            checkpoints = client.checkpoints(job_id)
            wanted = [c for c in checkpoints if what in ("checkpoint", c["name"])]
            if not wanted:
                have = ", ".join(c["name"] for c in checkpoints) or "none yet"
                raise _fail(f"job {job_id} has no {what!r} (checkpoints: {have})")
            checkpoint = wanted[-1]
            name = checkpoint["name"]
            path, expected = f"/jobs/{job_id}/checkpoints/{name}/download", checkpoint["sha256"]
        _download(client, path, output or Path(f"{job_id}-{name}.zip"), expected)


def _download(client: ServiceClient, path: str, destination: Path, expected_sha256: str | None) -> None:
    """Download with a progress bar; the file is kept only if its SHA-256 is the service's."""
    with Progress(
        TextColumn(f"[bold]{destination.name}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=errors,
    ) as progress:
        task = progress.add_task("download", total=None)
        sha256 = client.download(
            path,
            destination,
            expected_sha256,
            lambda done, total: progress.update(task, completed=done, total=total),
        )
    console.print(f"{destination}  sha256 {sha256} (verified)", highlight=False)


def export(
    job_id: JobId,
    format: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            help="merged: a model folder (zip) transformers loads without peft; gguf: one GGUF file.",
        ),
    ] = ExportFormat.MERGED,
    checkpoint: Annotated[str | None, typer.Option(help="Default: the final adapter.")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Default: the export's name, here.")
    ] = None,
    timeout: Timeout = 3600,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Merge the job's adapter (or a checkpoint's) into its base and download the result,
    checking its SHA-256. A worker makes it; this waits up to --timeout."""
    with service(url, api_key) as client:
        errors.print(f"exporting {job_id} ({format.value}); a worker merges it …", highlight=False)
        made = client.export(job_id, format.value, checkpoint, timeout_s=timeout)
        if made["status"] != "succeeded":
            raise _fail(f"export {made['id']} is {made['status']}: {made.get('error') or 'not done yet'}")
        download_path = f"/jobs/{job_id}/exports/{made['id']}/download"
        _download(client, download_path, output or Path(made["filename"]), made["sha256"])


def upload(
    dataset_file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="oasst rows, trees or chat JSONL.")
    ],
    max_seq_length: Annotated[int | None, typer.Option(help="For the length statistics.")] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Upload a training file and print its validation report. Exit code 1 if it is invalid."""
    with service(url, api_key) as client:
        dataset = client.upload(dataset_file, max_seq_length)
    report = dataset["report"]
    console.print(
        f"[bold]{dataset['id']}[/bold]  {dataset['status']}  "
        f"({dataset['filename']}, {dataset['size_bytes']:,} bytes)"
    )
    for key in ("format", "records", "messages", "trees", "samples", "dropped", "languages", "tokens"):
        if key in report:
            console.print(f"  {key:<10} {report[key]}", highlight=False)
    for problem in report.get("problems", []):
        where = f"line {problem['line']}" if problem.get("line") else "file"
        console.print(f"  [red]{where}[/red]: {problem['error']}", highlight=False)
    if dataset["status"] != "ready":
        raise typer.Exit(1)
    console.print(f'use it with: {{"dataset": {{"source": "{dataset["id"]}"}}}}', highlight=False)


def generate(
    job_id: JobId,
    prompt: Annotated[str, typer.Argument(help="What the Human says.")],
    checkpoint: Annotated[
        str | None, typer.Option(help="Default: the final adapter, else the latest checkpoint.")
    ] = None,
    max_new_tokens: Annotated[int | None, typer.Option(min=1, max=2048)] = None,
    timeout: Timeout = 600,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Ask the base model plus this job's adapter; prints what the Assistant answers. Waits
    for a slow answer (the model may first have to load) up to --timeout, asking once."""
    with service(url, api_key) as client:
        sample = client.generate(
            job_id, prompt, timeout_s=timeout, checkpoint=checkpoint, max_new_tokens=max_new_tokens
        )
    if sample["status"] != "succeeded":
        raise _fail(f"sample {sample['id']} is {sample['status']}: {sample.get('error') or 'not done yet'}")
    console.out(sample["completion"], highlight=False)


COMMANDS = (submit, jobs, status, logs, cancel, pause, resume, download, export, upload, generate)


def register(cli: typer.Typer) -> None:
    for command in COMMANDS:
        cli.command(rich_help_panel="Client (talks to a running service)")(command)
