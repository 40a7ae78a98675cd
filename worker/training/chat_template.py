"""`dataset.template: chat_template`: a conversation rendered by the base tokenizer's own chat
template (`apply_chat_template`), cut into segments so that only the Assistant's replies carry
loss and a sampled prompt is a trained sample's beginning, token for token.

Each segment is what rendering one more message (or the generation prompt) adds to the text
rendered so far. That needs a template that renders a conversation as a prefix of its
continuations, as chat templates are written to; one that doesn't (it rewrites earlier turns,
or marks the last one differently) is refused with that reason."""

from __future__ import annotations

from app.conversations import ASSISTANT, HUMAN, SYSTEM, TEXT, Turn

ROLES = {HUMAN: "user", ASSISTANT: "assistant", SYSTEM: "system"}


class TemplateUnusable(ValueError):
    """The tokenizer has no chat template, or it can't render these turns in segments."""


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    if not messages and not generation_prompt:
        return ""
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:  # jinja's TemplateError: e.g. roles that must alternate, no system role
        raise TemplateUnusable(f"the base's chat template refused this conversation: {exc}") from exc


def chat_template_segments(turns: list[Turn], tokenizer, generation_prompt: bool) -> list[tuple[str, bool]]:
    """(segment, carries_loss) pieces of the conversation's rendered text; the Assistant's
    replies carry loss where their turn trains. `generation_prompt`: end with what the template
    puts before a reply (a sampled prompt's end)."""
    if not has_chat_template(tokenizer):
        raise TemplateUnusable(
            "dataset.template is chat_template but the base's tokenizer has no chat template; "
            "use template human_assistant"
        )
    if any(turn.speaker == TEXT for turn in turns):
        raise TemplateUnusable("plain text records have no turns to render with a chat template")
    messages: list[dict[str, str]] = []
    rendered = ""
    segments: list[tuple[str, bool]] = []

    def add(text: str, carries_loss: bool) -> None:
        nonlocal rendered
        if not text.startswith(rendered):
            raise TemplateUnusable(
                "the base's chat template renders a conversation differently once it continues "
                "(it is not a prefix of its continuation); use template human_assistant"
            )
        if len(text) > len(rendered):
            segments.append((text[len(rendered) :], carries_loss))
        rendered = text

    for turn in turns:
        if turn.speaker == ASSISTANT:
            add(_render(tokenizer, messages, generation_prompt=True), False)
        messages.append({"role": ROLES[turn.speaker], "content": turn.text})
        add(_render(tokenizer, messages, generation_prompt=False), turn.speaker == ASSISTANT and turn.train)
    if generation_prompt:
        add(_render(tokenizer, messages, generation_prompt=True), False)
    return segments
