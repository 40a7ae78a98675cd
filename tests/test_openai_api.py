"""The OpenAI-compatible /v1 routes, driven by the official `openai` client (pinned in
pyproject): files, errors and paging in-process; a job's whole life (train, events,
checkpoints, pause and resume, cancel) against a live server with a real worker."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import time
import zipfile
from datetime import timedelta
from pathlib import Path
from unittest import mock

import httpx
import httpx2  # what the openai client (and Starlette's TestClient) send requests with
import openai
import pytest
from openai import OpenAI

from app.models import utcnow
from app.services import runs
from tests.conftest import DEMO_MODEL, REPO, sqlite_only
from tests.processes import finetune_process, running_service, wait_for_step

# Small chat records (OpenAI's fine-tuning format) the tiny model learns from quickly.
CHATS = [
    {
        "messages": [
            {"role": "system", "content": "You add numbers."},
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
        ]
    }
    for a in range(8)
    for b in range(8)
]


def chat_jsonl(records=CHATS) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def preference_jsonl(count: int = 8) -> bytes:
    """OpenAI's preference format: the right sum preferred to a wrong one."""
    records = [
        {
            "input": {"messages": [{"role": "user", "content": f"What is {a} plus {a + 1}?"}]},
            "preferred_output": [{"role": "assistant", "content": f"{a} plus {a + 1} is {2 * a + 1}."}],
            "non_preferred_output": [{"role": "assistant", "content": f"{a} plus {a + 1} is {2 * a + 3}."}],
        }
        for a in range(count)
    ]
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def job_options(**training) -> dict:
    """The tiny local model, trained quickly: what a user sends beside OpenAI's fields."""
    return {
        "quantization": {"compute_dtype": "float32"},
        "training": {
            "batch_size": 4,
            "gradient_accumulation_steps": 1,
            "max_seq_length": 64,
            "logging_steps": 1,
            "learning_rate": 0.03,
            **training,
        },
    }


def openai_client(client: httpx.Client, **options) -> OpenAI:
    """The official client against the service's /v1, with this test's API key."""
    key = client.headers["Authorization"].removeprefix("Bearer ")
    return OpenAI(base_url=f"{client.base_url}/v1", api_key=key, **options)


# --- in-process: the app answers the official client ------------------------------------------
@pytest.fixture
def ai(client) -> OpenAI:
    return openai_client(client, http_client=client, max_retries=0)


def test_files_upload_list_read_and_delete(ai):
    uploaded = ai.files.create(file=("train.jsonl", chat_jsonl()), purpose="fine-tune")
    assert (uploaded.object, uploaded.status, uploaded.purpose) == ("file", "processed", "fine-tune")
    assert uploaded.bytes == len(chat_jsonl()) and uploaded.filename == "train.jsonl"
    assert ai.files.retrieve(uploaded.id) == uploaded
    assert ai.files.content(uploaded.id).content == chat_jsonl()

    others = [
        ai.files.create(file=(f"f{i}.jsonl", chat_jsonl(CHATS[:2])), purpose="fine-tune") for i in range(2)
    ]
    first = ai.files.list(limit=2)
    assert [f.id for f in first.data] == [others[1].id, others[0].id] and first.has_more
    assert [f.id for f in ai.files.list(limit=2)] == [others[1].id, others[0].id, uploaded.id]  # auto-paging

    deleted = ai.files.delete(uploaded.id)
    assert (deleted.id, deleted.deleted) == (uploaded.id, True)
    with pytest.raises(openai.NotFoundError):
        ai.files.retrieve(uploaded.id)


def test_malformed_jsonl_is_kept_as_a_file_in_error_with_the_reason(ai):
    lines = [json.dumps(CHATS[0]), "{not json", json.dumps({"messages": [{"role": "user", "content": "hi"}]})]
    broken = ai.files.create(file=("broken.jsonl", "\n".join(lines).encode()), purpose="fine-tune")

    assert broken.status == "error"
    assert "line 2: invalid JSON" in broken.status_details
    assert "line 3: no assistant message to learn from" in broken.status_details
    with pytest.raises(openai.BadRequestError) as refused:
        ai.fine_tuning.jobs.create(model=str(DEMO_MODEL), training_file=broken.id)
    assert refused.value.body["param"] == "training_file" and "invalid" in refused.value.message


