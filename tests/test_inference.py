"""Calling what a job trained (issue 16): `/v1/models`, `/v1/chat/completions` and
`/v1/completions` with the official `openai` client, answered by the sampler's real code on the
tiny model in 4-bit. The sampler runs in a thread of the test process instead of its own
process (its queue is the one part left out); the e2e deployment test calls it for real."""

from __future__ import annotations

import threading

import openai
import pytest
import torch

from app.db import session_scope
from app.models import Sample
from app.services import jobs
from tests.conftest import TEST_OWNER, bearer, sqlite_only
from tests.test_auth import finished_job
from tests.test_openai_api import openai_client
from tests.test_training import quick_spec
from worker.tasks import execute_job

pytestmark = [pytest.mark.usefixtures("demo_model"), sqlite_only]


@pytest.fixture
def sampler(monkeypatch):
    """Samples are answered at once by worker.sampling.answer, in a thread, as `finetune
    sampler` answers what its queue delivers."""
    from app.services import samples
    from worker import sampling

    threads = []

    def answer_now(sample_id: str) -> None:
        thread = threading.Thread(target=sampling.answer, args=(sample_id,))
        thread.start()
        threads.append(thread)

    monkeypatch.setattr(samples, "enqueue_sample", answer_now)
    monkeypatch.setenv("FINETUNE_SAMPLER_KEEP_MODEL", "true")
    yield sampling
    for thread in threads:
        thread.join()
    sampling.release_model()


@pytest.fixture
def trained(client):
    """A job of TEST_OWNER's that succeeded, with checkpoints at steps 2 and 4."""
    job = jobs.create_job(quick_spec(max_steps=4), TEST_OWNER)
    execute_job(job.id)
    done = client.get(f"/v1/fine_tuning/jobs/{job.id}").json()
    assert done["status"] == "succeeded", done
    return done


@pytest.mark.slow
def test_a_fine_tuned_model_is_listed_and_answers_as_the_native_generate_does(client, sampler, trained):
    ai = openai_client(client, http_client=client, max_retries=0)
    model = trained["fine_tuned_model"]
    listed = [m.id for m in ai.models.list()]
    assert listed == [model, f"{model}:ckpt-step-4", f"{model}:ckpt-step-2", trained["model"]]
    assert ai.models.retrieve(model).owned_by == TEST_OWNER

    options = {"temperature": 0.9, "seed": 7}
    native = client.post(
        f"/jobs/{trained['id']}/generate", json={"prompt": "Hi", "max_new_tokens": 8, **options}
    ).json()
    chat = ai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, **options
    )
    assert native["status"] == "succeeded" and native["completion"]
    assert chat.choices[0].message.content == native["completion"]
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.object == "chat.completion"
    usage = chat.usage
    assert usage is not None and usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    # streamed: the same answer in pieces, its finish reason, then the usage asked for
    chunks = list(
        ai.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            **options,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == usage

    # a raw completion, cut before a stop string
    whole = ai.completions.create(model=model, prompt="Human: Hi\nAssistant:", max_tokens=12, temperature=0)
    text = whole.choices[0].text
    cut_at = next((text[i : i + 2] for i in range(1, len(text) - 1) if text[i : i + 2].strip()), None)
    assert cut_at is not None, text
    stopped = ai.completions.create(
        model=model, prompt="Human: Hi\nAssistant:", max_tokens=12, temperature=0, stop=[cut_at]
    )
    assert stopped.choices[0].text == text[: text.index(cut_at)]
    assert stopped.choices[0].finish_reason == "stop"

    # log-likelihoods of given text, as lm-evaluation-harness asks: echoed, nothing generated;
    # token ids (several prompts in one request: one choice each, in order) score as the text does
    from worker.training.model import load_tokenizer

    given = "Human: Hi\nAssistant: Hello there"
    ids = load_tokenizer(quick_spec().base_model)(given)["input_ids"]
    asked = {"model": model, "echo": True, "logprobs": 2, "max_tokens": 0, "temperature": 0}
    by_text = ai.completions.create(prompt=given, **asked).choices[0]
    scored = ai.completions.create(prompt=[ids, ids[:3]], **asked)
    by_ids, shorter = scored.choices
    assert [c.index for c in scored.choices] == [0, 1] and by_text.text == by_ids.text == given
    assert (scored.usage.prompt_tokens, scored.usage.completion_tokens) == (len(ids) + 3, 0)
    assert by_text.finish_reason == "length" and len(shorter.logprobs.tokens) == 3
    legacy = by_text.logprobs
    assert legacy.token_logprobs[0] is None and legacy.top_logprobs[0] is None
    assert legacy.token_logprobs[1:] == pytest.approx(by_ids.logprobs.token_logprobs[1:], abs=1e-5)
    assert shorter.logprobs.token_logprobs[1:] == pytest.approx(legacy.token_logprobs[1:3], abs=1e-5)
    assert len(legacy.tokens) == len(ids) and "".join(legacy.tokens) == given
    assert all(given[o:].startswith(t) for o, t in zip(legacy.text_offset, legacy.tokens, strict=True))
    places = zip(legacy.tokens[1:], legacy.token_logprobs[1:], legacy.top_logprobs[1:], strict=True)
    for token, logprob, top in places:
        assert 2 <= len(top) <= 3 and top[token] == logprob  # the 2 likeliest, and the token itself
        assert max(top.values()) >= logprob

    # a chat reply's logprobs, with the 2 likeliest tokens at each place; streamed, all at its end
    reply = ai.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = reply.choices[0].logprobs.content
    assert 0 < len(content) <= reply.usage.completion_tokens
    for place in content:
        assert [t.token for t in place.top_logprobs][0] == place.token  # greedy: the likeliest
        assert len(place.top_logprobs) == 2 and place.bytes == list(place.token.encode())
    chunks = list(
        ai.completions.create(model=model, prompt=given, max_tokens=3, temperature=0, logprobs=0, stream=True)
    )
    finished = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finished[0].logprobs.tokens) == 3


