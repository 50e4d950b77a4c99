"""The `hf` export under transformers' own generation: EOS as the declared bos / pad token (pretraining's document
separator), the training length as model_max_length, left-padded batches (each row as if alone, unpadded), beam
search. References: TitansLM itself, and each row generated alone."""

import json

import pytest
import torch

from test_train import TINY_MODEL
from titans_parallel import ModelConfig, TitansLM
from titans_parallel.typed_config import from_mapping

CONFIG = from_mapping(ModelConfig, {**TINY_MODEL, "vocab_size": 512, "n_layers": 4,
                                    "layer_pattern": ["mac", "mag", "mal", "swa"]})
SEQ_LEN = 64
PROMPTS = [[5, 9, 17], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [7, 8, 9, 10, 11, 12, 13], [60, 61, 62]]


@pytest.fixture(scope="module")
def export(small_dataset, tmp_path_factory):
    """(path, TitansLM) of a random tiny 4-variant model exported with the test dataset's tokenizer."""
    from titans_parallel.hf.export import save_hf_export

    torch.manual_seed(0)
    model = TitansLM(CONFIG).eval()
    path = tmp_path_factory.mktemp("hf")
    save_hf_export(model.state_dict(), CONFIG, path, tokenizer=small_dataset / "tokenizer.model", seq_len=SEQ_LEN)
    return path, model


@pytest.fixture(scope="module")
def hf(export):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(export[0], trust_remote_code=True).eval()


def _left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def test_eos_is_the_declared_bos_and_pad_and_the_training_length_is_known(export, small_dataset):
    from transformers import AutoTokenizer, GenerationConfig

    from pretrain.data.tokenizer import load_tokenizer

    path, _ = export
    sp = load_tokenizer(small_dataset / "tokenizer.model")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    eos = sp.eos_id()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (eos, eos, eos)
    assert tok.model_max_length == SEQ_LEN
    assert tok("a b c")["input_ids"] == sp.encode("a b c")  # nothing added
    ids = sp.encode("end.") + [eos]
    assert tok.decode(ids, skip_special_tokens=False) == "end.</s>"  # lm-eval's stop text for EOS
    assert tok.decode(ids, skip_special_tokens=True) == "end."
    config = json.loads((path / "config.json").read_text())
    generation = GenerationConfig.from_pretrained(path)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (eos, eos, eos)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (eos, eos, eos)


def test_left_padded_batch_equals_each_row_alone(hf, export):
    """Prompts of 3, 11, 7 and 3 tokens (MAC segments and memory chunks split at different places), left padded:
    the prompt logits and greedy continuations of each row equal those of the row alone, unpadded, through TitansLM
    itself."""
    _, model = export
    ids, mask = _left_padded(PROMPTS, pad=2)
    with torch.no_grad():
        logits = hf(ids, attention_mask=mask).logits
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None)
    for row, prompt in enumerate(PROMPTS):
        alone = torch.tensor([prompt])
        with torch.no_grad():
            assert torch.allclose(logits[row, -len(prompt):], model(alone)[0], atol=1e-5)
        assert torch.equal(out[row, ids.shape[1]:], model.generate(alone, 10, temperature=0)[0, len(prompt):])


def test_only_left_padding_in_the_prompt_is_accepted(hf):
    ids, mask = _left_padded(PROMPTS[:2], pad=2)
    with pytest.raises(ValueError, match="left padding only"):
        hf(ids, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match="all padding"):
        hf(ids, attention_mask=torch.zeros_like(mask))
    cache = hf(ids, attention_mask=mask).cache
    with pytest.raises(ValueError, match="first call only"):
        hf(ids[:, :1], cache=cache, attention_mask=torch.tensor([[1, 0], [1, 0]]))


def test_beam_search_equals_beam_search_without_a_cache(hf):
    """Beam search reorders the cache's rows; the reference recomputes every step from the whole sequence (no
    cache), each prompt alone."""
    ids, mask = _left_padded(PROMPTS[:3], pad=2)
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False, eos_token_id=None)
    out = hf.generate(ids, attention_mask=mask, **kwargs)
    for row, prompt in enumerate(PROMPTS[:3]):
        alone = hf.generate(torch.tensor([prompt]), use_cache=False, **kwargs)
        assert torch.equal(out[row, ids.shape[1]:], alone[0, len(prompt):])


BLOCKED = """
import json, sys
for name in ("deepspeed", "megatron", "titans_parallel", "pretrain"):
    sys.modules[name] = None  # `import name[.sub]` raises ImportError; find_spec (library probes) says absent
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    print(json.dumps(model(torch.tensor([[5, 9, 17, 40]])).logits[0, -1].tolist()))
"""


def test_export_loads_without_deepspeed_or_megatron(export, tmp_path):
    """The export's remote code runs with deepspeed, megatron (and this repository) import-blocked: single-rank
    inference needs neither, whatever the training job used."""
    import os
    import subprocess
    import sys

    path, model = export
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", BLOCKED, str(path)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    with torch.no_grad():
        expected = model(torch.tensor([[5, 9, 17, 40]]))[0, -1]
    assert torch.allclose(torch.tensor(json.loads(out.stdout.strip().splitlines()[-1])), expected, atol=1e-5)