def test_each_error_is_the_class_the_client_raises_for_its_status(ai, client):
    with pytest.raises(openai.AuthenticationError) as unauthenticated:
        OpenAI(base_url=f"{client.base_url}/v1", api_key="key_0.wrong", http_client=client).files.list()
    assert unauthenticated.value.status_code == 401 and unauthenticated.value.code == "not_authenticated"

    with pytest.raises(openai.NotFoundError) as missing:
        ai.fine_tuning.jobs.retrieve("job_" + "0" * 24)
    assert missing.value.body == {
        "message": f"no job 'job_{'0' * 24}'",
        "type": "invalid_request_error",
        "param": None,
        "code": "job_not_found",
    }

    with pytest.raises(openai.BadRequestError) as bad_purpose:
        ai.files.create(file=("a.jsonl", chat_jsonl()), purpose="batch")
    assert bad_purpose.value.param == "purpose"

    training_file = ai.files.create(file=("t.jsonl", chat_jsonl()), purpose="fine-tune").id
    bad = {
        "model": ({"model": "gpt-4o-mini"}, "model"),
        "epochs": ({"hyperparameters": {"n_epochs": -1}}, "hyperparameters.n_epochs"),
        "method": ({"method": {"type": "reinforcement"}}, "method.type"),
        "file": ({"training_file": "file-abc123"}, "training_file"),
        "lora": ({"extra_body": {"lora": {"r": 0}}}, "lora.r"),
        "reserved": ({"extra_body": {"base_model": "x/y"}}, "base_model"),
    }
    for name, (fields, param) in bad.items():
        arguments = {"model": str(DEMO_MODEL), "training_file": training_file, **fields}
        with pytest.raises(openai.BadRequestError) as refused:
            ai.fine_tuning.jobs.create(**arguments)
        assert refused.value.param == param, (name, refused.value.body)
    assert ai.fine_tuning.jobs.list().data == []  # nothing was created

    # a state that forbids the action is a 400 (a 409 would be retried by the client)
    job = ai.fine_tuning.jobs.create(model=str(DEMO_MODEL), training_file=training_file)
    with pytest.raises(openai.BadRequestError) as not_paused:
        ai.fine_tuning.jobs.resume(job.id)
    assert not_paused.value.code == "invalid_job_state"
    assert ai.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    for action in (ai.fine_tuning.jobs.pause, ai.fine_tuning.jobs.cancel):
        with pytest.raises(openai.BadRequestError):
            action(job.id)


def test_create_maps_openais_fields_onto_the_spec_and_pages_with_after(ai, client):
    training_file = ai.files.create(file=("t.jsonl", chat_jsonl()), purpose="fine-tune").id
    job = ai.fine_tuning.jobs.create(
        model=str(DEMO_MODEL),
        training_file=training_file,
        suffix="adder",
        seed=7,
        metadata={"team": "search"},
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 0.5}
            },
        },
        extra_body={"lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}},
    )
    assert (job.object, job.status, job.model, job.seed) == ("fine_tuning.job", "queued", "tiny-phi2", 7)
    assert job.hyperparameters.model_dump() == {
        "n_epochs": 3,
        "batch_size": 8,
        "learning_rate_multiplier": 0.5,
    }
    assert job.method.type == "supervised" and job.metadata == {"team": "search"}
    assert job.training_file == training_file and job.fine_tuned_model is None and job.error is None

    spec = client.get(f"/jobs/{job.id}").json()["spec"]  # the same job on the service's own API
    assert (spec["name"], spec["lora"]["r"], spec["lora"]["target_modules"]) == (
        "adder",
        8,
        ["q_proj", "v_proj"],
    )
    training = spec["training"]
    assert (training["epochs"], training["batch_size"], training["gradient_accumulation_steps"]) == (3, 4, 2)
    assert training["learning_rate"] == pytest.approx(1e-4) and training["seed"] == 7

    more = [ai.fine_tuning.jobs.create(model=str(DEMO_MODEL), training_file=training_file) for _ in range(2)]
    newest_first = [more[1].id, more[0].id, job.id]
    first = ai.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first.data] == newest_first[:2] and first.has_more
    rest = ai.fine_tuning.jobs.list(limit=2, after=first.data[-1].id)
    assert [j.id for j in rest.data] == newest_first[2:] and not rest.has_more
    assert [j.id for j in ai.fine_tuning.jobs.list(limit=1)] == newest_first  # the client's auto-paging


# OpenAI's preference pairs (method dpo)
PAIRS = [
    {
        "input": {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}]},
        "preferred_output": [{"role": "assistant", "content": f"{a + b}."}],
        "non_preferred_output": [{"role": "assistant", "content": f"{a + b + 1}."}],
    }
    for a in range(4)
    for b in range(4)
]


