"""The local lm-eval tasks' datasets: the JSONL files beside this module (made by make_data.py), read whatever the
working directory; nothing is downloaded. Referenced from the task YAMLs as `custom_dataset: !function ...`."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _jsonl(name: str) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def heldout(**kwargs) -> datasets.DatasetDict:
    """Held-out passages of the embedded corpus: {"text"}."""
    return _jsonl("heldout.jsonl")


def next_sentence(**kwargs) -> datasets.DatasetDict:
    """Next-sentence cloze items: {"context", "choices", "label"}."""
    return _jsonl("next_sentence.jsonl")
