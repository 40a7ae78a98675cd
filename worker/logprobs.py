"""Log-probabilities of given and generated tokens, for the sampler: OpenAI's `logprobs` (with
`echo`, the prompt's too), read from one forward pass of the model that answers."""

from __future__ import annotations

from typing import Any

import torch

# Log-probabilities below this (and -inf) are written as it, as OpenAI does: JSON has no -inf.
LEAST_LOGPROB = -9999.0
# Positions whose log-softmax is taken at once (a row is the vocabulary's size).
SCORED_AT_ONCE = 256


@torch.inference_mode()
def scored_tokens(
    model,
    tokenizer,
    prompt: list[int],
    new_ids: list[int],
    top: int,
    *,
    echoed: str | None = None,
    kept: int | None = None,
) -> list[dict[str, Any]]:
    """Each token of the answer (after the prompt's, when `echoed` is its text) with its
    log-probability given the tokens before it, the `top` likeliest tokens in its place, and
    where its text starts in the returned text (`echoed` + the answer), from one forward pass
    over prompt and answer. An echoed prompt's first token has nothing before it: logprob and
    top are null. `kept`: the length of the answer's text left before a stop string; the tokens
    after it are left out, as that text is.

    A token's "token" is the text it adds to the decoded text (so they join into it; a token
    ending mid-character adds nothing, the next one the character), a special token its name."""
    ids = prompt + new_ids
    logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0]
    first = 0 if echoed is not None else len(prompt)
    chosen_logprobs: list[float | None] = [None] * len(ids)
    tops: list[list[tuple[int, float]] | None] = [None] * len(ids)
    for start in range(max(first, 1), len(ids), SCORED_AT_ONCE):
        end = min(start + SCORED_AT_ONCE, len(ids))
        logprobs = torch.log_softmax(logits[start - 1 : end - 1].float(), dim=-1)
        wanted = torch.tensor(ids[start:end], device=logprobs.device)
        chosen = logprobs.gather(1, wanted[:, None])[:, 0].tolist()
        values, indices = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
        for n, position in enumerate(range(start, end)):
            chosen_logprobs[position] = _finite(chosen[n])
            tops[position] = list(zip(indices[n].tolist(), map(_finite, values[n].tolist()), strict=True))
    entries = []
    answer_starts = len(echoed or "")
    parts: list[tuple[list[int], int, int | None]] = [(prompt, 0, None)] if echoed is not None else []
    parts.append((new_ids, answer_starts, None if kept is None else answer_starts + kept))
    position = first
    for part, offset, cut in parts:
        for token_id, piece in zip(part, _pieces(tokenizer, part), strict=True):
            name = piece or (tokenizer.decode([token_id]) if token_id in tokenizer.all_special_ids else "")
            if cut is None or offset < cut:
                top_named = [
                    [name if other == token_id else tokenizer.decode([other]), logprob]
                    for other, logprob in tops[position] or []
                ]
                entries.append(
                    {
                        "token": name,
                        "logprob": chosen_logprobs[position],
                        "offset": offset,
                        "top": top_named if tops[position] is not None else None,
                    }
                )
            offset += len(piece)
            position += 1
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
