"""Writes the data of the local lm-eval tasks from the embedded corpus' held-out documents (the ones the default
dataset's val split takes, `pretrain.data.prepare.is_val` at val_fraction 0.1; never trained on):

- heldout.jsonl: {"text"}: each held-out document cut at the first sentence end after every PASSAGE_CHARS
  characters, the passages verbatim (the whitespace at a cut dropped).
- next_sentence.jsonl: {"context", "choices", "label"}: CHOICES candidate next sentences (whitespace runs as one
  space) for a context (the sentences before one, up to CONTEXT_CHARS): the true one at `label`, the others drawn from anywhere in the held-out
  text with a seeded `random.Random(SEED)`; ITEMS items.

    python configs/eval/make_data.py [--out configs/eval]

Deterministic: the same corpus gives the same bytes (tests/test_lm_eval.py checks the shipped files).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
from pathlib import Path

from pretrain.data.default import DEFAULT_CORPUS
from pretrain.data.prepare import is_val

VAL_FRACTION = 0.1  # the default dataset's
PASSAGE_CHARS, CONTEXT_CHARS = 1500, 400
ITEMS, CHOICES, SEED = 100, 4, 0
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"])")


def heldout_documents() -> list[str]:
    with gzip.open(DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return [t for i, t in enumerate(texts) if is_val(i, VAL_FRACTION)]


def passages(text: str) -> list[str]:
    """`text` cut at the first sentence end after every PASSAGE_CHARS characters."""
    out, start = [], 0
    for end in SENTENCE_END.finditer(text):
        if end.start() - start >= PASSAGE_CHARS:
            out.append(text[start : end.start()])
            start = end.end()
    return out + [text[start:]] if start < len(text) else out


def next_sentence_items(documents: list[list[str]], rng: random.Random) -> list[dict]:
    """ITEMS cloze items over sentences of 40-200 characters that follow at least CONTEXT_CHARS / 2 of text."""
    fits = [s for doc in documents for s in doc if 40 <= len(s) <= 200]
    candidates = [(doc, i) for doc in documents for i in range(1, len(doc))
                  if 40 <= len(doc[i]) <= 200 and sum(map(len, doc[:i])) >= CONTEXT_CHARS // 2]
    items = []
    for doc, i in rng.sample(candidates, ITEMS):
        context = doc[i - 1]
        for s in reversed(doc[: i - 1]):
            if len(context) + len(s) + 1 > CONTEXT_CHARS:
                break
            context = f"{s} {context}"
        choices = [doc[i]] + rng.sample([s for s in fits if s != doc[i]], CHOICES - 1)
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(doc[i])})
    return items


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent))
    out = Path(parser.parse_args(argv).out)
    documents = heldout_documents()
    write_jsonl(out / "heldout.jsonl", [{"text": p} for doc in documents for p in passages(doc)])
    sentences = [SENTENCE_END.split(" ".join(doc.split())) for doc in documents]
    write_jsonl(out / "next_sentence.jsonl", next_sentence_items(sentences, random.Random(SEED)))


if __name__ == "__main__":
    main()
