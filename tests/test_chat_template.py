"""`dataset.template: chat_template`: conversations written out by the base tokenizer's own chat
template, on a real SentencePiece tokenizer (stories260K's) given a ChatML template, as instruct
bases (Qwen2, …) ship one."""

from __future__ import annotations

import json
import shutil

import pytest

from app.conversations import Turn
from tests.conftest import REPO, local_models, sqlite_only

STORIES = REPO / "examples" / "stories260K"
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You tell short stories."},
    {"role": "user", "content": "Tell me about a cat."},
    {"role": "assistant", "content": "Once upon a time, there was a cat."},
    {"role": "user", "content": "And then?"},
]
REPLY = "It slept in the sun."


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(STORIES)
    loaded.chat_template = CHATML
    return loaded


def turns(weight_of_first_reply: bool = True) -> list[Turn]:
    from worker.sampling import conversation

    head = conversation(MESSAGES)
    head[2] = Turn(head[2].speaker, head[2].text, weight_of_first_reply)
    return [*head, Turn("Assistant", REPLY, True)]


def test_a_sample_is_the_templates_text_and_only_replies_carry_loss(tokenizer):
    from worker.training.data import IGNORE_INDEX, prompt_ids, tokenize_conversation

    sample, _ = tokenize_conversation(turns(), tokenizer, 4096, "assistant", "chat_template")
    full = [*MESSAGES, {"role": "assistant", "content": REPLY}]
    assert tokenizer.decode(sample.input_ids) == tokenizer.apply_chat_template(full, tokenize=False)

    def trained_spans(labels: list[int]) -> list[str]:
        spans, current = [], []
        for token, label in zip(sample.input_ids, labels, strict=True):
            if label != IGNORE_INDEX:
                current.append(token)
            elif current:
                spans, current = [*spans, current], []
        return [tokenizer.decode(span) for span in [*spans, current] if span]

    # each reply with the template's end of turn, so the model learns where a reply stops
    assert trained_spans(sample.labels) == [
        "Once upon a time, there was a cat.<|im_end|>\n",
        f"{REPLY}<|im_end|>\n",
    ]
    weightless, _ = tokenize_conversation(turns(False), tokenizer, 4096, "assistant", "chat_template")
    assert weightless.input_ids == sample.input_ids
    assert [label != IGNORE_INDEX for label in weightless.labels].count(True) < [
        label != IGNORE_INDEX for label in sample.labels
    ].count(True)

    from worker.sampling import conversation

    sampled = prompt_ids(conversation(MESSAGES), tokenizer, "chat_template")
    assert sample.input_ids[: len(sampled)] == sampled  # the sampled prompt is the sample's start
    assert tokenizer.decode(sampled) == tokenizer.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    )


def test_templates_that_cant_be_used_are_refused_with_the_reason(tokenizer):
    from transformers import AutoTokenizer

    from worker.training.chat_template import TemplateUnusable
    from worker.training.data import tokenize_conversation

    plain = AutoTokenizer.from_pretrained(STORIES)
    with pytest.raises(
        TemplateUnusable, match="tokenizer has no chat template; use template human_assistant"
    ):
        tokenize_conversation(turns(), plain, 4096, "assistant", "chat_template")

    # a template that marks the last message differently: a conversation is no prefix of its continuation
    plain.chat_template = CHATML.replace(
        "<|im_end|>", "{% if loop.last %}<|last|>{% else %}<|im_end|>{% endif %}"
    )
    with pytest.raises(TemplateUnusable, match="not a prefix of its continuation"):
        tokenize_conversation(turns(), plain, 4096, "assistant", "chat_template")

    plain.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(
        TemplateUnusable, match="refused this conversation: Conversation roles must alternate"
    ):
        tokenize_conversation(turns(), plain, 4096, "assistant", "chat_template")


@sqlite_only
def test_a_local_base_without_a_chat_template_is_refused_at_submission(client, service_env):
    folder = local_models(service_env) / "stories"
    shutil.copytree(STORIES, folder)
    spec = {"base_model": str(folder), "dataset": {"template": "chat_template"}}

    refused = client.post("/jobs", json=spec)
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["field"] == "dataset.template"

    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    assert client.post("/jobs", json=spec).status_code == 201
