"""Real oasst1 rank-pair lengths for the DPO bench, in Phi-2 tokens.

From the English tree export `examples/data/oasst1/en-100-trees.jsonl`, the service's own rule
(`app.preferences.ranked_pairs_from_rows`, the spec's defaults: English, synthetic kept): for each
prompter message with two or more ranked, kept (not deleted, reviewed) assistant replies, the
thread up to and including it is the prompt, the rank-0 reply is chosen and the worst-ranked one
rejected. The service's text (`Human: …` / `Assistant: …` lines, each reply followed by EOS) is
tokenized a segment at a time as the worker does (`worker.training.data.prompt_ids` for the
prompt, which ends with `\\nAssistant: `; the reply + EOS as a continuing segment) with the Phi-2
tokenizer in examples/tiny-phi2 (microsoft/phi-2's). Each pair is capped at 2048 tokens, prompt +
the longer completion, by cutting the prompt from the left (a completion longer than 2047 tokens
would keep its head and one prompt token; none is that long here).

Writes `bench/oasst1-en-rank-pair-lengths-phi2.txt`, one "prompt chosen rejected" line per pair,
so the GPU machine needs neither the data nor a tokenizer.

usage: python bench/dpo_pairs.py [--max-length 2048] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TREES = REPO / "examples" / "data" / "oasst1" / "en-100-trees.jsonl"
TOKENIZER = REPO / "examples" / "tiny-phi2"
OUT = REPO / "bench" / "oasst1-en-rank-pair-lengths-phi2.txt"


def pair_lengths(max_length: int = 2048) -> list[tuple[int, int, int]]:
    from transformers import AutoTokenizer

    from app.conversations import flatten_trees
    from app.preferences import ranked_pairs_from_rows
    from worker.training.data import _segment_ids, prompt_ids, read_json_records

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    eos = tokenizer.eos_token
    pairs = ranked_pairs_from_rows(flatten_trees(read_json_records(TREES)), ["en"], include_synthetic=True)
    out = []
    for pair in pairs.pairs:
        p = len(prompt_ids(pair.prompt, tokenizer))
        (chosen,), (rejected,) = pair.chosen, pair.rejected
        c = len(_segment_ids(tokenizer, chosen.text + eos, continues=True))
        r = len(_segment_ids(tokenizer, rejected.text + eos, continues=True))
        c, r = min(c, max_length - 1), min(r, max_length - 1)
        p = max(1, min(p, max_length - max(c, r)))
        out.append((p, c, r))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    lengths = pair_lengths(args.max_length)
    Path(args.out).write_text("".join(f"{p} {c} {r}\n" for p, c, r in lengths))
    p, c, r = zip(*lengths, strict=True)
    per_pair = statistics.mean(2 * a + b + d for a, b, d in lengths)
    print(
        f"{len(lengths)} pairs; mean prompt {statistics.mean(p):.1f}, chosen {statistics.mean(c):.1f}, "
        f"rejected {statistics.mean(r):.1f} tokens (median {statistics.median(p)}, {statistics.median(c)}, "
        f"{statistics.median(r)}); longest prompt+completion {max(a + max(b, d) for a, b, d in lengths)}; "
        f"tokens per pair (both sides, prompt in each) {per_pair:.1f}"
    )


if __name__ == "__main__":
    main()
