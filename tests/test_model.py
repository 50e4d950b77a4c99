"""TitansLM: every variant and baseline is causal, decodes incrementally exactly as one forward, learns real text."""

import gzip
import json
import math
from pathlib import Path

import pytest
import torch

from titans_parallel import ModelConfig, TitansLM, lm_loss
from titans_parallel.model import next_token_probs, sample_next_token, select_rows
from titans_parallel.summary import main as summary_main

VARIANTS = ["mac", "mag", "mal", "lmm", "transformer", "swa"]
ROOT = Path(__file__).resolve().parents[1]


def tiny_config(variant, **overrides):
    base = dict(vocab_size=61, dim=32, n_layers=2, n_heads=2, window=8, n_persistent=3, variant=variant,
                memory=dict(chunk_size=4, depth=2, expansion=2))
    base.update(overrides)
    from titans_parallel.typed_config import from_mapping

    return from_mapping(ModelConfig, base)


def make_model(variant, seed=0, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    return TitansLM(tiny_config(variant, **overrides)).to(dtype)


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal(variant):
    model = make_model(variant)
    ids = torch.randint(0, 61, (2, 27))
    logits = model(ids)
    for t in (0, 7, 8, 15, 20):
        changed = ids.clone()
        changed[:, t + 1 :] = torch.randint(0, 61, changed[:, t + 1 :].shape)
        other = model(changed)
        assert torch.equal(other[:, : t + 1], logits[:, : t + 1]), f"position <= {t} saw the future"
        assert not torch.allclose(other[:, t + 1 :], logits[:, t + 1 :])


@pytest.mark.parametrize("variant", VARIANTS)
def test_incremental_decoding_equals_full_forward(variant):
    model = make_model(variant)
    ids = torch.randint(0, 61, (2, 27))
    full = model(ids)
    for pieces in ([1] * 27, [5, 3, 9, 10], [16, 11]):
        outs, cache, start = [], None, 0
        for n in pieces:
            out, cache = model.decode(ids[:, start : start + n], cache)
            outs.append(out)
            start += n
        assert (torch.cat(outs, dim=1) - full).abs().max().item() <= 1e-10, pieces


@pytest.mark.slow
def test_compiled_memory_scan_matches_eager_in_a_model():
    """memory.compile_scan reaches every memory layer (MAC runs its memory segment by segment, continuing the
    state) and changes neither the loss nor any gradient beyond float64 rounding; decoding (chunks shorter than
    chunk_size, run eagerly) agrees too."""
    ids = torch.randint(0, 61, (2, 27))
    results = []
    for compiled in (False, True):
        model = make_model("mac", memory=dict(chunk_size=4, depth=2, expansion=2, compile_scan=compiled))
        loss = lm_loss(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        decoded, _ = model.decode(ids[:, :5], None)
        results.append((loss.detach(), [p.grad for p in model.parameters()], decoded))
    (loss, grads, decoded), (loss_c, grads_c, decoded_c) = results
    assert abs(loss.item() - loss_c.item()) <= 1e-12
    assert max((a - b).abs().max().item() for a, b in zip(grads, grads_c)) <= 1e-10
    assert (decoded - decoded_c).abs().max().item() <= 1e-12


@pytest.mark.parametrize("variant", ["mac", "mag", "transformer"])
def test_incremental_decoding_float32(variant):
    model = make_model(variant, dtype=torch.float32)
    ids = torch.randint(0, 61, (2, 20))
    full = model(ids)
    outs, cache = [], None
    for t in range(20):
        out, cache = model.decode(ids[:, t : t + 1], cache)
        outs.append(out)
    assert (torch.cat(outs, dim=1) - full).abs().max().item() <= 1e-4 * full.abs().max().item()


def test_persistent_tokens_visible_beyond_the_window():
    """One SWA layer (window 8): logits at position 20 ignore token 0 but depend on the persistent tokens."""
    model = make_model("swa", n_layers=1)
    ids = torch.randint(0, 61, (1, 21))
    logits = model(ids)[0, 20]
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 61
    assert torch.equal(model(changed)[0, 20], logits)
    with torch.no_grad():
        model.layers[0].mixer.persistent.tokens.add_(1.0)
    assert not torch.allclose(model(ids)[0, 20], logits)


def test_mal_attention_reads_the_tokens_not_only_the_memory():
    """MAL's attention reads the residual stream after the memory (x + y): with the memory's output zeroed (y = 0)
    the layer's output still depends on the tokens in the window."""
    model = make_model("mal", n_layers=1)
    with torch.no_grad():
        model.layers[0].mixer.memory.out_proj.weight.zero_()
    ids = torch.randint(0, 61, (1, 6))
    changed = ids.clone()
    changed[0, 3] = (ids[0, 3] + 1) % 61
    logits = [model(x)[0, 5] for x in (ids, changed)]
    assert (logits[0] - logits[1]).abs().max() > 1e-6


def test_mal_output_keeps_the_memory_layers_residual():
    """MAL is a memory layer then an attention layer, each with its residual: out = y + SWA(x + y). With attention's
    output zeroed the mixer's output is the memory's, not zero."""
    model = make_model("mal", n_layers=1)
    mixer = model.layers[0].mixer
    with torch.no_grad():
        mixer.attn.wo.weight.zero_()
    x = torch.randn(1, 6, model.config.dim, dtype=torch.float64)
    out, _ = mixer(x, None)
    _, y, _ = mixer.memory.forward_prefixed(mixer.persistent.memory_prefix(None), x)
    torch.testing.assert_close(out, y)
    assert y.abs().max() > 1e-6


def test_mac_memory_learns_from_the_tokens_not_only_from_attention():
    """MAC's memory writes the residual stream after attention (segment + y): with attention's output zeroed
    (y = 0) the memory's state at the end still depends on which tokens it read."""
    model = make_model("mac", n_layers=1)
    with torch.no_grad():
        model.layers[0].mixer.attn.wo.weight.zero_()
    ids = torch.randint(0, 61, (1, 16))
    changed = ids.clone()
    changed[0, 2] = (ids[0, 2] + 1) % 61
    states = [model.decode(x, None)[1][0].memory.memory.weights for x in (ids, changed)]
    assert all((a - b).abs().max() > 1e-6 for a, b in zip(*states))


def test_generate_greedy_matches_argmax_of_full_forward():
    model = make_model("mac")
    prompt = torch.randint(0, 61, (2, 9))
    out = model.generate(prompt, max_new_tokens=12, temperature=0)
    seq = prompt
    for _ in range(12):  # reference: a full forward over the growing sequence every step
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_generate_rejects_out_of_range_prompt():
    model = make_model("swa")
    with pytest.raises(ValueError, match="token ids"):
        model.generate(torch.tensor([[0, 61]]), max_new_tokens=1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_selected_cache_rows_continue_as_those_rows_alone(variant):
    """select_rows (beam search's reorder): rows 2, 0, 0 of a batch's cache, continued, equal rows 2, 0, 0 run whole
    from the start."""
    model = make_model(variant)
    ids = torch.randint(0, 61, (3, 13))
    rows = torch.tensor([2, 0, 0])
    _, cache = model.decode(ids[:, :10], None)
    continued, _ = model.decode(ids[rows, 10:], select_rows(cache, rows))
    assert torch.allclose(continued, model(ids[rows])[:, 10:], atol=1e-10)


PROBS = torch.tensor([[0.5, 0.25, 0.15, 0.10]])


def test_top_p_keeps_the_nucleus_and_renormalises():
    """Hand-computed: p = (.5, .25, .15, .1). top_p .7: .5 alone is short of .7, .5 + .25 reaches it -> (2/3, 1/3).
    At temperature 2 the probabilities go as sqrt(p): (.370, .262, .203, .165), so top_p .6 keeps the first two ->
    (sqrt(.5), .5) / (sqrt(.5) + .5) = (2 - sqrt 2, sqrt 2 - 1). top_k 1 beats any top_p; top_p 1 changes nothing."""
    logits = PROBS.log()
    assert torch.allclose(next_token_probs(logits, 1.0, top_p=0.7), torch.tensor([[2 / 3, 1 / 3, 0, 0]]))
    root2 = math.sqrt(2)
    assert torch.allclose(next_token_probs(logits, 2.0, top_p=0.6), torch.tensor([[2 - root2, root2 - 1, 0, 0]]))
    assert torch.allclose(next_token_probs(logits, 1.0, top_k=1, top_p=0.99), torch.tensor([[1.0, 0, 0, 0]]))
    assert torch.allclose(next_token_probs(logits, 1.0, top_p=1.0), PROBS)
    draws = sample_next_token(logits.expand(20000, -1), 1.0, None, torch.Generator().manual_seed(0), top_p=0.7)
    freq = torch.bincount(draws, minlength=4) / draws.numel()
    assert freq[2:].sum() == 0 and abs(freq[0].item() - 2 / 3) < 0.01


@pytest.mark.parametrize("bad,match", [(dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=-0.5), "temp"),
                                       (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "p")])
def test_generate_rejects_bad_sampling_settings(bad, match):
    model = make_model("swa")
    with pytest.raises(ValueError, match=match):
        model.generate(torch.tensor([[1, 2]]), **{"max_new_tokens": 1, **bad})


def _short_real_text(n_chars=1200) -> bytes:
    with gzip.open(ROOT / "data/default/corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        text = json.loads(f.readline())["text"]
    return text[1000 : 1000 + n_chars].encode("utf-8")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["mac", "transformer"])
def test_overfits_short_real_text(variant):
    """Bytes of a real text: a tiny model's loss falls well below the unigram entropy of those bytes."""
    data = torch.tensor(list(_short_real_text()), dtype=torch.long)
    counts = torch.bincount(data, minlength=256).double()
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = -(p * p.log()).sum().item()  # nats per byte
    torch.manual_seed(0)
    model = TitansLM(tiny_config(variant, vocab_size=256, dim=64, n_heads=4, window=32, memory=dict(chunk_size=8)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seq = 64
    starts = torch.arange(0, len(data) - seq - 1, seq)
    batch = torch.stack([data[s : s + seq + 1] for s in starts])
    for _ in range(150):
        loss = lm_loss(model(batch[:, :-1]), batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * unigram_entropy, (loss.item(), unigram_entropy)


def test_paper_sizes_within_ten_percent_of_their_names(capsys):
    paths = [str(p) for p in sorted((ROOT / "configs/model").glob("*m.yaml"))]
    assert len(paths) == 4
    assert summary_main(paths) == 0
    assert capsys.readouterr().out.count(": ok]") == 4


def test_config_errors_name_the_key(tmp_path):
    from titans_parallel.typed_config import ConfigError

    path = tmp_path / "m.yaml"
    path.write_text("dim: 64\nn_heads: 4\nmemory:\n  depth: 2\n")
    assert ModelConfig.from_yaml(path).head_dim == 16
    with pytest.raises(ConfigError, match="memroy"):
        ModelConfig.from_yaml(path, ["memroy.depth=3"])
    with pytest.raises(ConfigError, match="memory.depth: expected int"):
        ModelConfig.from_yaml(path, ["memory.depth=two"])
    with pytest.raises(ConfigError, match="variant"):
        ModelConfig.from_yaml(path, ["variant=mamba"])
    with pytest.raises(ConfigError, match="multiple of memory.chunk_size"):
        ModelConfig.from_yaml(path, ["window=20"])
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_yaml(tmp_path / "missing.yaml")