@pytest.mark.slow
@pytest.mark.parametrize(("bias", "switching_loads", "base_loads"), [("none", 1, 0), ("all", 4, 1)])
def test_adapters_of_one_base_share_it_and_switching_keeps_answers(
    client, sampler, monkeypatch, bias, switching_loads, base_loads
):
    """Adapters without trained biases sit side by side on one loaded base, and the base alone
    answers with them switched off; one with biases (the demo's) has a base of its own, loaded
    afresh at each switch."""
    job = jobs.create_job(quick_spec(lora={"bias": bias}, max_steps=2, save_steps=1), TEST_OWNER)
    execute_job(job.id)
    trained = client.get(f"/v1/fine_tuning/jobs/{job.id}").json()
    loads = []
    load = sampler.load_quantized_model
    monkeypatch.setattr(sampler, "load_quantized_model", lambda *a, **k: loads.append(1) or load(*a, **k))
    ai = openai_client(client, http_client=client, max_retries=0)
    final, step_1 = trained["fine_tuned_model"], trained["fine_tuned_model"] + ":ckpt-step-1"

    def complete(model: str) -> str:
        answer = ai.completions.create(
            model=model, prompt="Human: Hello\nAssistant:", max_tokens=6, temperature=0
        )
        assert answer.object == "text_completion" and answer.usage is not None
        return answer.choices[0].text

    first = complete(final)
    other = complete(step_1)
    assert complete(final) == first and complete(step_1) == other
    assert len(loads) == switching_loads and len(sampler.models.adapters) == (2 if bias == "none" else 1)

    # the base model the job trained on, called by its name: no adapter in the answer
    from worker.training.model import load_tokenizer

    spec = quick_spec(lora={"bias": bias})
    asked = Sample(prompt="Human: Hello\nAssistant:", max_new_tokens=6, temperature=0.0, top_p=1.0)
    alone = sampler.generate(load(spec, torch.float32, "cpu"), load_tokenizer(spec.base_model), asked)
    assert complete(trained["model"]) == alone.text
    assert len(loads) == switching_loads + base_loads


