"""Does llama.cpp tokenize our GGUF exports as transformers tokenizes the model's own folder
(issue 28 item 3)? English oasst1 texts (examples/data/oasst1/en-validation.jsonl, not deleted,
in file order) are tokenized both ways, BOS and all, and the texts with identical ids counted:

  stories260K (Llama, SentencePiece), before: the GGUF of a folder without tokenizer.model, which
      is what the export wrote until issue 28 (transformers' save_pretrained drops the file and
      the writer read tokenizer.json only: every piece's score -1000);
  stories260K, after: the GGUF as the export writes it now (tokenizer.model's scores and types);
  tiny-phi2 (Phi-2's own GPT-2 BPE tokenizer).

llama.cpp is llama-cpp-python, installed in a venv of its own (built from source: ~30 min on
2 cores), run as `Llama(path, vocab_only=True).tokenize(text, add_bos=True, special=True)`:
BOS where the GGUF asks for one, special tokens in the text read as such, as transformers does.

usage: .venv/bin/python bench/gguf_tokenizer_check.py [--llama-python /tmp/llamacpp-venv/bin/python]
           [--texts 420] [--gguf FILE --tokenizer DIR]   (one file of your own instead)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OASST1 = REPO / "examples" / "data" / "oasst1" / "en-validation.jsonl"

# run by llama-cpp-python's interpreter: {"gguf": path, "texts": [...]} in, ids per text out
LLAMA_CPP = """
import json, sys
import llama_cpp
job = json.load(sys.stdin)
vocab = llama_cpp.Llama(job["gguf"], vocab_only=True, verbose=False)
print(json.dumps({"version": llama_cpp.__version__, "ids": [
    vocab.tokenize(text.encode(), add_bos=True, special=True) for text in job["texts"]]}))
"""


def english_texts(count: int) -> list[str]:
    texts = []
    with OASST1.open() as rows:
        for line in rows:
            row = json.loads(line)
            if row["lang"] == "en" and not row["deleted"]:
                texts.append(row["text"])
            if len(texts) == count:
                break
    return texts


def llama_cpp_ids(python: str, gguf: Path, texts: list[str]) -> tuple[str, list[list[int]]]:
    job = json.dumps({"gguf": str(gguf), "texts": texts})
    done = subprocess.run([python, "-c", LLAMA_CPP], input=job, capture_output=True, text=True, check=True)
    answer = json.loads(done.stdout)
    return answer["version"], answer["ids"]


def compare(name: str, python: str, gguf: Path, tokenizer_dir: Path, texts: list[str]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    expected = [tokenizer(text)["input_ids"] for text in texts]
    version, got = llama_cpp_ids(python, gguf, texts)
    matched = sum(a == b for a, b in zip(expected, got, strict=True))
    print(f"{name}: {matched}/{len(texts)} texts tokenized the same (llama-cpp-python {version})")
    for text, a, b in zip(texts, expected, got, strict=True):
        if a == b:
            continue
        at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        ours, theirs = (tokenizer.convert_ids_to_tokens(ids[at : at + 4]) for ids in (a, b))
        print(f"  first text that differs, at token {at}: transformers {ours}, llama.cpp {theirs}")
        print(f"  in {text[:80]!r}")
        break


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama-python", default="/tmp/llamacpp-venv/bin/python")
    parser.add_argument("--texts", type=int, default=420)
    parser.add_argument("--gguf", type=Path, help="check this file instead of fresh exports")
    parser.add_argument("--tokenizer", type=Path, help="the folder whose tokenizer --gguf should match")
    args = parser.parse_args()
    texts = english_texts(args.texts)
    if args.gguf:
        compare(args.gguf.name, args.llama_python, args.gguf, args.tokenizer, texts)
        return

    from worker.gguf import write_gguf

    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        stories = work_dir / "stories260K"
        shutil.copytree(REPO / "examples" / "stories260K", stories)
        before = work_dir / "stories-before"
        shutil.copytree(stories, before, ignore=shutil.ignore_patterns("tokenizer.model"))
        write_gguf(before, work_dir / "before.gguf")
        write_gguf(stories, work_dir / "after.gguf")
        compare("stories260K before", args.llama_python, work_dir / "before.gguf", stories, texts)
        compare("stories260K after", args.llama_python, work_dir / "after.gguf", stories, texts)

        phi = work_dir / "tiny-phi2"
        shutil.copytree(REPO / "examples" / "tiny-phi2", phi)
        write_gguf(phi, work_dir / "phi.gguf")
        compare("tiny-phi2 (Phi-2's tokenizer)", args.llama_python, work_dir / "phi.gguf", phi, texts)


if __name__ == "__main__":
    main()
