"""Log-probabilities of given and generated tokens, for the sampler: OpenAI's `logprobs` (with
`echo`, the prompt's too), from the logits the model had at each place: a forward pass over the
prompt, and generate()'s own for the answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# Log-probabilities below this (and -inf) are written as it, as OpenAI does: JSON has no -inf.
LEAST_LOGPROB = -9999.0
# Places whose log-softmax is taken at once (a row is the vocabulary's size).
SCORED_AT_ONCE = 256


@dataclass(frozen=True)
class ReadPrompt:
    logits: torch.Tensor  # [len(prompt) - 1, vocabulary]: row i is what follows prompt[: i + 1]
    cache: Any  # the model's cache after all but the prompt's last token; None for a 1-token prompt


@torch.inference_mode()
def read_prompt(model, prompt: list[int]) -> ReadPrompt:
    """One forward pass over all of the prompt but its last token: the logits that score each
    of its tokens after the first, and the cache an answer is generated from."""
    if len(prompt) < 2:
        return ReadPrompt(torch.empty(0, 0), None)
    output = model(input_ids=torch.tensor([prompt[:-1]], device=model.device), use_cache=True)
    return ReadPrompt(output.logits[0], output.past_key_values)


def scored_tokens(
    tokenizer,
    prompt: list[int],
    new_ids: list[int],
    new_logits: torch.Tensor | None,
    top: int,
    *,
    echoed: tuple[str, torch.Tensor] | None = None,
    kept: int | None = None,
) -> list[dict[str, Any]]:
    """Each token of the answer (`new_logits`: the model's logits that chose each) with its
    log-probability, the `top` likeliest tokens in its place, and where its text starts in the
    returned text; with `echoed` (the prompt's text and read_prompt's logits) the prompt's tokens
    first, the first of them with null logprob and top (nothing precedes it). `kept`: the length
    of the answer's text left before a stop string; the tokens after it are left out, as that
    text is.

    A token's "token" is the text it adds to the decoded text (so they join into it; a token
    ending mid-character adds nothing, the next one the character), a special token its name."""
    scored = new_ids
    rows = [new_logits] if new_ids and new_logits is not None else []
    if echoed is not None:
        scored = prompt[1:] + new_ids
        rows = [echoed[1], *rows] if len(prompt) > 1 else rows
    logits = torch.cat([r.to(rows[0].device) for r in rows]) if rows else torch.empty(0, 0)
    places: list[tuple[float | None, list[tuple[int, float]] | None]] = []
    for start in range(0, len(scored), SCORED_AT_ONCE):
        logprobs = torch.log_softmax(logits[start : start + SCORED_AT_ONCE].float(), dim=-1)
        wanted = torch.tensor(scored[start : start + SCORED_AT_ONCE], device=logprobs.device)
        chosen = logprobs.gather(1, wanted[:, None])[:, 0].tolist()
        values, indices = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
        places += [
            (_finite(lp), list(zip(i, map(_finite, v), strict=True)))
            for lp, i, v in zip(chosen, indices.tolist(), values.tolist(), strict=True)
        ]
    if echoed is not None:
        places.insert(0, (None, None))  # the prompt's first token
    answer_starts = len(echoed[0]) if echoed is not None else 0
    parts: list[tuple[list[int], int, int | None]] = [(prompt, 0, None)] if echoed is not None else []
    parts.append((new_ids, answer_starts, None if kept is None else answer_starts + kept))
    entries = []
    place = iter(places)
    for part, offset, cut in parts:
        for token_id, piece in zip(part, _pieces(tokenizer, part), strict=True):
            logprob, tops = next(place)
            name = piece or (tokenizer.decode([token_id]) if token_id in tokenizer.all_special_ids else "")
            if cut is None or offset < cut:
                named = None
                if tops is not None:
                    named = [[name if i == token_id else tokenizer.decode([i]), lp] for i, lp in tops]
                entries.append({"token": name, "logprob": logprob, "offset": offset, "top": named})
            offset += len(piece)
    return entries


def _finite(logprob: float) -> float:
    return max(logprob, LEAST_LOGPROB)


def _pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds to `decode(ids)` (special tokens skipped), found as a stream
    decodes: a token that ends mid-character adds nothing and the one completing it adds the
    character; the tokens just before are decoded with it, for the spaces a tokenizer puts
    only between tokens."""
    pieces = []
    prefix = read = 0
    for end in range(1, len(ids) + 1):
        before = tokenizer.decode(ids[prefix:read], skip_special_tokens=True)
        after = tokenizer.decode(ids[prefix:end], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            pieces.append(after[len(before) :])
            prefix, read = read, end
        else:
            pieces.append("")
    return pieces