def test_a_dpo_method_maps_onto_the_spec_and_reads_back_as_openais(ai, client):
    pairs = ai.files.create(file=("pairs.jsonl", chat_jsonl(PAIRS)), purpose="fine-tune")
    assert pairs.status == "processed", pairs.status_details
    dpo = {"beta": 0.2, "n_epochs": 2, "batch_size": 8, "loss_type": "ipo"}  # loss_type: the spec's own

    job = ai.fine_tuning.jobs.create(
        model=str(DEMO_MODEL), training_file=pairs.id, method={"type": "dpo", "dpo": {"hyperparameters": dpo}}
    )

    assert job.method.type == "dpo" and job.method.supervised is None
    shown = job.method.dpo.hyperparameters
    assert (shown.beta, shown.n_epochs, shown.batch_size, shown.learning_rate_multiplier) == (0.2, 2, 8, 1)
    assert shown.model_extra["loss_type"] == "ipo"
    spec = client.get(f"/jobs/{job.id}").json()["spec"]
    assert spec["method"] == {
        "type": "dpo",
        "dpo": {
            "hyperparameters": {"beta": 0.2, "loss_type": "ipo", "label_smoothing": 0.0, "reference": "auto"}
        },
    }
    training = spec["training"]
    assert (training["epochs"], training["batch_size"], training["gradient_accumulation_steps"]) == (2, 4, 2)

    auto = ai.fine_tuning.jobs.create(
        model=str(DEMO_MODEL), training_file=pairs.id, method={"type": "dpo", "dpo": {"hyperparameters": {}}}
    )
    assert auto.method.dpo.hyperparameters.beta == 0.1
    refused = {
        "method.supervised": {"type": "dpo", "supervised": {"hyperparameters": {"n_epochs": 1}}},
        "method.dpo.hyperparameters.beta": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}},
        "method.dpo.hyperparameters.loss_type": {
            "type": "dpo",
            "dpo": {"hyperparameters": {"loss_type": "kto"}},
        },
    }
    for param, method in refused.items():
        with pytest.raises(openai.BadRequestError) as bad:
            ai.fine_tuning.jobs.create(model=str(DEMO_MODEL), training_file=pairs.id, method=method)
        assert bad.value.param == param, bad.value.body


def test_a_fine_tuned_model_as_model_continues_from_its_adapter(ai, client):
    from app.api.openai.objects import fine_tuned_model
    from app.services import jobs
    from app.spec import JobSpec
    from tests.conftest import TEST_OWNER
    from tests.test_auth import finished_job

    training_file = ai.files.create(file=("t.jsonl", chat_jsonl()), purpose="fine-tune").id
    earlier = ai.fine_tuning.jobs.retrieve(finished_job(TEST_OWNER))
    [checkpoint] = ai.fine_tuning.jobs.checkpoints.list(earlier.id).data

    job = ai.fine_tuning.jobs.create(model=earlier.fine_tuned_model, training_file=training_file)
    from_checkpoint = ai.fine_tuning.jobs.create(
        model=checkpoint.fine_tuned_model_checkpoint, training_file=training_file
    )

    assert job.model == from_checkpoint.model == "microsoft/phi-2"  # the earlier job's base
    spec = client.get(f"/jobs/{job.id}").json()["spec"]
    assert spec["init_from"] == {"job": earlier.id, "checkpoint": None}
    assert client.get(f"/jobs/{from_checkpoint.id}").json()["spec"]["init_from"] == {
        "job": earlier.id,
        "checkpoint": "checkpoint-10",
    }

    bobs = fine_tuned_model(jobs.get_job(finished_job("bob"), "bob"))
    queued = fine_tuned_model(jobs.create_job(JobSpec(), TEST_OWNER))
    unknown = earlier.fine_tuned_model.replace(earlier.id, "job_" + "0" * 24)
    gone = checkpoint.fine_tuned_model_checkpoint.replace("ckpt-step-10", "ckpt-step-9")
    for model in (bobs, queued, unknown, gone):
        with pytest.raises(openai.BadRequestError) as refused:
            ai.fine_tuning.jobs.create(model=model, training_file=training_file)
        assert refused.value.param == "model", (model, refused.value.body)
    with pytest.raises(openai.BadRequestError) as conflict:
        ai.fine_tuning.jobs.create(
            model=earlier.fine_tuned_model, training_file=training_file, extra_body={"lora": {"r": 4}}
        )
    assert conflict.value.param == "lora.r" and earlier.id in conflict.value.message