@pytest.mark.usefixtures("sampler")
def test_models_are_the_owners_own_and_unknown_options_are_refused(client):
    model = client.get(f"/v1/fine_tuning/jobs/{finished_job(TEST_OWNER)}").json()["fine_tuned_model"]
    stranger = openai_client(client, http_client=client, max_retries=0)
    stranger.api_key = bearer("stranger")["Authorization"].removeprefix("Bearer ")
    assert list(stranger.models.list()) == []
    for call in (
        lambda: stranger.models.retrieve(model),
        lambda: stranger.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}]),
    ):
        with pytest.raises(openai.NotFoundError) as missing:
            call()
        assert missing.value.body["code"] == "model_not_found"

    ai = openai_client(client, http_client=client, max_retries=0)
    for wrong in (
        model.replace(f":{TEST_OWNER}:", ":stranger:"),
        f"{model}:ckpt-step-3",
        "ft:phi:x::job_nope",
    ):
        with pytest.raises(openai.NotFoundError):
            ai.chat.completions.create(model=wrong, messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError) as refused:
        ai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], n=2)
    assert refused.value.body["param"] == "n"
    with session_scope() as session:
        assert session.query(Sample).count() == 0  # nothing refused reached the sampler


@pytest.mark.usefixtures("service_env")
def test_the_sampler_answers_a_172_wide_mlp_where_bitsandbytes_repacks_for_avx512_bf16(monkeypatch):
    """Issue 28 item 4: on a CPU with AVX512-BF16, bitsandbytes repacks each 4-bit layer for its
    bf16 kernel at the first answer, which takes only out-features divisible by 32 and
    in-features divisible by the block: stories260K's MLP (64 -> 172 -> 64) failed ("N must be
    divisible by block_n"). A CPU without the feature is made to take the same path."""
    import bitsandbytes.functional
    import bitsandbytes.nn.modules
    from transformers import AutoConfig

    from app.spec import JobSpec
    from tests.conftest import REPO, demo_spec
    from worker import sampling

    stories = REPO / "examples" / "stories260K"
    assert AutoConfig.from_pretrained(stories).intermediate_size == 172
    if not bitsandbytes.functional.has_avx512bf16():
        monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    spec = JobSpec.model_validate({**demo_spec(), "base_model": str(stories)})
    asked = Sample(prompt="Once upon a time", max_new_tokens=8, temperature=0.0, top_p=1.0)

    model, tokenizer, context = sampling.models.get(spec, None, "cpu")
    try:
        with context:
            answered = sampling.generate(model, tokenizer, asked)
        repacked = {
            name.rpartition(".")[2]: getattr(module.weight.quant_state, "packing_format_for_cpu", False)
            for name, module in model.named_modules()
            if hasattr(module, "support_avx512bf16_for_cpu")
        }
    finally:
        sampling.release_model()

    assert answered.completion_tokens > 0, answered
    # the attention projections (64 and 32 wide) take the bf16 kernel; the MLP keeps the plain path
    assert repacked == {
        **dict.fromkeys(["q_proj", "k_proj", "v_proj", "o_proj"], True),
        **dict.fromkeys(["gate_proj", "up_proj", "down_proj"], False),
    }


