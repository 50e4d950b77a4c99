"""Document resets (`model.document_reset`): every EOS opens a document that the model reads as if the sequence
began there. References: the model run on each document alone (float64), one pass against incremental decoding,
each row generated alone, and the option off."""

import pytest
import torch

from titans_parallel import ModelConfig, TitansLM
from titans_parallel.config import MemoryConfig

EOS = 2
VARIANTS = ["mac", "mag", "mal", "lmm", "swa", "transformer"]


def _model(variant: str, document_reset: bool = True, backend: str = "sdpa", **memory) -> TitansLM:
    """Chunk 4, MAC segment (window) 8, 3 persistent tokens: a prefix that ends inside a memory chunk."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=32, dim=16, n_layers=2, n_heads=2, variant=variant, window=8, n_persistent=3,
                         memory=MemoryConfig(chunk_size=4, **memory), document_reset=document_reset, eos_id=EOS,
                         attention_backend=backend)
    return TitansLM(config).double()


def _tokens(*lengths: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 32, (1, n), generator=g) for n in lengths]


def _documents(row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each document of row [T]: a new one at every EOS."""
    bounds = [0, *(t for t in (row == EOS).nonzero().flatten().tolist() if t > 0), len(row)]
    return list(zip(bounds[:-1], bounds[1:]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_document_after_eos_reads_as_if_alone(variant):
    """[A, EOS, B]: B's logits equal those of [EOS, B]; A is 13 tokens, so the boundary falls inside a memory chunk
    (4) and inside a MAC segment (8)."""
    model = _model(variant)
    a, b = _tokens(13, 11)
    eos = torch.tensor([[EOS]])
    packed = model(torch.cat([a, eos, b], dim=1))
    torch.testing.assert_close(packed[:, 13:], model(torch.cat([eos, b], dim=1)), rtol=0, atol=1e-10)
    torch.testing.assert_close(packed[:, :13], model(a), rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_rows_loss_and_gradients_are_those_of_each_document_alone(variant):
    """Two rows with documents at different places (one token long, two EOS in a row, one at t = 0): logits per
    document, and the parameter gradients of the summed token losses, equal those of every document run alone."""
    model = _model(variant)
    rows = torch.cat(_tokens(29, 29, seed=2))
    rows[0, [6, 7, 8, 20]] = EOS
    rows[1, [0, 17]] = EOS
    logits = model(rows)
    weight = torch.randn(logits.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad((logits * weight).sum(), params, allow_unused=True)
    loss_alone = 0
    for b in range(2):
        for start, end in _documents(rows[b]):
            alone = model(rows[b : b + 1, start:end])
            torch.testing.assert_close(logits[b : b + 1, start:end], alone, rtol=0, atol=1e-10)
            loss_alone = loss_alone + (alone * weight[b : b + 1, start:end]).sum()
    for p, g, g_alone in zip(params, grads, torch.autograd.grad(loss_alone, params, allow_unused=True)):
        if g_alone is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, g_alone, rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
def test_decoding_across_a_boundary_equals_one_pass(variant):
    """Prefill 10 tokens, then one token at a time through two EOS: the logits of one pass."""
    model = _model(variant)
    a, b, c = _tokens(9, 7, 6)
    eos = torch.tensor([[EOS]])
    seq = torch.cat([a, eos, b, eos, c], dim=1)
    logits, cache = model.decode(seq[:, :10], None)
    pieces = [logits]
    for t in range(10, seq.shape[1]):
        step, cache = model.decode(seq[:, t : t + 1], cache)
        pieces.append(step)
    torch.testing.assert_close(torch.cat(pieces, dim=1), model(seq), rtol=0, atol=1e-10)


def test_generate_rows_with_documents_at_different_places_as_if_alone():
    """Greedy generation of two prompts whose last documents start at different places (and whose earlier
    documents differ) equals each row generated from its last document alone."""
    model = _model("mag")
    prompts = torch.cat(_tokens(12, 12, seed=4))
    prompts[0, 3], prompts[1, [2, 8]] = EOS, EOS
    out = model.generate(prompts, 6, temperature=0)
    for b, start in ((0, 3), (1, 8)):
        alone = model.generate(prompts[b : b + 1, start:], 6, temperature=0)
        assert torch.equal(out[b : b + 1, start:], alone)


def test_decode_refuses_a_cache_it_cannot_return():
    """A decode call whose last piece has rows starting documents at different places names the problem."""
    model = _model("lmm")
    rows = torch.cat(_tokens(8, 8))
    rows[0, 5] = EOS
    with pytest.raises(ValueError, match="different positions"):
        model.decode(rows, None)


def test_without_the_option_the_previous_document_is_read():
    """The option off (the default) keeps the plain path: the document before an EOS changes what follows."""
    a, b = _tokens(13, 11)
    seq, tail = torch.cat([a, torch.tensor([[EOS]]), b], dim=1), torch.cat([torch.tensor([[EOS]]), b], dim=1)
    off = _model("mac", document_reset=False)
    assert (off(seq)[:, 13:] - off(tail)).abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_backend_with_resets_matches_sdpa():
    """The flex backend's per-call document block mask gives sdpa's logits (forward: no CPU flex backward)."""
    rows = torch.cat(_tokens(20, 20))
    rows[0, 7], rows[1, 13] = EOS, EOS
    with torch.no_grad():
        torch.testing.assert_close(_model("mal", backend="flex")(rows), _model("mal")(rows), rtol=0, atol=1e-10)


def test_configuration_errors_are_named():
    with pytest.raises(ValueError, match="eos_id"):
        TitansLM(ModelConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, document_reset=True))
    with pytest.raises(ValueError, match="attention_backend"):
        ModelConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, document_reset=True, eos_id=2,
                    attention_backend="flash")
    with pytest.raises(ValueError, match="eos_id"):
        ModelConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, eos_id=32)


def _train_with_resets(rank: int, world_size: int, sections: dict) -> dict:
    from test_train import job

    from pretrain.train import train

    return {"losses": train(job(**sections)).losses}


def test_training_job_takes_eos_id_from_the_dataset_and_saves_it(tmp_path, small_dataset):
    """model.document_reset without model.eos_id: the job fills it in from the manifest; the checkpoint's model
    reads with it, and its loss on a packed row is that of its documents alone."""
    from parallel_harness import run_ranks

    from pretrain.data import read_manifest
    from pretrain.eval.loading import load_model_and_seq_len

    sections = {"model": {"vocab_size": 512, "document_reset": True}, "data": {"path": str(small_dataset),
                "seq_len": 64}, "train": {"steps": 2}, "checkpoint": {"dir": str(tmp_path / "ckpt"), "every": 2}}
    losses = run_ranks(1, _train_with_resets, sections, timeout=300)[0]["losses"]
    assert len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses)))
    model, _ = load_model_and_seq_len(tmp_path / "ckpt")
    eos = read_manifest(small_dataset)["eos_id"]
    assert model.config.document_reset and model.config.eos_id == eos
    ids = torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(0))
    ids[0, 17] = eos
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, 17:], model(ids[:, 17:]), rtol=0, atol=1e-5)