def test_jobs_are_listed_by_their_metadata(ai, client):
    training_file = ai.files.create(file=("t.jsonl", chat_jsonl()), purpose="fine-tune").id
    made = {
        team: ai.fine_tuning.jobs.create(
            model=str(DEMO_MODEL),
            training_file=training_file,
            **({"metadata": {"team": team}} if team else {}),
        ).id
        for team in ("search", "ads", None)
    }
    assert [j.id for j in ai.fine_tuning.jobs.list(metadata={"team": "search"})] == [made["search"]]
    assert [j.id for j in ai.fine_tuning.jobs.list(metadata={"team": "nobody"})] == []
    assert len(ai.fine_tuning.jobs.list(metadata={}).data) == 3
    unlabelled = client.get("/v1/fine_tuning/jobs", params={"metadata": "null"}).json()["data"]
    assert [j["id"] for j in unlabelled] == [made[None]]


def test_a_running_job_estimates_its_finish_and_a_stopped_one_has_a_result_file(ai):
    training_file = ai.files.create(file=("t.jsonl", chat_jsonl()), purpose="fine-tune").id
    job = ai.fine_tuning.jobs.create(model=str(DEMO_MODEL), training_file=training_file)
    claim = runs.claim_job(job.id)
    runs.set_total_steps(claim, 100)
    now = utcnow()
    rows = [{"step": s, "loss": 5 - s / 10, "time": now - timedelta(seconds=10 - s)} for s in range(1, 11)]
    runs.report_progress(claim, 10, rows, trained_tokens=5000)

    running = ai.fine_tuning.jobs.retrieve(job.id)
    assert running.estimated_finish == pytest.approx(now.timestamp() + 90, abs=3)  # 1 step/s, 90 to go
    assert (running.trained_tokens, running.result_files) == (5000, [])

    runs.finish_job(claim, "failed", "training failed", error="RuntimeError: out of memory")
    failed = ai.fine_tuning.jobs.retrieve(job.id)
    assert failed.error.model_dump() == {
        "code": "training_failed",
        "message": "RuntimeError: out of memory",
        "param": None,
    }
    assert failed.estimated_finish is None
    [results] = failed.result_files
    described = ai.files.retrieve(results)
    assert (described.purpose, described.status) == ("fine-tune-results", "processed")
    table = list(csv.DictReader(io.StringIO(ai.files.content(results).text)))
    assert len(table) == 10 and described.bytes == len(ai.files.content(results).content)
    assert (table[0]["step"], float(table[0]["train_loss"])) == ("1", 4.9)
    with pytest.raises(openai.BadRequestError):
        ai.files.delete(results)


# What LangChain's completions class, lm-evaluation-harness and other clients send: every
# parameter at the value that changes nothing
NEUTRAL = {
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "n": 1,
    "logit_bias": {},
    "response_format": {"type": "text"},
    "seed": None,
    "user": None,
    "stream": False,
    "stop": None,
}
NEUTRAL_COMPLETION = {**NEUTRAL, "best_of": 1, "echo": False, "logprobs": None, "suffix": None}
NEUTRAL_CHAT = {
    **NEUTRAL,
    "logprobs": False,
    "top_logprobs": None,
    "tools": [],
    "tool_choice": "none",
    "functions": None,
    "function_call": None,
    "parallel_tool_calls": True,
    "audio": None,
    "modalities": ["text"],
    "store": False,
    "metadata": {},
    "prediction": None,
    "reasoning_effort": None,
    "service_tier": "auto",
    "verbosity": "medium",
    "web_search_options": None,
    "prompt_cache_key": "k",
    "safety_identifier": "u",
    "temperature": None,
    "top_p": None,
    "max_tokens": None,
}
# a parameter at a value this service doesn't implement: a 400 naming it
REFUSED_COMPLETION = {
    "frequency_penalty": 0.5,
    "presence_penalty": -1,
    "n": 2,
    "best_of": 2,
    "logit_bias": {"50256": -100},
    "suffix": "and then",
    "logprobs": 6,
    "max_tokens": -1,
    "response_format": {"type": "json_object"},
    "tools": [],  # not a parameter of text completions
}
REFUSED_CHAT = {
    "n": 2,
    "tools": [{"type": "function", "function": {"name": "f"}}],
    "tool_choice": "auto",
    "store": True,
    "audio": {"voice": "alloy", "format": "mp3"},
    "top_logprobs": 21,
    "max_tokens": 0,
    "modalities": ["text", "audio"],
    "service_tier": "flex",
    "echo": True,  # legacy completions only
}
PROMPTS_TAKEN = ["Hi", ["Hi", "there"], [15496, 612], [[15496], [612, 1110]]]
PROMPTS_REFUSED = [[], "", [[]], ["Hi", 1], [1, True], [-1], [[1], "x"], [1.5], ["x"] * 65, {"text": "Hi"}]