@pytest.mark.slow
@pytest.mark.usefixtures("service_env")
def test_logprobs_are_the_models_own_for_an_echoed_prompt_and_the_answer():
    """The sampler's log-probabilities (legacy completions' `logprobs` with `echo`, chat's) on the
    4-bit base with an adapter: each prompt token's is log_softmax of the model's forward pass
    over the tokens before it, each answer token's that of generate()'s own logits; the greedy
    token leads its top alternatives; the tokens join into the text at their offsets."""
    from peft import LoraConfig, get_peft_model

    from worker import sampling
    from worker.logprobs import scored_tokens
    from worker.training.model import load_quantized_model, load_tokenizer

    spec = quick_spec()
    tokenizer = load_tokenizer(spec.base_model)
    base = load_quantized_model(spec, torch.float32, "cpu")
    adapter = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "dense"], init_lora_weights=False)
    model = get_peft_model(base, adapter).eval()
    prompt = "Lily saw Über 日本"  # multi-byte characters span tokens
    ids = tokenizer(prompt)["input_ids"]

    asked = Sample(prompt=prompt, max_new_tokens=3, temperature=0.0, top_p=1.0, echo=True, top_logprobs=3)
    answer = sampling.generate(model, tokenizer, asked)

    entries = answer.logprobs
    assert (
        answer.text.startswith(prompt) and len(entries) == len(ids) + answer.completion_tokens == len(ids) + 3
    )
    assert entries[0]["logprob"] is None and entries[0]["top"] is None  # nothing precedes it
    with torch.inference_mode():
        for j in range(1, len(ids)):
            before = model(input_ids=torch.tensor([ids[:j]])).logits[0, -1]
            expected = torch.log_softmax(before.float(), dim=-1)
            assert entries[j]["logprob"] == pytest.approx(expected[ids[j]].item(), abs=1e-4)
            assert [lp for _, lp in entries[j]["top"]] == pytest.approx(
                expected.topk(3).values.tolist(), abs=1e-4
            )
        generated = model.generate(
            input_ids=torch.tensor([ids]),
            max_new_tokens=3,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
        )
    new_ids = generated.sequences[0, len(ids) :].tolist()
    for step, entry in enumerate(entries[len(ids) :]):
        expected = torch.log_softmax(generated.logits[step][0].float(), dim=-1)
        assert entry["logprob"] == pytest.approx(expected[new_ids[step]].item(), abs=1e-4)
        assert entry["top"][0] == [entry["token"], entry["logprob"]]  # greedy: the likeliest
    assert answer.text == prompt + tokenizer.decode(new_ids, skip_special_tokens=True)
    assert "".join(e["token"] for e in entries) == answer.text
    offsets = [e["offset"] for e in entries]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert all(answer.text[e["offset"] :].startswith(e["token"]) for e in entries)
    assert any(e["token"] == "" for e in entries)  # a token that ends mid-character adds nothing yet

    # token ids as the prompt, scored alone (max_tokens 0): the same numbers, not re-tokenized
    alone = sampling.generate(
        model,
        tokenizer,
        Sample(
            prompt="", prompt_ids=ids, max_new_tokens=0, temperature=0.0, top_p=1.0, echo=True, top_logprobs=0
        ),
    )
    assert (alone.text, alone.completion_tokens, alone.finish_reason) == (prompt, 0, "length")
    assert [e["logprob"] for e in alone.logprobs] == pytest.approx(
        [e["logprob"] for e in entries[: len(ids)]]
    )
    assert all(e["top"] == [] for e in alone.logprobs[1:])
    # without echo, only the answer's tokens; their offsets are in the answer's text
    plain = sampling.generate(
        model, tokenizer, Sample(prompt=prompt, max_new_tokens=2, temperature=0.0, top_p=1.0, top_logprobs=1)
    )
    assert [e["token"] for e in plain.logprobs] == [e["token"] for e in entries[len(ids) : len(ids) + 2]]
    assert plain.logprobs[0]["offset"] == 0 and answer.text.startswith(prompt + plain.text)
    assert (
        scored_tokens(tokenizer, ids, new_ids, torch.cat(generated.logits), 1, kept=0) == []
    )  # cut by a stop
    with pytest.raises(ValueError, match="token id 51200 is not in the model's vocabulary"):
        sampling.generate(
            model, tokenizer, Sample(prompt="", prompt_ids=[1, 51200], max_new_tokens=0, temperature=0.0)
        )
