"""One 16 GB T4 shared by the worker and the sampler (compose's FINETUNE_GPU), measured on a
bigger GPU with each process capped at 15 GiB (`torch.cuda.set_per_process_memory_fraction`).

Process A trains the default recipe on Phi-2's shapes (random weights, real tokenizer) through
the worker's own `execute_job`, in float16 (a T4 has no bf16), on real oasst1 rows mixed with
chats longer than 2048 tokens (so many steps are the recipe's largest micro-batch, 4 × 2048).
Process B is the sampler: from the first checkpoint on it answers ~2,000-token prompts through
`worker.sampling.answer` (which on a GPU loads the 4-bit base + adapter for one answer and
frees it afterwards, and answers on the CPU when the card, capped at 15 GiB for both processes
by FINETUNE_GPU_MEMORY_GIB, has no room beside the training), one after another, until the
training stops. The parent never touches
CUDA; it polls nvidia-smi every 0.2 s (per process, and the whole card) and writes a JSON
report: each process's peak, the peak of their sum at one instant, answers, OOMs, s/step.

On a card newer than a T4 the training is made to take the T4's path (`--as-t4`, the default):
the plan `worker.training.speed.plan_speed` makes for compute capability 7.5 with 15 GiB free
(eager layers, the memory-efficient sdpa kernel with the dense packed mask, whole layers
recomputed; with FINETUNE_COMPILE_PRE_AMPERE=1 in the environment, compiled layers in rows
without CUDA graphs, a tenth of their activations kept); flash and cuDNN attention are switched
off in both processes (a T4 has neither).

    python bench/t4_budget.py --out t4-budget.json                  # a GPU: ~5 min
    python bench/t4_budget.py --tiny --train-seconds 30 --out x.json  # CPU: the plumbing only
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from gpu_recipe import DATA, build_phi2, long_chats  # noqa: E402

GIB = 2**30
PROMPT_LIMIT = 8000  # app.schemas.SampleRequest.prompt's max_length
OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory", "out of memory")


# ---------------------------------------------------------------- children (CUDA lives here)


def cap_memory(cap_gib: float) -> dict:
    """This process's allocator may reserve at most `cap_gib` (before any allocation)."""
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False}
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = min(1.0, cap_gib * GIB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    return {"cuda": True, "total_gib": round(total / GIB, 2), "fraction": round(fraction, 4)}


def like_a_t4(training: bool) -> list[str]:
    """Kernels and plan a T4 (compute capability 7.5) would get; nothing changes on a T4."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        return []
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
    notes = ["flash and cuDNN sdpa off (a T4 runs the memory-efficient kernel)"]
    if training:
        from functools import partial

        import worker.training.recipe as recipe
        from worker.training import speed

        # the plan for a 7.5 card with the 15 GiB cap free (worker.training.speed.plan_speed)
        recipe.plan_speed = partial(speed.plan_speed, gpu=((7, 5), 15 * GIB))
        notes.append("plan_speed asked for a T4's plan: compute capability 7.5, 15 GiB free")
    return notes


def torch_peaks() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {
        "max_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
        "max_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3),
    }


def child_train(args) -> dict:
    setup = cap_memory(args.cap_gib)
    notes = like_a_t4(training=True) if args.as_t4 else []
    import torch

    from app.models import LOCAL_OWNER
    from app.services import jobs
    from worker.tasks import execute_job

    started = time.time()
    oom = None
    try:
        execute_job(args.job)
    except Exception as exc:  # execute_job records failures itself; this is anything else
        oom = f"{type(exc).__name__}: {exc}"
    done = jobs.get_job(args.job, LOCAL_OWNER)
    rows = jobs.list_metrics(args.job, LOCAL_OWNER, None, 100_000).items
    events = jobs.list_events(args.job, LOCAL_OWNER, None, 1000).items
    steps = [r.step for r in rows if r.loss is not None]
    times = [r.time.timestamp() for r in rows if r.loss is not None]
    # s/step over the logged steps after the first (the first includes warm-up)
    s_per_step = (times[-1] - times[0]) / (steps[-1] - steps[0]) if len(steps) > 2 else None
    info = {
        "pid": os.getpid(),
        "setup": setup,
        "as_t4": notes,
        "status": done.status,
        "error": done.error or oom,
        "steps": done.current_step,
        "wall_seconds": round(time.time() - started, 1),
        "first_logged_step_at": times[0] if times else None,
        "last_logged_step_at": times[-1] if times else None,
        "seconds_per_step": round(s_per_step, 3) if s_per_step else None,
        "tokens_per_second_median": _median([r.tokens_per_second for r in rows if r.tokens_per_second]),
        "events": [e.message for e in events],
        **torch_peaks(),
        "versions": versions(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return info


def long_prompt(tokenizer, target_tokens: int) -> tuple[str, int]:
    """oasst1 text, as much as the API takes (8,000 characters), topped up with numbers (two
    characters a token) until the formatted prompt is ~target_tokens long."""
    from app.conversations import HUMAN, Turn
    from worker.training.data import prompt_ids

    limit = PROMPT_LIMIT
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:400]]
    words = " ".join(r.get("text", "") for r in rows).split()

    def count(text: str) -> int:
        return len(prompt_ids([Turn(HUMAN, text)], tokenizer))

    prompt = ""
    for word in words:
        if len(prompt) + len(word) + 1 > limit * 3 // 4 or count(prompt) >= target_tokens:
            break
        prompt = f"{prompt} {word}".strip()
    number = 0
    while count(prompt) < target_tokens and len(prompt) + 3 <= limit:
        prompt += f" {number % 10}"
        number += 1
    return prompt, count(prompt)


def child_sample(args) -> dict:
    setup = cap_memory(args.cap_gib)
    notes = like_a_t4(training=False) if args.as_t4 else []
    import torch

    from app.models import LOCAL_OWNER
    from app.schemas import SampleRequest
    from app.services import jobs
    from app.services.samples import create_sample, get_sample
    from worker import sampling
    from worker.sampling import answer, keep_model

    devices: list[str] = []  # where each answer ran (worker.placement's choice)
    choose = sampling._device_for
    sampling._device_for = lambda spec, sample: devices.append(choose(spec, sample)) or devices[-1]
    from worker.training.model import load_tokenizer

    spec = jobs.get_job(args.job, LOCAL_OWNER).spec
    tokenizer = load_tokenizer(spec["base_model"])
    prompt, prompt_tokens = long_prompt(tokenizer, args.prompt_tokens)
    stop = Path(args.stop_file)

    def training_over() -> bool:
        return stop.exists() or jobs.get_job(args.job, LOCAL_OWNER).status.stopped

    waited = time.time()
    while not jobs.list_checkpoints(args.job, LOCAL_OWNER) and not training_over():
        time.sleep(0.2)
    answers = []
    while not training_over():
        request = SampleRequest(prompt=prompt, max_new_tokens=args.max_new_tokens, temperature=0.0)
        sample = create_sample(args.job, LOCAL_OWNER, request)
        started = time.time()
        answer(sample.id)
        ended = time.time()
        read = get_sample(args.job, sample.id, LOCAL_OWNER)
        answers.append(
            {
                "checkpoint": read.checkpoint,
                "device": devices[-1] if devices else None,
                "status": read.status,
                "error": read.error,
                "started": started,
                "ended": ended,
                "seconds": round(ended - started, 2),
                "completion_tokens": len(tokenizer(read.completion or "")["input_ids"]),
                # what the process keeps between answers (0 when the model was freed)
                "reserved_after_gib": round(torch.cuda.memory_reserved() / GIB, 3)
                if torch.cuda.is_available()
                else None,
            }
        )
        print(json.dumps({"answer": answers[-1]}), flush=True)
    return {
        "pid": os.getpid(),
        "setup": setup,
        "as_t4": notes,
        "keep_model": keep_model(),
        "prompt_tokens": prompt_tokens,
        "prompt_chars": len(prompt),
        "max_new_tokens": args.max_new_tokens,
        "waited_for_first_checkpoint_s": round(time.time() - waited, 1) if not answers else None,
        "answers": answers,
        **torch_peaks(),
    }


def child_build(args) -> dict:
    model_dir = Path(args.model_dir)
    build_phi2(model_dir)  # its config keeps Phi-2's auto_map: transformers' own class loads it
    return {"model_dir": str(model_dir)}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _median(values: list) -> float | None:
    values = sorted(v for v in values if v is not None)
    return round(values[len(values) // 2], 1) if values else None


# ---------------------------------------------------------------- parent (no CUDA here)


class Monitor(threading.Thread):
    """nvidia-smi every `interval` s: each compute process's MiB and the card's used MiB."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, dict[int, int], int | None]] = []
        self.errors: list[str] = []
        self.available = shutil.which("nvidia-smi") is not None
        self.halt = threading.Event()

    @staticmethod
    def _query(*args: str) -> list[list[str]]:
        out = subprocess.run(
            ["nvidia-smi", *args, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]

    def poll(self) -> tuple[float, dict[int, int], int | None]:
        now = time.time()
        apps = {}
        for row in self._query("--query-compute-apps=pid,used_memory"):
            if len(row) == 2 and row[0].isdigit() and row[1].isdigit():
                apps[int(row[0])] = int(row[1])
        used = self._query("--query-gpu=memory.used")
        total = int(used[0][0]) if used and used[0][0].isdigit() else None
        return now, apps, total

    def run(self) -> None:
        while self.available and not self.halt.is_set():
            started = time.time()
            try:
                self.samples.append(self.poll())
            except Exception as exc:  # keep polling; report what failed
                if len(self.errors) < 20:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
            self.halt.wait(max(0.0, self.interval - (time.time() - started)))


def chat_dataset(path: Path, long_every: int) -> dict:
    """The oasst1 validation rows' conversations as chat records, with one chat longer than
    2048 tokens after every `long_every` of them."""
    from app.conversations import conversations_from_rows

    roles = {"Human": "user", "Assistant": "assistant", "System": "system"}
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    conversations = conversations_from_rows(rows, ["en"]).samples
    long_file = path.with_suffix(".long.jsonl")
    long_chats(long_file, max(1, len(conversations) // long_every))
    longs = long_file.read_text().splitlines()
    written = 0
    with path.open("w") as f:
        for index, turns in enumerate(conversations):
            messages = [{"role": roles[t.speaker], "content": t.text} for t in turns]
            f.write(json.dumps({"messages": messages}) + "\n")
            written += 1
            if (index + 1) % long_every == 0 and longs:
                f.write(longs.pop() + "\n")
                written += 1
    long_file.unlink()
    return {
        "records": written,
        "oasst_conversations": len(conversations),
        "long_chats": written - len(conversations),
    }


def spawn(role: str, args, work: Path, extra: list[str]) -> tuple[subprocess.Popen, Path]:
    log = work / f"{role}.log"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--role",
        role,
        "--cap-gib",
        str(args.cap_gib),
        "--result",
        str(work / f"{role}.json"),
        *([] if args.as_t4 else ["--not-as-t4"]),
        *extra,
    ]
    with log.open("w") as f:
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    return process, log


def read_result(work: Path, role: str) -> dict:
    path = work / f"{role}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def log_tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


def stop_process(process: subprocess.Popen, grace: float = 20.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def summarize(monitor: Monitor, baseline: int | None, pids: dict[str, int], windows: dict) -> dict:
    if not monitor.samples:
        return {
            "nvidia_smi": "not available" if not monitor.available else "no samples",
            "errors": monitor.errors,
        }
    out: dict = {"polls": len(monitor.samples), "interval_s": monitor.interval, "errors": monitor.errors}
    seen_pids = sorted({pid for _, apps, _ in monitor.samples for pid in apps})
    out["pids_seen"] = seen_pids
    out["pids_of_children"] = pids
    for role, pid in pids.items():
        values = [apps.get(pid, 0) for _, apps, _ in monitor.samples]
        out[f"{role}_peak_mib"] = max(values)
    sums = [(sum(apps.get(pid, 0) for pid in pids.values()), t) for t, apps, _ in monitor.samples]
    peak_sum, at = max(sums)
    out["sum_of_both_peak_mib"] = peak_sum
    out["sum_of_both_peak_at"] = at
    out["polls_with_both_on_gpu"] = sum(
        all(pid in apps for pid in pids.values()) for _, apps, _ in monitor.samples
    )
    totals = [total for _, _, total in monitor.samples if total is not None]
    if totals:
        out["card_used_peak_mib"] = max(totals)
        out["card_used_baseline_mib"] = baseline
        if baseline is not None:
            out["card_used_peak_minus_baseline_mib"] = max(totals) - baseline
    # the sampler between answers: what it holds while the training runs and no answer is due
    sampler = pids.get("sampler")
    answering = windows.get("answering", [])
    if sampler is not None:
        idle = [
            apps.get(sampler, 0)
            for t, apps, _ in monitor.samples
            if apps.get(sampler) and not any(a <= t <= b for a, b in answering)
        ]
        busy = [
            apps.get(sampler, 0) for t, apps, _ in monitor.samples if any(a <= t <= b for a, b in answering)
        ]
        out["sampler_between_answers_max_mib"] = max(idle) if idle else None
        out["sampler_during_answers_max_mib"] = max(busy) if busy else None
    return out


def write_timeline(monitor: Monitor, pids: dict[str, int], path: Path) -> None:
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["time", *[f"{role}_mib" for role in pids], "sum_mib", "card_used_mib", "other_pids"])
        for t, apps, total in monitor.samples:
            ours = [apps.get(pid, 0) for pid in pids.values()]
            others = {p: m for p, m in apps.items() if p not in pids.values()}
            out.writerow([f"{t:.2f}", *ours, sum(ours), total, json.dumps(others) if others else ""])


def parent(args) -> None:
    begun = time.time()
    work = Path(args.work or tempfile.mkdtemp(prefix="t4-budget-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update(
        FINETUNE_DATA_DIR=str(work / "data"),
        FINETUNE_BROKER_URL="memory://",
        FINETUNE_LOCAL_ROOTS=json.dumps([str(work / "inputs"), str(REPO / "examples")]),
        FINETUNE_SAMPLER_KEEP_MODEL="auto",
        FINETUNE_SAMPLER_DEVICE="auto",
        # the card as the sampler's placement sees it: what both processes may use together
        FINETUNE_GPU_MEMORY_GIB=str(args.cap_gib),
        PYTHONUNBUFFERED="1",
    )
    os.environ.pop("FINETUNE_DATABASE_URL", None)
    (work / "inputs").mkdir(exist_ok=True)
    from app import migrate
    from app.models import LOCAL_OWNER, JobStatus
    from app.services import jobs
    from app.spec import JobSpec

    migrate.upgrade()
    report: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/t4_budget.py", *sys.argv[1:]]),
        "cap_gib_per_process": args.cap_gib,
    }
    monitor = Monitor(args.poll_s)
    processes: dict[str, subprocess.Popen] = {}
    try:
        if args.tiny:
            model_dir = REPO / "examples" / "tiny-phi2"
        else:
            model_dir = work / "inputs" / "phi-2-random"
            t0 = time.time()
            build, build_log = spawn("build", args, work, ["--model-dir", str(model_dir)])
            if build.wait() != 0:
                raise RuntimeError("building the model failed:\n" + log_tail(build_log))
            report["build_model_seconds"] = round(time.time() - t0, 1)
        data_file = work / "inputs" / "train.jsonl"
        report["dataset"] = chat_dataset(data_file, args.long_every)
        dtype = args.dtype or ("float16" if shutil.which("nvidia-smi") else "float32")
        spec = JobSpec.model_validate(
            {
                "base_model": str(model_dir),
                "dataset": {"source": str(data_file)},
                "quantization": {"compute_dtype": dtype},
                "training": {
                    "max_steps": args.max_steps,
                    "save_steps": args.save_steps,
                    "save_total_limit": 1000,  # the sampler's checkpoint is never rotated away under it
                    "logging_steps": 1,
                },
            }
        )
        report["spec"] = {
            k: v for k, v in spec.model_dump(mode="json").items() if k in ("quantization", "training")
        }
        job = jobs.create_job(spec, LOCAL_OWNER)
        report["job"] = job.id

        baseline = None
        if monitor.available:
            baseline = monitor.poll()[2]
            monitor.start()
        stop_file = work / "training-over"
        processes["training"], train_log = spawn("train", args, work, ["--job", job.id])
        processes["sampler"], sample_log = spawn(
            "sample",
            args,
            work,
            [
                "--job",
                job.id,
                "--stop-file",
                str(stop_file),
                "--prompt-tokens",
                str(args.prompt_tokens),
                "--max-new-tokens",
                str(args.max_new_tokens),
            ],
        )
        first_step_at = None
        cancelled_at = None
        while processes["training"].poll() is None:
            time.sleep(0.5)
            if time.time() - begun > args.deadline_s:
                report["deadline_hit"] = True
                break
            if first_step_at is None and jobs.list_metrics(job.id, LOCAL_OWNER, None, 1).items:
                first_step_at = time.time()
            if (
                first_step_at is not None
                and cancelled_at is None
                and time.time() - first_step_at > args.train_seconds
            ):
                jobs.cancel_job(job.id, LOCAL_OWNER)
                cancelled_at = time.time()
        stop_file.touch()
        stop_process(processes["training"], grace=60)
        training_ended = time.time()
        # the sampler finishes the answer in flight, then sees the stop file
        try:
            processes["sampler"].wait(max(10.0, min(180.0, args.deadline_s + 60 - (time.time() - begun))))
        except subprocess.TimeoutExpired:
            report["sampler_killed"] = True
        stop_process(processes["sampler"])
        monitor.halt.set()
        if monitor.is_alive():
            monitor.join(5)

        training, sampler = read_result(work, "train"), read_result(work, "sample")
        answers = sampler.get("answers", [])
        during = [a for a in answers if a["ended"] <= training_ended]
        pids = {"training": processes["training"].pid, "sampler": processes["sampler"].pid}
        windows = {"answering": [(a["started"], a["ended"]) for a in answers]}
        memory = summarize(monitor, baseline, pids, windows)

        def oom_in(*texts: str) -> bool:
            return any(m in (text or "") for text in texts for m in OOM_MARKERS)

        report.update(
            {
                "gpu": training.get("gpu"),
                "capability": training.get("capability"),
                "versions": training.get("versions"),
                "training": {k: v for k, v in training.items() if k not in ("versions", "gpu", "capability")},
                "training_cancelled_after_s": round(cancelled_at - first_step_at, 1)
                if cancelled_at
                else None,
                "sampler": {k: v for k, v in sampler.items() if k != "answers"},
                "answers": answers,
                "answers_completed_during_training": sum(a["status"] == "succeeded" for a in during),
                "answers_failed": sum(a["status"] != "succeeded" for a in answers),
                "oom": {
                    "training": oom_in(training.get("error")),
                    "sampler": oom_in(*[a.get("error") for a in answers]),
                    "in_logs": oom_in(log_tail(train_log, 10**9), log_tail(sample_log, 10**9)),
                },
                "nvidia_smi": memory,
                "exit_codes": {role: p.returncode for role, p in processes.items()},
                "total_seconds": round(time.time() - begun, 1),
            }
        )
        if "sum_of_both_peak_mib" in memory:
            report["both_under_cap"] = memory["sum_of_both_peak_mib"] < args.cap_gib * 1024
        if training.get("status") not in (JobStatus.SUCCEEDED, JobStatus.CANCELLED):
            report["training_log_tail"] = log_tail(train_log)
        if not answers or report["answers_failed"]:
            report["sampler_log_tail"] = log_tail(sample_log)
    finally:
        for process in processes.values():
            stop_process(process, grace=5)
        monitor.halt.set()
        text = json.dumps(report, indent=1, default=str)
        print(text)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        stem = args.out.with_suffix("")
        if monitor.samples:
            write_timeline(monitor, {r: p.pid for r, p in processes.items()}, Path(f"{stem}.timeline.csv"))
        for role in ("train", "sample"):
            if (work / f"{role}.log").is_file():
                shutil.copy(work / f"{role}.log", f"{stem}.{role}.log")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("t4-budget.json"))
    parser.add_argument("--cap-gib", type=float, default=15.0, help="each process's allocator cap")
    parser.add_argument("--train-seconds", type=float, default=150, help="cancel the training after this")
    parser.add_argument("--deadline-s", type=float, default=420, help="stop everything after this")
    parser.add_argument("--max-steps", type=int, default=5000)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--long-every", type=int, default=4, help="one >2048-token chat after every N")
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--poll-s", type=float, default=0.2)
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--tiny", action="store_true", help="examples/tiny-phi2 (CPU check)")
    parser.add_argument("--not-as-t4", dest="as_t4", action="store_false")
    parser.add_argument("--work", type=Path)
    # children
    parser.add_argument("--role", choices=["build", "train", "sample"])
    parser.add_argument("--result", type=Path)
    parser.add_argument("--job")
    parser.add_argument("--model-dir")
    parser.add_argument("--stop-file")
    args = parser.parse_args()
    if args.role is None:
        parent(args)
        return
    run = {"build": child_build, "train": child_train, "sample": child_sample}[args.role]
    result = run(args)
    args.result.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