def test_completions_take_every_parameter_at_its_neutral_value_and_name_any_other(client):
    """The body is checked before the model is looked up: a body taken answers 404 for an
    unknown model; one refused is a 400 in OpenAI's shape naming the parameter."""

    def post(route: str, body: dict) -> httpx.Response:
        return client.post(f"/v1/{route}", json={"model": "ft:tiny:alice:x:job_nope", **body})

    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    for route, taken in (
        ("completions", {"prompt": "Hi", **NEUTRAL_COMPLETION}),
        ("chat/completions", {**chat, **NEUTRAL_CHAT}),
    ):
        answer = post(route, taken)
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found", answer.text
    for prompt in PROMPTS_TAKEN:
        assert (
            post("completions", {"prompt": prompt, "echo": True, "logprobs": 5, "max_tokens": 0}).status_code
            == 404
        )
    assert post("chat/completions", {**chat, "logprobs": True, "top_logprobs": 20}).status_code == 404

    refusals = [("completions", {"prompt": "Hi", k: v}, k) for k, v in REFUSED_COMPLETION.items()]
    refusals += [("chat/completions", {**chat, k: v}, k) for k, v in REFUSED_CHAT.items()]
    refusals += [("completions", {"prompt": p}, "prompt") for p in PROMPTS_REFUSED]
    refusals += [("chat/completions", {**chat, "top_logprobs": 2}, "top_logprobs")]  # without logprobs
    for route, body, param in refusals:
        answer = post(route, body)
        error = answer.json()["error"]
        assert answer.status_code == 400 and error["param"] == param, (body, answer.text)
        assert error["type"] == "invalid_request_error" and error["code"] == "validation_error"
    assert (
        "only 0 is supported: this service applies no penalties"
        in post("completions", {"prompt": "Hi", "frequency_penalty": 0.5}).json()["error"]["message"]
    )
    assert "at most 64 prompts" in post("completions", {"prompt": ["x"] * 65}).json()["error"]["message"]


class LoseFirstResponse(httpx2.BaseTransport):
    """Delivers each request, but the first response is lost on the way back (a timeout)."""

    def __init__(self, transport: httpx2.BaseTransport):
        self.transport, self.calls = transport, []

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response = self.transport.handle_request(request)
        self.calls.append(request.headers.get("x-stainless-retry-count"))
        if len(self.calls) == 1:
            response.read()
            raise httpx2.ReadTimeout("response lost", request=request)
        return response


def test_a_create_the_client_retries_makes_one_job(ai, client):
    training_file = ai.files.create(file=("t.jsonl", chat_jsonl()), purpose="fine-tune").id
    lossy = LoseFirstResponse(client._transport)
    with httpx2.Client(transport=lossy, base_url=client.base_url) as http:
        retrying = openai_client(client, http_client=http, max_retries=2)
        job = retrying.fine_tuning.jobs.create(model=str(DEMO_MODEL), training_file=training_file)
    assert lossy.calls == ["0", "1"]  # the client sent it twice
    assert [j.id for j in ai.fine_tuning.jobs.list()] == [job.id]
    # a deliberate second submission (a new request, not a retry) is a second job
    assert ai.fine_tuning.jobs.create(model=str(DEMO_MODEL), training_file=training_file).id != job.id


# --- live: a server and a real worker ---------------------------------------------------------
# lm-evaluation-harness's multiple-choice task from a local JSONL file (tests/data/lm_eval), on
# its first LM_EVAL_ITEMS stories
LM_EVAL_TASKS = REPO / "tests" / "data" / "lm_eval"
LM_EVAL_ITEMS = 20


