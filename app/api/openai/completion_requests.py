"""The bodies of `/v1/chat/completions` and `/v1/completions`. Every parameter OpenAI defines is
taken: what the sampler does (sampling, stop strings, seeds, log-probabilities, echo, several
prompts), and the rest at its neutral value only, the one that changes nothing (`n: 1`,
`frequency_penalty: 0`, `tools: []`, `response_format: {"type": "text"}`, …). Any other value is
a 400 naming the parameter: silently ignoring it would answer something else. `null` is a
parameter's default, as in OpenAI's API. An unknown parameter is a 400 too."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, cast

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from app.services.samples import Prompt

# Without max_tokens (or max_completion_tokens), a chat answer ends after this many tokens; a
# text completion after LEGACY_MAX_TOKENS, OpenAI's default there.
DEFAULT_MAX_TOKENS = 256
LEGACY_MAX_TOKENS = 16
MAX_TOKENS = 2048
MAX_PROMPTS = 64  # prompts in one /v1/completions request, each answered as its own sample
MAX_PROMPT_CHARS = 32_000
MAX_PROMPT_IDS = 32_000
MAX_TOKEN_ID = 2**31 - 1  # the model's vocabulary bounds it further (the sampler says so)
LEGACY_TOP_LOGPROBS = 5  # OpenAI's bounds: `logprobs` of /v1/completions, `top_logprobs` of chat
CHAT_TOP_LOGPROBS = 20


def only(*neutral: Any, why: str) -> AfterValidator:
    """A parameter taken at a value that changes nothing here; another is refused, saying `why`."""
    shown = " or ".join(json.dumps(value) for value in neutral)

    def check(value: Any) -> Any:
        if not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral):
            raise PydanticCustomError("unsupported_value", f"only {shown} is supported: {why}")
        return value

    return AfterValidator(check)


NO_PENALTIES = "this service applies no penalties"
NO_TOOLS = "this service calls no tools"
Penalty = Annotated[float, only(0, why=NO_PENALTIES)]
LogitBias = Annotated[
    dict[str, float], Field(max_length=300), only({}, why="this service applies no logit bias")
]
OneChoice = Annotated[int, only(1, why="one choice per prompt (send several prompts for several)")]
TextFormat = Annotated[dict[str, Any], only({"type": "text"}, why="answers are plain text")]


def _refused(why: str) -> BeforeValidator:
    """A parameter whose only neutral value is null (sent as null, it is never validated)."""

    def refuse(value: Any) -> Any:
        raise PydanticCustomError("unsupported_value", f"not supported: {why}")

    return BeforeValidator(refuse)


StopText = Annotated[str, Field(min_length=1, max_length=64)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str = Field(max_length=32_000)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Field(max_length=32_000)] | Annotated[list[TextPart], Field(max_length=64)]
    name: str | None = Field(None, max_length=64)

    def as_turn(self) -> dict[str, str]:
        """As the sampler renders it: a developer message is a system one; text parts joined."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """What both completion routes take."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        max_length=512, description="A fine-tuned model's or checkpoint's id (GET /v1/models)."
    )
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(1.0, ge=0, le=2, description="0 answers greedily.")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = Field(
        None, description="Up to 4 strings; the answer ends before the first."
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="The same seed, the same answer.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    n: OneChoice = 1
    frequency_penalty: Penalty = 0
    presence_penalty: Penalty = 0
    logit_bias: LogitBias | None = None
    response_format: TextFormat | None = Field(None, description='Only {"type": "text"}.')

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """A parameter sent as null has its default (an unknown one is still refused)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data

    def as_prompt(self, max_new_tokens: int, **what: Any) -> Prompt:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return Prompt(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=stop or None,
            seed=self.seed,
            **what,
        )


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool = Field(False, description="Each answer token's log-probability.")
    top_logprobs: int | None = Field(
        None, ge=0, le=CHAT_TOP_LOGPROBS, description="With logprobs: the likeliest tokens at each place."
    )
    # at their neutral values only
    audio: Annotated[Any, _refused("answers are text")] = None
    function_call: Annotated[str, Field(max_length=64), only("none", why=NO_TOOLS)] | None = None
    functions: Annotated[list[Any], Field(max_length=128), only([], why=NO_TOOLS)] | None = None
    tools: Annotated[list[Any], Field(max_length=128), only([], why=NO_TOOLS)] | None = None
    tool_choice: Annotated[str, Field(max_length=64), only("none", why=NO_TOOLS)] | None = None
    parallel_tool_calls: bool | None = Field(None, description="No effect: there are no tools.")
    metadata: (
        Annotated[
            dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
            Field(max_length=16),
            only({}, why="completions are not stored"),
        ]
        | None
    ) = None
    store: Annotated[bool, only(False, why="completions are not stored")] | None = None
    modalities: (
        Annotated[
            list[Annotated[str, Field(max_length=16)]],
            Field(max_length=4),
            only(["text"], why="answers are text"),
        ]
        | None
    ) = None
    moderation: Annotated[Any, _refused("this service moderates nothing")] = None
    prediction: Annotated[Any, _refused("predicted outputs are not used")] = None
    reasoning_effort: (
        Annotated[str, Field(max_length=16), only("none", why="the models don't reason first")] | None
    ) = None
    verbosity: (
        Annotated[
            str, Field(max_length=16), only("medium", why="answers are as long as the model makes them")
        ]
        | None
    ) = None
    service_tier: Literal["auto", "default"] | None = None
    web_search_options: Annotated[Any, _refused("this service searches nothing")] = None
    # hints about OpenAI's own caching and abuse tracking: they don't change an answer
    prompt_cache_key: str | None = Field(None, max_length=1024)
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    safety_identifier: str | None = Field(None, max_length=256)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise PydanticCustomError("logprobs_needed", "needs logprobs: true")
        return value

    def prompts(self) -> list[Prompt]:
        max_new_tokens = self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS
        top = (self.top_logprobs or 0) if self.logprobs else None
        return [
            self.as_prompt(max_new_tokens, messages=[m.as_turn() for m in self.messages], top_logprobs=top)
        ]


def _prompt_shape(value: Any) -> Any:
    """`prompt` as OpenAI takes it: a string, a list of strings, a list of token ids, or a list
    of lists of token ids; at most MAX_PROMPTS prompts, none empty."""

    def is_id(item: Any) -> bool:
        return isinstance(item, int) and not isinstance(item, bool)

    def refuse(message: str) -> PydanticCustomError:
        return PydanticCustomError("prompt_invalid", message)

    if isinstance(value, str) or (isinstance(value, list) and value and all(is_id(i) for i in value)):
        prompts: list[Any] = [value]
    elif isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        prompts = value
    elif isinstance(value, list) and value and all(isinstance(p, list) for p in value):
        prompts = value
    else:
        raise refuse(
            "a string, a list of strings, a list of token ids or a list of lists of token ids, not empty"
        )
    if len(prompts) > MAX_PROMPTS:
        raise refuse(f"at most {MAX_PROMPTS} prompts in one request, not {len(prompts)}")
    for n, one in enumerate(prompts):
        where = f"prompt {n}" if len(prompts) > 1 else "the prompt"
        if isinstance(one, str):
            if not 0 < len(one) <= MAX_PROMPT_CHARS:
                raise refuse(f"{where} has {len(one)} characters (1 to {MAX_PROMPT_CHARS})")
            continue
        if not 0 < len(one) <= MAX_PROMPT_IDS:
            raise refuse(f"{where} has {len(one)} token ids (1 to {MAX_PROMPT_IDS})")
        for item in one:
            if not is_id(item) or not 0 <= item <= MAX_TOKEN_ID:
                raise refuse(f"{where}: {item!r} is not a token id (an integer from 0 to {MAX_TOKEN_ID})")
    return value


# The shapes `_prompt_shape` checks, with their bounds in the API's schema too.
PromptText = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
PromptIds = Annotated[list[int], Field(max_length=MAX_PROMPT_IDS)]


class CompletionRequest(SamplingRequest):
    prompt: Annotated[  # type: ignore[assignment]
        PromptText
        | Annotated[list[PromptText], Field(max_length=MAX_PROMPTS)]
        | PromptIds
        | Annotated[list[PromptIds], Field(max_length=MAX_PROMPTS)],
        BeforeValidator(_prompt_shape),
    ] = Field(
        description=(
            "Continued as it is (no chat format): a text, a list of texts, a list of token ids "
            f"(not re-tokenized) or a list of such lists; several (up to {MAX_PROMPTS}) are answered "
            "one choice each, in order."
        )
    )
    max_tokens: int | None = Field(
        LEGACY_MAX_TOKENS, ge=0, le=MAX_TOKENS, description="0, with echo: the prompt's tokens alone."
    )
    echo: bool = Field(False, description="The prompt first: in the text, and its tokens in logprobs.")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=LEGACY_TOP_LOGPROBS,
        description="Each token's log-probability, and this many likeliest tokens at each place.",
    )
    # at their neutral values only
    best_of: OneChoice = 1
    suffix: (
        Annotated[str, Field(max_length=MAX_PROMPT_CHARS), only("", why="this service doesn't insert text")]
        | None
    ) = None

    def given(self) -> list[str | list[int]]:
        """The prompts, one or several, each a text or token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [cast(str | list[int], self.prompt)]
        return cast(list[str | list[int]], self.prompt)

    def prompts(self) -> list[Prompt]:
        max_new_tokens = LEGACY_MAX_TOKENS if self.max_tokens is None else self.max_tokens
        return [
            self.as_prompt(
                max_new_tokens,
                messages=None,
                text=prompt if isinstance(prompt, str) else None,
                ids=None if isinstance(prompt, str) else prompt,
                echo=self.echo,
                top_logprobs=self.logprobs,
            )
            for prompt in self.given()
        ]
