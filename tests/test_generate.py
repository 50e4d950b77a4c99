"""`python -m pretrain.generate`: what it streams is the prompt and TitansLM.generate's continuation (greedy, and
seeded top-k / top-p sampling) decoded whole; multi-byte characters print whole; bad settings are one line, exit 2."""

import shutil

import pytest
import torch

from pretrain.convert import save_safetensors
from pretrain.data.tokenizer import load_tokenizer
from pretrain.generate import TextStream, cli
from test_train import TINY_MODEL
from titans_parallel import ModelConfig, TitansLM
from titans_parallel.typed_config import from_mapping

PROMPT = "It was the best of times"


@pytest.fixture(scope="module")
def export(small_dataset, tmp_path_factory):
    """(safetensors export folder with its tokenizer, the TitansLM in it)."""
    config = from_mapping(ModelConfig, {**TINY_MODEL, "vocab_size": 512})
    torch.manual_seed(0)
    model = TitansLM(config).eval()
    path = tmp_path_factory.mktemp("st")
    save_safetensors(model.state_dict(), config, path, metadata={})
    shutil.copyfile(small_dataset / "tokenizer.model", path / "tokenizer.model")
    return path, model


def _run(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        cli([str(a) for a in argv])
    out = capsys.readouterr()
    return done.value.code or 0, out.out, out.err


@pytest.mark.parametrize("settings,seed", [(dict(temperature=0), None),
                                           (dict(temperature=0.8, top_k=50, top_p=0.9), 3)])
def test_streamed_text_is_the_models_continuation(export, capsys, settings, seed):
    path, model = export
    sp = load_tokenizer(path / "tokenizer.model")
    ids = [sp.eos_id()] + sp.encode(PROMPT)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    out = model.generate(torch.tensor([ids]), 30, eos_id=sp.eos_id(), generator=generator, **settings)[0, len(ids):]
    continuation = out.tolist()[: out.tolist().index(sp.eos_id())] if sp.eos_id() in out else out.tolist()
    argv = ["--checkpoint", path, "--prompt", PROMPT, "--max-new-tokens", 30]
    argv += [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", v)]
    argv += ["--seed", seed] if seed is not None else []
    code, stdout, _ = _run(capsys, *argv)
    assert code == 0 and stdout == sp.decode(sp.encode(PROMPT) + continuation) + "\n"


def test_multibyte_characters_print_whole(small_dataset):
    sp = load_tokenizer(small_dataset / "tokenizer.model")
    text = " naïve ☃, café 日本語 — ok"
    context = sp.encode("Once")
    stream = TextStream(sp, context)
    pieces = [stream.push(t) for t in sp.encode("Once" + text)[len(context):]]
    assert "".join(pieces) + stream.flush() == text
    assert "" in pieces and not any("\ufffd" in p for p in pieces)  # bytes held back, never half a character


@pytest.mark.parametrize("extra,message", [
    (["--prompt", ""], "--prompt is empty"),
    (["--top-k", "0"], "top_k must be >= 1"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], "top_p must lie in (0, 1]"),
    (["--top-p", "1.5"], "top_p must lie in (0, 1]"),
    (["--max-new-tokens", "-2"], "max_new_tokens must be >= 0"),
])
def test_bad_settings_are_one_line(export, capsys, extra, message):
    code, stdout, stderr = _run(capsys, "--checkpoint", export[0], "--prompt", PROMPT, *extra)
    assert code == 2 and stdout == "" and stderr.startswith(f"generate: error: {message}")
    assert len(stderr.strip().splitlines()) == 1


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code, _, stderr = _run(capsys, "--checkpoint", missing, "--prompt", PROMPT)
    assert code == 2 and stderr.strip() == f"generate: error: {missing}: no such checkpoint folder"