def lm_eval_choices(model, model_args: dict | None = None) -> list[float]:
    """lm-evaluation-harness's `stories_choice` with `model` (a registered name with its model
    args, or a model object): for each item, 1.0 where it chose right. The harness's own entry
    point, as its CLI calls it, without the CLI's indexing of its thousands of built-in tasks
    (~15 s of a CPU)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(LM_EVAL_TASKS), include_defaults=False)
    with contextlib.chdir(REPO):  # the task names its data file from the repository's root
        results = lm_eval.simple_evaluate(
            model=model,
            model_args=model_args,
            tasks=["stories_choice"],
            task_manager=tasks,
            limit=LM_EVAL_ITEMS,
            log_samples=True,
            batch_size=LM_EVAL_ITEMS,
        )
    assert results is not None
    done = sorted(results["samples"]["stories_choice"], key=lambda sample: sample["doc_id"])
    return [sample["acc"] for sample in done]


def lm_eval_through_the_service(client: httpx.Client, model: str) -> list[float]:
    """`lm_eval --model local-completions` against the live service, as its docs say (the key in
    OPENAI_API_KEY; prompts as token ids of the base's own tokenizer, 20 to a request)."""
    key = client.headers["Authorization"].removeprefix("Bearer ")
    with mock.patch.dict(os.environ, {"OPENAI_API_KEY": key}):
        return lm_eval_choices(
            "local-completions",
            {
                "base_url": f"{client.base_url}/v1/completions",
                "model": model,
                "tokenizer": str(DEMO_MODEL),
                "tokenizer_backend": "huggingface",
                "tokenized_requests": True,
            },
        )


def lm_eval_with_hf(client: httpx.Client, job_id: str, folder: Path) -> list[float]:
    """The harness's `hf` model on the job's downloaded adapter and its base, loaded in 4-bit as
    the sampler loads it (transformers 5 no longer takes the `load_in_4bit` the harness passes,
    so the model is built here and handed to the harness's HFLM)."""
    from lm_eval.models.huggingface import HFLM
    from peft import PeftModel

    from app.spec import JobSpec
    from worker.sampling import sampling_dtype
    from worker.training.model import load_quantized_model, load_tokenizer

    archive = zipfile.ZipFile(io.BytesIO(client.get(f"/jobs/{job_id}/adapter").content))
    archive.extractall(folder)
    [adapter] = {path.parent for path in folder.rglob("adapter_config.json")}
    spec = JobSpec.model_validate(client.get(f"/jobs/{job_id}").json()["spec"])
    base = load_quantized_model(spec, sampling_dtype(spec, "cpu"), "cpu")
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    return lm_eval_choices(
        HFLM(pretrained=model, tokenizer=load_tokenizer(spec.base_model), batch_size=LM_EVAL_ITEMS)
    )


def wait_status(ai: OpenAI, job_id: str, statuses: set[str], timeout: float = 240):
    deadline = time.monotonic() + timeout
    while (job := ai.fine_tuning.jobs.retrieve(job_id)).status not in statuses:
        assert time.monotonic() < deadline, f"{job_id} still {job.status}"
        time.sleep(0.3)
    return job


@sqlite_only
@pytest.mark.e2e
@pytest.mark.usefixtures("demo_model")
def test_the_official_client_trains_pauses_resumes_and_cancels_jobs(redis_env, tmp_path):
    with running_service(redis_env, tmp_path) as client, finetune_process("sampler", redis_env, tmp_path):
        ai = openai_client(client)
        training_file = ai.files.create(file=("adder.jsonl", chat_jsonl()), purpose="fine-tune")
        create = {"model": str(DEMO_MODEL), "training_file": training_file.id, "suffix": "adder"}
        trained = ai.fine_tuning.jobs.create(
            **create, hyperparameters={"batch_size": 4}, extra_body=job_options(max_steps=6, save_steps=3)
        )
        paused = ai.fine_tuning.jobs.create(**create, extra_body=job_options(max_steps=20, save_steps=100))
        cancelled = ai.fine_tuning.jobs.create(**create, extra_body=job_options(max_steps=6))
        assert ai.fine_tuning.jobs.cancel(cancelled.id).status == "cancelled"  # while queued

        # while the first trains: a malformed file, and each error class, from the live server
        broken = ai.files.create(file=("broken.jsonl", b'{"messages": []}\n{oops\n'), purpose="fine-tune")
        assert broken.status == "error" and "line 2: invalid JSON" in broken.status_details
        with pytest.raises(openai.BadRequestError) as refused:
            ai.fine_tuning.jobs.create(model=str(DEMO_MODEL), training_file=broken.id)
        assert refused.value.param == "training_file"
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=f"{client.base_url}/v1", api_key="key_0.wrong").fine_tuning.jobs.list()
        with pytest.raises(openai.NotFoundError):
            ai.fine_tuning.jobs.retrieve("job_" + "0" * 24)

        # one worker: the first job trains to the end
        done = wait_status(ai, trained.id, {"succeeded", "failed"})
        assert done.status == "succeeded", done.error
        assert done.fine_tuned_model == f"ft:tiny-phi2:alice:adder:{trained.id}"
        assert done.finished_at >= done.created_at and done.trained_tokens > 0
        table = list(csv.DictReader(io.StringIO(ai.files.content(done.result_files[0]).text)))
        assert [int(row["step"]) for row in table] == [1, 2, 3, 4, 5, 6]

        events = ai.fine_tuning.jobs.list_events(trained.id, limit=100).data
        times = [e.created_at for e in events]
        assert times == sorted(times, reverse=True)  # newest first
        metrics = [e for e in events if e.type == "metrics"]
        assert [e.data["step"] for e in metrics] == [6, 5, 4, 3, 2, 1]
        assert all(e.data["train_loss"] > 0 and e.data["total_steps"] == 6 for e in metrics)
        messages = [e.message for e in events if e.type == "message"]
        assert messages[-1] == "job created" and messages[0].startswith("finished")
        page = ai.fine_tuning.jobs.list_events(trained.id, limit=3)
        after = ai.fine_tuning.jobs.list_events(trained.id, limit=3, after=page.data[-1].id)
        assert [e.id for e in page.data + after.data] == [e.id for e in events[:6]]

        checkpoints = ai.fine_tuning.jobs.checkpoints.list(trained.id).data
        assert [c.step_number for c in checkpoints] == [6, 3]
        for checkpoint in checkpoints:
            assert (
                checkpoint.fine_tuned_model_checkpoint
                == f"{done.fine_tuned_model}:ckpt-step-{checkpoint.step_number}"
            )
            assert checkpoint.metrics.train_loss > 0 and checkpoint.fine_tuning_job_id == trained.id
            download = client.get(checkpoint.download_url)  # the service's own checkpoint download
            assert hashlib.sha256(download.content).hexdigest() == checkpoint.sha256
            assert f"checkpoint-{checkpoint.step_number}/adapter_model.safetensors" in (
                zipfile.ZipFile(io.BytesIO(download.content)).namelist()
            )
        with pytest.raises(openai.BadRequestError):
            ai.fine_tuning.jobs.pause(trained.id)  # it has ended

        # from files.create to calling what it trained, with the client alone (issue 16)
        reply = ai.chat.completions.create(
            model=done.fine_tuned_model,
            messages=[{"role": "user", "content": "What is 2 plus 3?"}],
            max_tokens=8,
            temperature=0,
        )
        assert reply.choices[0].message.role == "assistant" and reply.usage is not None
        assert reply.usage.completion_tokens > 0 and reply.choices[0].finish_reason in ("stop", "length")

        # the second pauses mid-run with a checkpoint, then resumes from it to the end
        wait_for_step(client, paused.id, 1)
        assert ai.fine_tuning.jobs.pause(paused.id).status in ("running", "paused")
        stopped = wait_status(ai, paused.id, {"paused", "succeeded", "failed"})
        assert stopped.status == "paused" and stopped.finished_at is None
        [saved] = ai.fine_tuning.jobs.checkpoints.list(paused.id).data
        assert 0 < saved.step_number < 20
        with pytest.raises(openai.BadRequestError):
            ai.fine_tuning.jobs.pause(paused.id)
        assert ai.fine_tuning.jobs.resume(paused.id).status == "queued"
        resumed = wait_status(ai, paused.id, {"succeeded", "failed"})
        assert resumed.status == "succeeded", resumed.error
        steps = [
            e.data["step"]
            for e in ai.fine_tuning.jobs.list_events(paused.id, limit=100)
            if e.type == "metrics"
        ]
        assert sorted(steps) == list(range(1, 21))  # one row per step across the pause
        messages = [
            e.message for e in ai.fine_tuning.jobs.list_events(paused.id, limit=100) if e.type == "message"
        ]
        assert f"paused at step {saved.step_number}; checkpoint-{saved.step_number} saved" in messages
        assert f"resume: resuming from checkpoint-{saved.step_number}" in messages

        listed = ai.fine_tuning.jobs.list(limit=2)
        assert [j.id for j in listed.data] == [cancelled.id, paused.id] and listed.has_more
        assert [j.status for j in ai.fine_tuning.jobs.list(after=paused.id).data] == ["succeeded"]
        assert ai.fine_tuning.jobs.retrieve(cancelled.id).status == "cancelled"

        # preference tuning: a DPO job on an uploaded preference file, and one that continues from
        # the first job's fine-tuned model (its adapter, kept frozen as the reference)
        preferences = ai.files.create(file=("prefs.jsonl", preference_jsonl()), purpose="fine-tune")
        assert preferences.status == "processed"
        dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": "auto", "batch_size": 4}}}
        options = job_options(max_steps=3, save_steps=3)
        fresh = ai.fine_tuning.jobs.create(
            model=str(DEMO_MODEL), training_file=preferences.id, method=dpo, extra_body=options
        )
        options["training"].pop("batch_size")  # the continued job's batch comes from method.dpo
        continued = ai.fine_tuning.jobs.create(
            model=done.fine_tuned_model, training_file=preferences.id, method=dpo, extra_body=options
        )
        assert continued.method.type == "dpo" and continued.method.dpo.hyperparameters.beta == 0.1
        for job_id in (fresh.id, continued.id):
            finished = wait_status(ai, job_id, {"succeeded", "failed"})
            assert finished.status == "succeeded", finished.error
            figures = [
                e.data for e in ai.fine_tuning.jobs.list_events(job_id, limit=100) if e.type == "metrics"
            ]
            assert len(figures) == 3 and all(
                "rewards/accuracies" in f and "rewards/margins" in f for f in figures
            )
            messages = [e.message for e in ai.fine_tuning.jobs.list_events(job_id, limit=100)]
            assert "data ready: 8 preference pairs, 0 validation pairs" in messages
            reply = ai.chat.completions.create(
                model=finished.fine_tuned_model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
            )
            assert reply.usage is not None and reply.usage.completion_tokens > 0
        assert f"training continues from {trained.id} (adapter)" in [
            e.message for e in ai.fine_tuning.jobs.list_events(continued.id, limit=100)
        ]
        exports = {
            job_id: client.post(f"/jobs/{job_id}/exports", json={"format": "merged"})
            for job_id in (fresh.id, continued.id)
        }
        deadline = time.monotonic() + 180
        for job_id, export in exports.items():
            assert export.status_code == 202, export.text
            while (made := client.get(f"/jobs/{job_id}/exports/{export.json()['id']}").json())[
                "status"
            ] not in ("succeeded", "failed"):
                assert time.monotonic() < deadline
                time.sleep(0.3)
            assert made["status"] == "succeeded", made

        # issue 28: LangChain's completions class, and lm-evaluation-harness scoring the first
        # job's model through /v1/completions as it scores the adapter on the base itself
        from langchain_openai import OpenAI as LangChainOpenAI

        llm = LangChainOpenAI(
            base_url=f"{client.base_url}/v1", api_key=ai.api_key, model=done.fine_tuned_model, max_tokens=6
        )
        assert isinstance(llm.invoke("Human: What is 2 plus 3?\nAssistant:"), str)
        started = time.monotonic()
        served = lm_eval_through_the_service(client, done.fine_tuned_model)
        harness_s = time.monotonic() - started
        started = time.monotonic()
        local = lm_eval_with_hf(client, trained.id, tmp_path / "adapter")
        print(
            f"FIGURE lm-eval stories_choice, {LM_EVAL_ITEMS} items: local-completions {sum(served):g} right "
            f"({harness_s:.1f} s), hf {sum(local):g} right ({time.monotonic() - started:.1f} s); "
            f"{sum(a != b for a, b in zip(served, local, strict=True))} items differ"
        )
        assert len(served) == len(local) == LM_EVAL_ITEMS and abs(sum(served) - sum(local)) <= 1


