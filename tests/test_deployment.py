"""The deployment a user runs, without Docker: the compose file is validated, the Dockerfile
linted, and the compose services' own commands (migrate, serve, worker, sampler, their
healthchecks, `keys create`) run here on PostgreSQL and Redis with the settings of
`.env.example`. Then what a user watches it with: the CLI (`submit`, `logs --follow`,
`download`, `generate`), the signed job-end notification, /metrics, and the dashboard in
headless Chromium."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import standardwebhooks.webhooks
import yaml
from dotenv import dotenv_values
from standardwebhooks import Webhook, WebhookVerificationError

from tests.conftest import (
    DEMO_JOB,
    POSTGRES_URL,
    REDIS_URL,
    REPO,
    TEST_OWNER,
    demo_spec,
    drop_queues,
    fresh_postgres_database,
    sqlite_only,
    unique_queue,
)
from tests.helpers import wait_until
from tests.processes import free_port, running_service, service_process, wait_for, wait_for_step
from tests.servers import WebhookReceiver

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.usefixtures("demo_model"),
    # one stack for the file when make test runs two processes
    pytest.mark.xdist_group("deployment"),
]

COMPOSE_FILE = REPO / "docker-compose.yml"
COMPOSE_SCHEMA = REPO / "tests" / "data" / "compose-spec" / "compose-spec.json"
BIN = Path(sys.executable).parent
METRICS_TOKEN = "operator-scrape-token"
QUEUE = unique_queue()
NOTIFY_SECRET = "whsec_" + base64.b64encode(b"test-notify-secret-of-32-bytes!!").decode()
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


# --- the files -------------------------------------------------------------------------------
def test_compose_file_is_valid_and_holds_what_a_gpu_host_needs():
    checked = subprocess.run(
        [BIN / "check-jsonschema", "--schemafile", COMPOSE_SCHEMA, COMPOSE_FILE],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

    services = compose()["services"]
    assert {"api", "worker", "sampler", "redis", "postgres", "migrate"} <= set(services)
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis and "--maxmemory-policy noeviction" in redis
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])
    for name in ("api", "worker", "sampler"):
        assert services[name]["healthcheck"]["test"][:3] == ["CMD", "finetune", "health"], name
        assert "/data" in " ".join(services[name]["volumes"]) and "/cache/huggingface" in " ".join(
            services[name]["volumes"]
        )
    for name in ("worker", "sampler"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    grace = services["worker"]["stop_grace_period"]
    assert re.fullmatch(r"\d+m", grace) and int(grace[:-1]) >= 2  # room for the graceful checkpoint

    # every variable the compose file insists on is in .env.example
    example = dotenv_values(REPO / ".env.example")
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE_FILE.read_text()))
    assert required <= set(example), required
    # the database password is written once (compose builds the URL from it)
    assert list(example.values()).count(example["POSTGRES_PASSWORD"]) == 1
    assert "${POSTGRES_PASSWORD" in str(compose()["x-finetune"]["environment"]["FINETUNE_DATABASE_URL"])
    # the local models root is mounted where FINETUNE_LOCAL_ROOTS points
    for root in json.loads(example["FINETUNE_LOCAL_ROOTS"]):
        for name in ("api", "worker", "sampler"):
            targets = [re.search(r":(/[^:]*)(?::ro)?$", volume)[1] for volume in services[name]["volumes"]]
            assert root in targets, (name, root)
    # the build context leaves out the venv, the data, secrets and git
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".env", ".git", "finetune-data"} <= set(ignored)


def test_a_dot_env_for_compose_does_not_steer_local_runs(tmp_path, monkeypatch):
    """Issue 18: the same .env in a checkout broke `make run` (`failed to resolve host 'postgres'`)."""
    from app.settings import Settings

    (tmp_path / ".env").write_text(
        (REPO / ".env.example").read_text() + "FINETUNE_BROKER_URL=redis://redis:6379/0\n"
    )
    monkeypatch.chdir(tmp_path)
    for name in ("FINETUNE_BROKER_URL", "FINETUNE_DATABASE_URL", "FINETUNE_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)

    settings = Settings()

    assert settings.broker_url == "redis://127.0.0.1:6379/0" and settings.database_url.startswith("sqlite")


def test_dockerfile_passes_hadolint_and_runs_as_a_user():
    linted = subprocess.run([BIN / "hadolint", REPO / "Dockerfile"], capture_output=True, text=True)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    users = re.findall(r"^USER (\S+)", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert users and users[-1] not in ("root", "0", "0:0")


# --- the running deployment ------------------------------------------------------------------
@dataclass
class Deployment:
    url: str
    key: str
    env: dict[str, str]
    data_dir: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30)

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """`finetune ARGS` as a user runs it, with FINETUNE_URL / FINETUNE_API_KEY set."""
        env = {**os.environ, "FINETUNE_URL": self.url, "FINETUNE_API_KEY": self.key, "COLUMNS": "200"}
        return subprocess.run(
            [BIN / "finetune", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )


def compose_env(data_dir: Path, database_url: str, broker_url: str, port: int) -> dict[str, str]:
    """.env.example, with the addresses that are docker service names made local."""
    env = {k: v for k, v in dotenv_values(REPO / ".env.example").items() if v is not None}
    env.update(
        FINETUNE_DATABASE_URL=database_url,
        FINETUNE_BROKER_URL=broker_url,
        FINETUNE_DATA_DIR=str(data_dir),
        FINETUNE_HOST="127.0.0.1",
        FINETUNE_PORT=str(port),
        FINETUNE_LOCAL_ROOTS=json.dumps([str(REPO / "examples")]),
        FINETUNE_NOTIFY_SECRET=NOTIFY_SECRET,
        FINETUNE_NOTIFY_ALLOW_PRIVATE="true",  # the test's receiver listens on loopback
        FINETUNE_METRICS_TOKEN=METRICS_TOKEN,
        FINETUNE_QUEUE=QUEUE,  # this run's own: another run on the same Redis can't take its ids
        HF_HOME=str(data_dir / "hf-cache"),
        # quicker than production, so the test doesn't wait
        FINETUNE_SWEEP_INTERVAL_S="0.5",
        FINETUNE_NOTIFY_RETRY_S="0.5",
        FINETUNE_FLUSH_INTERVAL_S="0.5",
        FINETUNE_STREAM_POLL_S="0.2",
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
    )
    return env


def run_healthcheck(service: dict, env: dict[str, str], timeout: float = 90) -> None:
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD"

    def check() -> subprocess.CompletedProcess:
        return subprocess.run(test[1:], env={**os.environ, **env}, capture_output=True, text=True, cwd=REPO)

    def failure() -> str:
        result = check()
        return f"it exits {result.returncode}: {result.stdout}{result.stderr}"

    wait_until(lambda: check().returncode == 0, timeout, what=f"{test} to pass", every=1, state=failure)


@contextmanager
def database_and_broker(tmp: Path) -> Iterator[tuple[str, str]]:
    if POSTGRES_URL and REDIS_URL:
        with fresh_postgres_database() as url:
            yield url, REDIS_URL
        drop_queues(REDIS_URL, QUEUE)
    else:
        yield f"sqlite:///{tmp / 'finetune.db'}", f"sqla+sqlite:///{tmp / 'broker.sqlite'}"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, demo_model) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("deployment")
    data_dir = tmp / "data"
    data_dir.mkdir()
    services = compose()["services"]
    with ExitStack() as stack:
        database_url, broker_url = stack.enter_context(database_and_broker(tmp))
        port = free_port()
        env = compose_env(data_dir, database_url, broker_url, port)

        migrate = subprocess.run(
            services["migrate"]["command"],
            env={**os.environ, **env},
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert migrate.returncode == 0, migrate.stdout + migrate.stderr
        for name in ("api", "worker", "sampler"):
            stack.enter_context(service_process(services[name]["command"], env, tmp / f"{name}.log"))
        for name in ("api", "worker", "sampler"):
            run_healthcheck(services[name], env)

        created = subprocess.run(
            ["finetune", "keys", "create", "tester"],
            env={**os.environ, **env},
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert created.returncode == 0, created.stderr
        yield Deployment(f"http://127.0.0.1:{port}", created.stdout.strip(), env, data_dir)


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    """Fails the first notification (to see the retry), takes the rest."""
    receiver = WebhookReceiver(statuses=(500, 200))
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def finished_job(deployment: Deployment, receiver: WebhookReceiver, tmp_path_factory) -> dict:
    """The demo job submitted and followed with the CLI until it ends."""
    submitted = deployment.cli(
        "submit",
        str(DEMO_JOB),
        "--set",
        "training.max_steps=24",
        "--set",
        "training.save_steps=8",
        "--set",
        "dataset.max_eval_samples=16",
        "--set",
        f"notify_url={receiver.url}",
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert re.fullmatch(r"job_[0-9a-f]{24}", job_id)

    env = {**os.environ, "FINETUNE_URL": deployment.url, "FINETUNE_API_KEY": deployment.key, "COLUMNS": "200"}
    follow = subprocess.Popen(
        [BIN / "finetune", "logs", job_id, "--follow"], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    # while it trains, /metrics shows the operator its throughput
    operator = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    with httpx.Client(base_url=deployment.url, headers=operator, timeout=30) as client:
        gauge = f'finetune_job_steps_per_second{{job_id="{job_id}"'

        def throughput() -> str | None:
            assert follow.poll() is None, "`logs --follow` ended before /metrics showed the throughput"
            text = client.get("/metrics").text
            return text if gauge in text else None

        metrics = wait_until(throughput, 180, what=f"the job's throughput in /metrics ({gauge})", every=0.5)
    output, _ = follow.communicate(timeout=300)
    return {"id": job_id, "follow_rc": follow.returncode, "follow_output": output, "metrics": metrics}


def test_logs_follow_shows_progress_until_the_job_succeeds(deployment, finished_job):
    assert finished_job["follow_rc"] == 0, finished_job["follow_output"]
    output = finished_job["follow_output"]
    assert f"{finished_job['id']} succeeded" in output
    # not a terminal (a pipe here): one line per metric row as it arrives, eval results too
    lines = [line for line in output.splitlines() if line.startswith(("step ", "eval "))]
    assert [line.split()[1] for line in lines if line.startswith("step ")] == [str(s) for s in range(1, 25)]
    assert [line.split()[1] for line in lines if line.startswith("eval ")] == ["8", "16", "24"]
    assert all("loss" in line for line in lines)
    assert 'finetune_jobs{status="running"} 1.0' in finished_job["metrics"]
    for series in ("step", "total_steps", "steps_per_second", "tokens_per_second"):
        line = rf'finetune_job_{series}\{{job_id="{finished_job["id"]}",owner="tester"\}} [0-9.]+'
        assert re.search(line, finished_job["metrics"]), series

    with deployment.client() as client:
        rows = client.get(f"/jobs/{finished_job['id']}/logs").json()["items"]
    assert [row["step"] for row in rows] == list(range(1, 25))
    losses = [row["loss"] for row in rows]
    assert sum(losses[-5:]) < sum(losses[:5])  # it learns


def test_a_failed_job_makes_logs_follow_exit_non_zero(deployment):
    not_a_model = REPO / "examples" / "data" / "oasst1"
    job = deployment.cli("submit", str(DEMO_JOB), "--set", f"base_model={not_a_model}")
    assert job.returncode == 0, job.stderr
    follow = deployment.cli("logs", job.stdout.strip(), "--follow")
    assert follow.returncode == 1 and "failed" in follow.stdout


def test_download_checks_the_sha256(deployment, finished_job, tmp_path):
    job_id = finished_job["id"]
    with deployment.client() as client:
        job = client.get(f"/jobs/{job_id}").json()
        checkpoints = client.get(f"/jobs/{job_id}/checkpoints").json()["items"]
    assert [c["name"] for c in checkpoints] == ["checkpoint-16", "checkpoint-24"]

    adapter = tmp_path / "adapter.zip"
    result = deployment.cli("download", job_id, "adapter", "-o", str(adapter))
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(adapter.read_bytes()).hexdigest() == job["adapter_sha256"]
    assert "adapter/adapter_model.safetensors" in zipfile.ZipFile(adapter).namelist()

    checkpoint = tmp_path / "latest.zip"
    result = deployment.cli("download", job_id, "checkpoint", "-o", str(checkpoint))
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == checkpoints[-1]["sha256"]

    # a file that changed on the server after it was recorded is refused and not left behind
    stored = deployment.data_dir / "jobs" / job_id / "checkpoints" / "checkpoint-16.zip"
    content = bytearray(stored.read_bytes())
    content[len(content) // 2] ^= 0xFF
    stored.write_bytes(bytes(content))
    corrupt = tmp_path / "corrupt.zip"
    result = deployment.cli("download", job_id, "checkpoint-16", "-o", str(corrupt))
    assert result.returncode == 1 and "checksum mismatch" in result.stderr
    assert not corrupt.exists() and not list(tmp_path.glob("*.part"))


def test_the_job_end_is_notified_signed_and_retried(deployment, finished_job, receiver, monkeypatch):
    wait_until(
        lambda: len(receiver.requests) >= 2,
        60,
        what="the job-end notification and its retry",
        state=lambda: f"received {receiver.requests}",
    )
    for headers, body in receiver.requests:
        payload = Webhook(NOTIFY_SECRET).verify(body, headers)  # a Standard Webhooks receiver's check
        assert (payload["job_id"], payload["status"], payload["event"]) == (
            finished_job["id"],
            "succeeded",
            "job.finished",
        )
    assert [json.loads(body)["attempt"] for _, body in receiver.requests] == [1, 2]
    # one message id for both attempts (receivers deduplicate by it); a replay later is refused
    assert len({headers["webhook-id"] for headers, _ in receiver.requests}) == 1
    headers, body = receiver.requests[-1]
    restamped = {**headers, "webhook-timestamp": str(int(time.time()))}
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(NOTIFY_SECRET).verify(body, restamped)  # the timestamp is signed
    sent_at = datetime.fromtimestamp(int(headers["webhook-timestamp"]), UTC)

    class SixMinutesLater(datetime):
        @classmethod
        def now(cls, tz=None):
            return sent_at + timedelta(minutes=6)

    monkeypatch.setattr(standardwebhooks.webhooks, "datetime", SixMinutesLater)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(NOTIFY_SECRET).verify(body, headers)
    with deployment.client() as client:
        events = client.get(f"/jobs/{finished_job['id']}/events").json()["items"]
    attempts = [e["message"] for e in events if e["message"].startswith("notification")]
    assert len(attempts) == 2
    assert "attempt 1: HTTP 500; next try" in attempts[0] and "attempt 2: HTTP 200; delivered" in attempts[1]


def test_generate_answers_with_the_jobs_adapter(deployment, finished_job, tmp_path):
    from openai import OpenAI

    from app.models import Sample
    from app.spec import JobSpec
    from worker.sampling import generate
    from worker.training.model import compute_dtype, load_quantized_model, load_tokenizer

    prompt = "What is the capital of France?"
    answered = deployment.cli("generate", finished_job["id"], prompt, "--max-new-tokens", "12")
    assert answered.returncode == 0, answered.stderr

    # the same greedy answer from the base model and the adapter loaded here
    from peft import PeftModel

    with deployment.client() as client:
        spec = JobSpec.model_validate(client.get(f"/jobs/{finished_job['id']}").json()["spec"])
    model = PeftModel.from_pretrained(
        load_quantized_model(spec, compute_dtype(spec.quantization)),
        deployment.data_dir / "jobs" / finished_job["id"] / "adapter",
    )
    asked = Sample(prompt=prompt, messages=[{"role": "user", "content": prompt}], max_new_tokens=12)
    asked.temperature, asked.top_p = 0.0, 1.0
    expected = generate(model.eval(), load_tokenizer(spec.base_model), asked).text
    assert answered.stdout.strip() == expected

    # the official client alone, from the job to a chat answer by the sampler process (issue 16)
    ai = OpenAI(base_url=f"{deployment.url}/v1", api_key=deployment.key, max_retries=0)
    model_id = ai.fine_tuning.jobs.retrieve(finished_job["id"]).fine_tuned_model
    assert model_id is not None and model_id in [m.id for m in ai.models.list()]
    chat = ai.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0
    )
    assert chat.choices[0].message.content == expected

    # a merged model, made by the sampler process and checked on download
    merged = tmp_path / "merged.zip"
    exported = deployment.cli("export", finished_job["id"], "--format", "merged", "-o", str(merged))
    assert exported.returncode == 0 and "(verified)" in exported.stdout, exported.stderr
    with zipfile.ZipFile(merged) as archive:
        assert {"merged/config.json", "merged/model.safetensors", "merged/tokenizer.json"} <= set(
            archive.namelist()
        )

    from_checkpoint = deployment.cli("generate", finished_job["id"], prompt, "--checkpoint", "checkpoint-24")
    assert from_checkpoint.returncode == 0, from_checkpoint.stderr
    missing = deployment.cli("generate", finished_job["id"], prompt, "--checkpoint", "checkpoint-8")
    assert missing.returncode == 1 and "checkpoint_not_found" in missing.stderr


def test_pause_saves_a_checkpoint_and_resume_finishes_the_job(deployment):
    settings = (
        "training.max_steps=12",
        "training.save_steps=100",
        "training.max_seq_length=128",  # quicker steps; 11 of them still follow the pause's step
        "dataset.max_eval_samples=4",
    )
    submitted = deployment.cli("submit", str(DEMO_JOB), *(f"--set={value}" for value in settings))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    with deployment.client() as client:
        wait_for_step(client, job_id, 1)
        # the README's one-liner: pause takes effect at the next step; --wait returns then
        paused = deployment.cli("pause", job_id, "--wait")
        assert paused.returncode == 0 and f"{job_id}: paused" in paused.stdout, paused.stderr
        stopped = client.get(f"/jobs/{job_id}").json()
        assert stopped["status"] == "paused", stopped["error"]
        [checkpoint] = client.get(f"/jobs/{job_id}/checkpoints").json()["items"]
        assert checkpoint["step"] == stopped["current_step"] < 12

        following = deployment.cli("logs", job_id, "--follow")  # the stream ends at the pause
        assert following.returncode == 1 and f"{job_id} paused" in following.stdout
        resumed = deployment.cli("resume", job_id)
        assert f"{job_id}: queued, from {checkpoint['name']}" in resumed.stdout, resumed.stderr
        finished = deployment.cli("logs", job_id, "--follow")
        assert finished.returncode == 0, finished.stdout
        assert [row["step"] for row in client.get(f"/jobs/{job_id}/logs").json()["items"]] == list(
            range(1, 13)
        )


def test_cancel_wait_then_resume_from_a_checkpoint_and_jobs_in_a_pipe(deployment):
    """The README's `finetune cancel $JOB --wait; finetune resume $JOB --checkpoint …`, and
    `finetune jobs` never cutting an id, whatever the width."""
    settings = ("training.max_steps=9", "training.save_steps=3", "training.save_total_limit=10")
    small = ("dataset.max_eval_samples=4",)
    submitted = deployment.cli("submit", str(DEMO_JOB), *(f"--set={value}" for value in settings + small))
    job_id = submitted.stdout.strip()
    with deployment.client() as client:
        wait_for_step(client, job_id, 3)
        cancelled = deployment.cli("cancel", job_id, "--wait")
        assert cancelled.returncode == 0 and f"{job_id}: cancelled" in cancelled.stdout, cancelled.stderr
        resumed = deployment.cli("resume", job_id, "--checkpoint", "checkpoint-3")
        assert resumed.returncode == 0 and "from checkpoint-3" in resumed.stdout, resumed.stderr
        done = deployment.cli("logs", job_id, "--follow")
        assert done.returncode == 0 and f"{job_id} succeeded" in done.stdout

    narrow = {**os.environ, "FINETUNE_URL": deployment.url, "FINETUNE_API_KEY": deployment.key}
    narrow["COLUMNS"] = "40"
    listed = subprocess.run([BIN / "finetune", "jobs"], env=narrow, capture_output=True, text=True)
    assert listed.returncode == 0 and f"{job_id}\tsucceeded\t9/9\t" in listed.stdout, listed.stdout


def test_upload_prints_the_validation_report(deployment, tmp_path):
    from tests.test_datasets import CHAT, jsonl

    good = tmp_path / "chats.jsonl"
    good.write_bytes(jsonl(CHAT))
    result = deployment.cli("upload", str(good))
    assert result.returncode == 0, result.stderr
    assert re.search(r"ds_[0-9a-f]{24}\s+ready", result.stdout) and "format     chat" in result.stdout
    assert '{"dataset": {"source": "ds_' in result.stdout

    bad = tmp_path / "broken.jsonl"
    bad.write_bytes(jsonl(CHAT) + b"{not json\n")
    result = deployment.cli("upload", str(bad))
    assert result.returncode == 1 and "invalid" in result.stdout
    assert re.search(r"line 3: invalid JSON", result.stdout), result.stdout


# --- the dashboard ---------------------------------------------------------------------------
@pytest.fixture
def browser(tmp_path) -> Iterator:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.environ.get("FINETUNE_TEST_REQUIRE_BROWSER"):
            pytest.fail("Debian's chromium and chromium-driver are not installed")
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1150",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def test_dashboard_draws_the_runs_metrics_and_cancels_and_resumes(deployment, finished_job, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{deployment.url}/ui/")
    wait_until(lambda: browser.find_element(By.ID, "key-view").is_displayed(), what="the key prompt")
    browser.find_element(By.ID, "key-input").send_keys(deployment.key)
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    row = wait_until(
        lambda: browser.find_elements(By.CSS_SELECTOR, f'tr[data-job="{finished_job["id"]}"]'),
        what="the job's row in the table",
    )[0]
    assert "succeeded" in row.text

    # a finished run: its whole curve, point for point as stored
    row.find_element(By.TAG_NAME, "a").click()
    wait_until(
        lambda: browser.execute_script("return window.dashboard.ready"), what="the job page to be ready"
    )
    with deployment.client() as client:
        rows = client.get(f"/jobs/{finished_job['id']}/logs").json()["items"]
    drawn = browser.execute_script("return window.dashboard.charts.loss.data")
    assert drawn[0] == [row["step"] for row in rows]
    assert drawn[1] == pytest.approx([row["loss"] for row in rows])
    eval_points = [(s, v) for s, v in zip(drawn[0], drawn[2], strict=True) if v is not None]
    assert eval_points == [(row["step"], pytest.approx(row["eval_loss"])) for row in rows if row["eval_loss"]]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#checkpoints-table tbody tr")) == 2
    # the samples box answers with the adapter
    browser.find_element(By.ID, "sample-prompt").send_keys("What is the capital of France?")
    browser.find_element(By.CSS_SELECTOR, "#sample-form button").click()
    sample = wait_until(
        lambda: browser.execute_script("return window.dashboard.lastSample"),
        timeout=120,
        what="an answer in the samples box",
    )
    assert sample["status"] == "succeeded" and sample["checkpoint"] is None, sample
    assert browser.find_element(By.ID, "sample-output").text == (sample["completion"] or "(an empty answer)")
    # the export button: the sampler process merges the adapter, and the list offers the download
    browser.find_element(By.ID, "export-button").click()
    wait_until(
        lambda: any(
            b.text.startswith("Download (") for b in browser.find_elements(By.CSS_SELECTOR, "#exports button")
        ),
        timeout=120,
        what="a merged export to download",
    )
    # the README's picture, refreshed only when asked for (tests write nothing tracked)
    screenshot = os.environ.get("FINETUNE_TEST_SCREENSHOT")
    browser.save_screenshot(screenshot or str(deployment.data_dir.parent / "dashboard.png"))

    # a live run: points arrive over the stream; cancel, then resume from its checkpoint
    with deployment.client() as client:
        spec = json.loads(DEMO_JOB.read_text())
        spec["dataset"]["max_eval_samples"] = 8
        spec["training"].update(max_steps=16, save_steps=2, save_total_limit=10)
        live = client.post("/jobs", json=spec).json()["id"]
        browser.get(f"{deployment.url}/ui/#/jobs/{live}")
        wait_until(
            lambda: browser.execute_script("return window.dashboard.ready"),
            what="the live job's page to be ready",
        )
        wait_until(
            lambda: browser.execute_script("return window.dashboard.rows.length") >= 3,
            timeout=120,
            what="3 live points",
        )
        wait_until(
            lambda: client.get(f"/jobs/{live}/checkpoints").json()["items"],
            what="the live job's first checkpoint",
        )
        asked = time.monotonic()
        browser.find_element(By.ID, "cancel-button").click()
        cancelled = wait_for(client, live, {"cancelled", "failed", "succeeded"}, timeout=60)
        cancel_seconds = time.monotonic() - asked
        assert cancelled["status"] == "cancelled" and cancelled["current_step"] < 16
        rows_at_cancel = client.get(f"/jobs/{live}/logs").json()["items"]
        assert rows_at_cancel[-1]["step"] == cancelled["current_step"]  # no row after the stop
        print(
            f"FIGURE cancel: training stopped {cancel_seconds:.1f} s after the click, at step "
            f"{cancelled['current_step']}; no metric row after it"
        )
        wait_until(
            lambda: browser.find_element(By.ID, "job-status").text == "cancelled",
            timeout=30,
            what="the page to show the job cancelled",
        )
        steps = list(range(1, cancelled["current_step"] + 1))
        wait_until(
            lambda: browser.execute_script("return window.dashboard.charts.loss.data[0]") == steps,
            what="the chart to end at the step the job stopped at",
        )
        latest = client.get(f"/jobs/{live}/checkpoints").json()["items"][-1]

        browser.find_element(By.ID, "resume-button").click()
        done = wait_for(client, live, {"succeeded", "failed"}, timeout=300)
        assert (done["status"], done["attempts"], done["current_step"]) == ("succeeded", 2, 16), done
        assert done["resume_from"] == latest["name"]
        rows = client.get(f"/jobs/{live}/logs").json()["items"]
        assert [row["step"] for row in rows] == list(range(1, 17))  # replayed after the checkpoint, once
        replayed = [row for row in rows if row["step"] > latest["step"]]
        kept = [row for row in rows_at_cancel if row["step"] <= latest["step"]]
        assert min(row["time"] for row in replayed) > max(row["time"] for row in kept)
        messages = [e["message"] for e in client.get(f"/jobs/{live}/events").json()["items"]]
        assert f"resume: resuming from {latest['name']}" in messages and "started (attempt 2)" in messages
        # the page, reloaded by the resume, drew the whole run from the stream
        wait_until(
            lambda: (
                browser.execute_script("return window.dashboard.charts.loss.data[0]") == list(range(1, 17))
            ),
            timeout=60,
            what="the chart to follow the resumed run to its end",
        )


@sqlite_only
def test_dashboard_charts_a_preference_jobs_figures_and_shows_its_method(service_env, tmp_path, browser):
    """A DPO job's page gets two more charts, the rewards of the chosen and the rejected replies
    and the accuracy with the margin, each for training and the eval set; a supervised job's
    has neither. Each page names its job's method and the job whose adapter it continues from.
    (Only the API runs: the DPO job's rows are written through the services its worker calls.)"""
    from selenium.webdriver.common.by import By

    from app.models import utcnow
    from app.services import runs
    from app.services.keys import create_key

    def row(step: int, prefix: str = "") -> dict:
        """A training row (prefix "") or an evaluation's ("eval_"), as a DPO job's worker writes them."""
        x = step / 10
        rewards = {"chosen": x, "rejected": -x, "margins": 2 * x, "accuracies": x + 0.5}
        figures = {f"{prefix}rewards/{name}": value for name, value in rewards.items()}
        return {"step": step, f"{prefix}loss": 0.69, "time": utcnow(), "figures": figures}

    with running_service(service_env, tmp_path, worker=False) as client:
        method = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}}
        dpo = client.post("/jobs", json={**demo_spec(), "method": method})
        assert dpo.status_code == 201, dpo.text
        claim = runs.claim_job(dpo.json()["id"])
        rows = [row(1), row(2), row(2, "eval_"), row(3), row(4), row(4, "eval_")]
        runs.report_progress(claim, 4, rows)
        runs.record_checkpoint(
            claim, "checkpoint-4", 4, str(tmp_path / "checkpoint-4.zip"), 1, "0" * 64, keep=1
        )
        runs.finish_job(claim, "succeeded", "finished")
        # a supervised job that continues from it, queued (no worker runs)
        init_from = {"job": claim.job_id, "checkpoint": "checkpoint-4"}
        supervised = client.post("/jobs", json={**demo_spec(), "init_from": init_from})
        assert supervised.status_code == 201, supervised.text

        browser.get(f"{client.base_url}/ui/")
        wait_until(lambda: browser.find_element(By.ID, "key-view").is_displayed(), what="the key prompt")
        browser.find_element(By.ID, "key-input").send_keys(create_key(TEST_OWNER))
        browser.find_element(By.CSS_SELECTOR, "#key-form button").click()

        def job_page(job_id: str) -> None:
            browser.execute_script(f"location.hash = '#/jobs/{job_id}'")
            wait_until(
                lambda: (
                    browser.execute_script("return window.dashboard.ready && window.dashboard.job.id")
                    == job_id
                ),
                what=f"the page of {job_id}",
            )

        job_page(claim.job_id)
        assert browser.find_element(By.ID, "job-method").text == "method dpo (beta 0.2)"
        assert browser.find_element(By.ID, "figure-rewards").is_displayed()
        assert browser.find_element(By.ID, "figure-preference").is_displayed()
        steps = [1, 2, 3, 4]

        def drawn(name: str, prefix: str = "") -> list[float | None]:
            """A figure's points: at every step; the eval set's at the evaluated ones (2 and 4)."""
            points = [row(s, prefix)["figures"][f"{prefix}rewards/{name}"] for s in steps]
            return [p if s % 2 == 0 or not prefix else None for s, p in zip(steps, points, strict=True)]

        charted = {"rewards": ["chosen", "rejected"], "preference": ["accuracies", "margins"]}
        for chart, names in charted.items():
            data = browser.execute_script(f"return window.dashboard.charts.{chart}.data")
            assert data == [steps, *(drawn(n) for n in names), *(drawn(n, "eval_") for n in names)]

        job_page(supervised.json()["id"])
        assert (
            browser.find_element(By.ID, "job-method").text
            == f"method supervised · from {claim.job_id} checkpoint-4"
        )
        assert not browser.find_element(By.ID, "figure-rewards").is_displayed()
        assert not browser.find_element(By.ID, "figure-preference").is_displayed()
        assert browser.execute_script("return Object.keys(window.dashboard.charts)") == [
            "loss",
            "learningRate",
            "throughput",
        ]


@sqlite_only  # the embedded broker is what `make run` uses, with its SQLite database
def test_health_answers_for_a_worker_on_the_embedded_broker(service_env, tmp_path):
    """Issue 18: `finetune health worker` never answered over the embedded SQLite broker (it
    can't carry Celery's broadcast ping), so a fresh machine's `make test` failed here."""
    from tests.processes import finetune_process

    def health(service: str) -> int:
        return subprocess.run(
            [sys.executable, "-m", "app.cli", "health", service], env={**os.environ, **service_env}, cwd=REPO
        ).returncode

    assert service_env["FINETUNE_BROKER_URL"].startswith("sqla+sqlite")
    with finetune_process("worker", service_env, tmp_path):
        wait_until(lambda: health("worker") == 0, 60, what="`finetune health worker` to say healthy", every=1)
        assert health("sampler") == 1  # none runs
    assert health("worker") == 1  # stopped: its heartbeat is gone