def test_hf_export_reads_documents_as_if_alone(tmp_path, small_dataset):
    """The HF export of a model with document resets: its logits and greedy continuation of a prompt holding an
    EOS are those of TitansLM on the document after it."""
    from transformers import AutoModelForCausalLM

    from titans_parallel.hf.export import save_hf_export

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=4, window=8, n_persistent=2,
                         layer_pattern=["mac", "mal"], memory=MemoryConfig(chunk_size=4), document_reset=True,
                         eos_id=EOS)
    model = TitansLM(config).eval()
    save_hf_export(model.state_dict(), config, tmp_path, tokenizer=small_dataset / "tokenizer.model", seq_len=64)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    prompt = torch.randint(3, 512, (1, 21), generator=torch.Generator().manual_seed(1))
    prompt[0, 9] = EOS
    with torch.no_grad():
        torch.testing.assert_close(hf(prompt).logits[:, 9:], model(prompt[:, 9:]), rtol=0, atol=1e-5)
        out = hf.generate(prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(out[:, 9:], model.generate(prompt[:, 9:], 5, temperature=0))


@pytest.mark.parametrize("variant", ["mac", "mal"])
def test_activation_checkpointing_with_resets_gives_the_same_gradients(variant):
    """Each block recomputed in backward gets the same resets: loss and gradients equal the plain run."""
    model = _model(variant)
    rows = torch.cat(_tokens(25, 25, seed=5))
    rows[0, 9], rows[1, [4, 18]] = EOS, EOS
    runs = []
    for checkpointing in (False, True):
        model.activation_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        loss = model(rows[:, :-1], rows[:, 1:])
        loss.backward()
        runs.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss, grads), (loss_c, grads_c) = runs
    torch.testing.assert_close(loss_c, loss, rtol=0, atol=1e-12)
    assert len(grads) == len(grads_c)
    for g, g_c in zip(grads, grads_c):
        torch.testing.assert_close(g_c, g, rtol=0, atol=1e-10)


def test_evaluation_streams_rows_with_documents_at_different_places():
    """`stream_logits` (perplexity, NIAH, the memory's contribution) over rows whose documents start apart gives
    the one-pass logits, in one piece and in pieces."""
    from pretrain.eval.streaming import stream_logits

    model = _model("mal")
    rows = torch.cat(_tokens(22, 22, seed=6))
    rows[0, 9], rows[1, [4, 15]] = EOS, EOS
    with torch.no_grad():
        full = model(rows)
        for chunk in (None, 8):
            pieces = torch.cat([logits for _, logits in stream_logits(model, rows, chunk)], dim=1)
            torch.testing.assert_close(pieces, full, rtol=0, atol=1e-10)


def test_a_dataset_without_eos_id_is_named(tmp_path):
    """model.document_reset with eos_id unset and a manifest that lacks eos_id: the error names the file and key."""
    import json

    from pretrain.batches import with_dataset_eos_id
    from pretrain.data import ManifestError
    from pretrain.data.shards import FORMAT, MANIFEST
    from test_train import job

    manifest = {"format": FORMAT, "seq_len": 16, "vocab_size": 64, "dtype": "uint16", "tokenizer": "tokenizer.model",
                "splits": {}}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    config = job(model={"document_reset": True})
    with pytest.raises(ManifestError, match=r"manifest.json has no eos_id.*model.eos_id"):
        with_dataset_eos_id(config, tmp_path)
    assert with_dataset_eos_id(job(), tmp_path).model.eos_id is None  # option off: the manifest is not read