def test_links_are_absolute_so_the_clients_v1_base_url_does_not_break_them(ai, client, monkeypatch):
    """Issue 16: `/jobs/…` joined to the client's `…/v1` base was a 404; behind a proxy,
    FINETUNE_PUBLIC_URL is the address clients know."""
    from tests.conftest import TEST_OWNER, reset_caches
    from tests.test_auth import finished_job

    job_id = finished_job(TEST_OWNER)
    checkpoint = ai.fine_tuning.jobs.checkpoints.list(job_id).data[0]
    adapter_url = ai.fine_tuning.jobs.retrieve(job_id).model_extra["adapter_url"]
    assert (
        checkpoint.model_extra["download_url"]
        == f"http://testserver/jobs/{job_id}/checkpoints/checkpoint-10/download"
    )
    assert adapter_url == f"http://testserver/jobs/{job_id}/adapter"
    assert (
        client.get(adapter_url).status_code
        == client.get(checkpoint.model_extra["download_url"]).status_code
        == 200
    )

    monkeypatch.setenv("FINETUNE_PUBLIC_URL", "https://ft.example.com/api/")
    reset_caches()
    assert ai.fine_tuning.jobs.retrieve(job_id).model_extra["adapter_url"] == (
        f"https://ft.example.com/api/jobs/{job_id}/adapter"
    )
