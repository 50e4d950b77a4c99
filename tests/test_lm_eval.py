"""lm-evaluation-harness on a tiny `hf` export (skipped without lm-eval: `pip install -r requirements-eval.txt`):
the README's command over the shipped tasks (configs/eval) gives the model's own figures, computed here with
TitansLM itself: the held-out bits per byte from its loss on [EOS] + text, and each choice's loglikelihood of the
next-sentence task; generate_until at batch size 4 (left padded) gives each prompt's greedy continuation alone.
The shipped task data is what configs/eval/make_data.py writes."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from test_train import TINY_MODEL
from titans_parallel import ModelConfig, TitansLM
from titans_parallel.typed_config import from_mapping

pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "configs" / "eval"
LIMIT = 4
MAX_LENGTH = 2048  # every shipped passage fits one window: lm-eval scores it in one pass, as the reference does


@pytest.fixture(scope="module")
def export(small_dataset, tmp_path_factory):
    """(hf export folder, its TitansLM, its sentencepiece tokenizer)."""
    from pretrain.data.tokenizer import load_tokenizer
    from titans_parallel.hf.export import save_hf_export

    config = from_mapping(ModelConfig, {**TINY_MODEL, "vocab_size": 512})
    torch.manual_seed(0)
    model = TitansLM(config).eval()
    path = tmp_path_factory.mktemp("hf")
    sp_path = small_dataset / "tokenizer.model"
    save_hf_export(model.state_dict(), config, path, tokenizer=sp_path, seq_len=MAX_LENGTH)
    return path, model, load_tokenizer(sp_path)


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS / name).read_text(encoding="utf-8").splitlines()]


def _loglikelihood(model: TitansLM, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = F.log_softmax(model(ids[:, :-1]).double(), dim=-1)[0, len(context) - 1 :]
    return logp.gather(-1, torch.tensor(continuation)[:, None]).sum().item()


def test_shipped_task_data_is_what_make_data_writes(tmp_path):
    subprocess.run([sys.executable, str(TASKS / "make_data.py"), "--out", str(tmp_path)], check=True, timeout=120)
    for name in ("heldout.jsonl", "next_sentence.jsonl"):
        assert (tmp_path / name).read_bytes() == (TASKS / name).read_bytes(), name


@pytest.mark.slow  # ~40 s: the lm_eval command in a fresh process
def test_lm_eval_gives_the_models_own_figures(export, tmp_path):
    path, model, sp = export
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "m")}
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
               f"pretrained={path},trust_remote_code=True", "--include_path", str(TASKS),
               "--tasks", "titans_heldout,titans_next_sentence", "--batch_size", "4", "--limit", str(LIMIT),
               "--log_samples", "--output_path", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]

    texts = [r["text"] for r in _rows("heldout.jsonl")[:LIMIT]]
    eos = sp.eos_id()
    total = sum(_loglikelihood(model, [eos], sp.encode(t)) for t in texts)
    bits_per_byte = -total / sum(len(t.encode("utf-8")) for t in texts) / math.log(2)
    assert results["titans_heldout"]["bits_per_byte,none"] == pytest.approx(bits_per_byte, rel=1e-5)

    samples = next((tmp_path / "out").rglob("samples_titans_next_sentence_*.jsonl")).read_text().splitlines()
    for sample, item in zip(map(json.loads, samples), _rows("next_sentence.jsonl")[:LIMIT], strict=True):
        context = sp.encode(item["context"])
        for (ll, _), choice in zip(sample["filtered_resps"], item["choices"], strict=True):
            whole = sp.encode(item["context"] + " " + choice)
            # fp32 sums of ~100 token log-probs (about -600) in batches of 4: agree to ~1e-7 relative, not 1e-4 absolute
            assert float(ll) == pytest.approx(_loglikelihood(model, context, whole[len(context):]), rel=1e-6, abs=1e-4)


def test_generate_until_in_batches_of_four_equals_each_prompt_alone(export):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    path, model, sp = export
    lm = HFLM(pretrained=str(path), trust_remote_code=True, batch_size=4, device="cpu")
    lengths = (40, 90, 15, 160, 60)  # characters: prompts of different token counts in one batch of 4, then 1
    items = _rows("next_sentence.jsonl")[: len(lengths)]
    contexts = [item["context"][:n] for item, n in zip(items, lengths, strict=True)]
    settings = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}
    requests = [Instance("generate_until", {}, (c, settings), idx=0) for c in contexts]
    texts = lm.generate_until(requests)
    assert min(map(len, texts)) > 0
    for context, text in zip(contexts, texts, strict=True):
        ids = sp.encode(context)
        out = model.generate(torch.tensor([ids]), 12, temperature=0, eos_id=sp.eos_id())[0, len(ids):].tolist()
        alone = lm.tokenizer.decode(out, skip_special_tokens=True).split("\n\n")[0]
        assert text == alone
