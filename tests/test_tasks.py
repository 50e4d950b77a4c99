"""Synthetic recall tasks (pretrain/eval/tasks.py): layout, answer masks, reach of a sliding window, scorer, seeds."""

import re

import pytest
import torch

from pretrain.eval.tasks import (
    TEXT_NEEDLES,
    MQARVocab,
    PasskeyVocab,
    TaskBatch,
    insert_passkey,
    merge_scores,
    mqar_batch,
    mqar_length,
    mqar_min_gap,
    mqar_vocab_size,
    passkey_batch,
    passkey_depth_range,
    passkey_in_text,
    passkey_vocab_size,
    score,
    text_needle_batch,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def check_shift(batch: TaskBatch):
    assert batch.inputs.shape == batch.targets.shape == batch.mask.shape
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])


@pytest.mark.parametrize("show_answers", [True, False])
@pytest.mark.parametrize("n_queries", [None, 15])
def test_mqar_layout_and_mask(show_answers, n_queries):
    vocab, n, gap = MQARVocab(n_keys=20, n_values=12, n_filler=5), 6, 17
    m = n if n_queries is None else n_queries
    b = mqar_batch(16, n, gap, gen(1), vocab, show_answers=show_answers, n_queries=n_queries)
    T = mqar_length(n, gap, n_queries)
    assert b.inputs.shape == b.targets.shape == b.mask.shape == (16, T)
    assert vocab.size == mqar_vocab_size(20, 12, 5) == 39
    seq = torch.cat([b.inputs[:, :1], b.targets], dim=1)  # the sequence with the answers
    assert torch.equal(b.inputs[:, 1:][~b.mask[:, :-1]], seq[:, 1:-1][~b.mask[:, :-1]])
    answer_slots = torch.zeros(T, dtype=torch.bool)
    answer_slots[2 + 2 * n + gap :: 2] = True  # inputs after the query keys
    if show_answers:
        assert torch.equal(b.inputs[:, 1:], b.targets[:, :-1])
    else:
        assert (b.inputs[:, answer_slots] == vocab.BLANK).all()
        assert not (b.inputs[:, ~answer_slots] == vocab.BLANK).any()
    assert (seq[:, 0] == vocab.BOS).all()
    keys, values = seq[:, 1 : 1 + 2 * n : 2], seq[:, 2 : 2 + 2 * n : 2]
    filler = seq[:, 1 + 2 * n : 1 + 2 * n + gap]
    q_keys, q_values = seq[:, 1 + 2 * n + gap :: 2], seq[:, 2 + 2 * n + gap :: 2]
    assert q_keys.shape == q_values.shape == (16, m)
    assert ((keys >= 2) & (keys < 22)).all() and ((values >= 22) & (values < 34)).all()
    assert ((filler >= 34) & (filler < 39)).all()
    for row in range(16):
        assert len(set(keys[row].tolist())) == n  # distinct keys
        assert sorted(q_keys[row, :n].tolist()) == sorted(keys[row].tolist())  # every key asked, once per round
        assert set(q_keys[row].tolist()) == set(keys[row].tolist())
        lookup = dict(zip(keys[row].tolist(), values[row].tolist()))
        assert [lookup[k] for k in q_keys[row].tolist()] == q_values[row].tolist()
    # scored = the query-key positions, whose target is the value
    expected = torch.zeros(T, dtype=torch.bool)
    expected[1 + 2 * n + gap :: 2] = True
    assert (b.mask == expected).all() and b.mask.sum(1).eq(m).all()
    assert torch.equal(b.targets[b.mask].view(16, m), q_values)
    assert torch.equal(b.inputs[b.mask].view(16, m), q_keys)
    assert not torch.equal(q_keys[:, :n], keys)  # random query order


def test_mqar_pairs_beyond_window():
    window, layers, n = 8, 2, 4
    gap = mqar_min_gap(window, layers)
    b = mqar_batch(2, n, gap, gen(), MQARVocab(8, 8, 4))
    last_pair = 2 * n  # position of the last pair's value
    for q in b.mask[0].nonzero().flatten().tolist():
        assert q - last_pair > layers * (window - 1)
    # one position less and the last pair is within reach of the first query
    assert (1 + 2 * n + gap - 1) - last_pair == layers * (window - 1)
    with pytest.raises(ValueError):
        mqar_batch(2, 9, 4, gen(), MQARVocab(8, 8, 4))


def test_passkey_layout_depth_and_mask():
    vocab, length, k = PasskeyVocab(), 64, 5
    assert passkey_vocab_size() == vocab.size == 21
    for depth in (0.0, 0.5, 1.0):
        b = passkey_batch(3, length, k, gen(2), depth=depth)
        check_shift(b)
        assert b.inputs.shape == (3, length)
        seq = torch.cat([b.inputs, b.targets[:, -1:]], dim=1)
        slots = length + 1 - 1 - (1 + k) - (1 + k)
        pos = 1 + round(depth * slots)
        assert (seq[:, 0] == vocab.BOS).all() and (seq[:, pos] == vocab.MARKER).all()
        assert (seq == vocab.MARKER).sum(1).eq(1).all() and (seq == vocab.QUESTION).sum(1).eq(1).all()
        needle, answer = seq[:, pos + 1 : pos + 1 + k], seq[:, -k:]
        assert torch.equal(needle, answer) and ((needle >= 3) & (needle < 13)).all()
        assert (seq[:, -k - 1] == vocab.QUESTION).all()
        expected = torch.zeros(length, dtype=torch.bool)
        expected[length - k : length] = True  # QUESTION and d_1..d_{k-1} predict d_1..d_k
        assert (b.mask == expected).all()
        assert torch.equal(b.targets[b.mask].view(3, k), answer)
        hay = torch.cat([seq[:, 1:pos], seq[:, pos + 1 + k : -k - 1]], dim=1)
        assert ((hay >= 13) & (hay < 21)).all()
        # the filler phrase repeats without a break across the needle
        phrase = vocab.phrase_ids.tolist()
        for row in hay.tolist():
            start = phrase.index(row[0])
            assert row == [phrase[(start + i) % len(phrase)] for i in range(len(row))]


def test_passkey_depth_range_out_of_reach():
    length, k, window, layers = 128, 4, 16, 2
    lo, hi = passkey_depth_range(length, k, window, layers)
    assert lo == 0.0 and 0 < hi < 1
    b = passkey_batch(256, length, k, gen(3), depth=(lo, hi))
    seq = torch.cat([b.inputs, b.targets[:, -1:]], dim=1)
    marker = (seq == PasskeyVocab.MARKER).int().argmax(1)
    first_answer = b.mask.int().argmax(1)
    assert (first_answer - (marker + k) > layers * (window - 1)).all()
    # hi is tight: the depth just past it brings the needle within reach
    slots = length - 2 * k - 2
    too_deep = passkey_batch(1, length, k, gen(), depth=min(1.0, hi + 1.0 / slots))
    m = (too_deep.inputs[0] == PasskeyVocab.MARKER).nonzero().item()
    assert (length - k) - (m + k) <= layers * (window - 1)
    with pytest.raises(ValueError):
        passkey_depth_range(32, 4, 16, 2)


def test_passkey_in_text():
    text = torch.arange(1000, 1500)
    digits, marker, question = torch.arange(10, 20), torch.tensor([7, 8]), torch.tensor([5, 6, 7, 8])
    b = passkey_in_text(text, 4, 100, 3, gen(4), digits, marker, question, depth=0.25)
    check_shift(b)
    assert b.inputs.shape == (4, 100)
    seq = torch.cat([b.inputs, b.targets[:, -1:]], dim=1)
    slots = 101 - 5 - 7
    o = round(0.25 * slots)
    assert (seq[:, o : o + 2] == marker).all() and torch.equal(seq[:, o + 2 : o + 5], seq[:, -3:])
    assert (seq[:, -7:-3] == question).all() and b.mask.sum(1).eq(3).all() and b.mask[:, -3:].all()
    hay = torch.cat([seq[:, :o], seq[:, o + 5 : -7]], dim=1)
    assert (hay[:, 1:] - hay[:, :-1] == 1).all() and (hay >= 1000).all()  # a contiguous slice of the text
    with_bos = passkey_in_text(text, 2, 100, 3, gen(4), digits, marker, question, depth=0.0, bos_id=1)
    assert with_bos.inputs.shape == (2, 100) and (with_bos.inputs[:, 0] == 1).all()
    assert (with_bos.inputs[:, 1:3] == marker).all()
    with pytest.raises(ValueError):
        passkey_in_text(text[:50], 1, 100, 3, gen(), digits, marker, question)


def test_insert_passkey_tensor_depths():
    hay = torch.full((3, 10), 50)
    b, digits, starts = insert_passkey(
        hay, 2, torch.tensor([0.0, 0.5, 1.0]), gen(), torch.arange(10), torch.tensor([40]), torch.tensor([41]), 99
    )
    assert starts.tolist() == [1, 6, 11]
    seq = torch.cat([b.inputs, b.targets[:, -1:]], dim=1)
    for row, s in enumerate(starts.tolist()):
        assert seq[row, s] == 40 and seq[row, s + 1 : s + 3].tolist() == digits[row].tolist()


def test_seeds_reproducible():
    a, b, c = (mqar_batch(8, 4, 10, gen(s)) for s in (5, 5, 6))
    assert torch.equal(a.inputs, b.inputs) and not torch.equal(a.inputs, c.inputs)
    p, q, r = (passkey_batch(8, 48, 4, gen(s)) for s in (5, 5, 6))
    assert torch.equal(p.inputs, q.inputs) and not torch.equal(p.inputs, r.inputs)
    state = torch.random.get_rng_state()
    mqar_batch(2, 4, 10, gen())
    assert torch.equal(state, torch.random.get_rng_state())  # no global RNG


def test_score_exact_on_hand_made_logits():
    targets = torch.tensor([[1, 2, 3, 0], [3, 2, 1, 0], [0, 0, 0, 0]])
    mask = torch.tensor([[False, True, True, False], [False, True, True, True], [False, False, False, False]])
    logits = torch.zeros(3, 4, 5)
    predictions = torch.tensor([[4, 2, 3, 4], [3, 2, 0, 0], [1, 1, 1, 1]])  # row 0 all right, row 1 one wrong
    logits.scatter_(2, predictions[..., None], 1.0)
    s = score(logits, targets, mask)
    assert s.exact.tolist() == [True, False, True]  # no scored position: exact
    assert s.token_correct.tolist() == [2, 2, 0] and s.token_count.tolist() == [2, 3, 0]
    assert s.token_accuracy == pytest.approx(4 / 5) and s.exact_accuracy == pytest.approx(2 / 3)
    m = merge_scores([s, score(logits[:1], targets[:1], mask[:1])])
    assert m.token_accuracy == pytest.approx(6 / 7) and m.exact.tolist() == [True, False, True, True]
    # a perfect predictor of a real batch scores 1, a constant one scores chance-like
    batch = mqar_batch(16, 4, 8, gen())
    perfect = torch.nn.functional.one_hot(batch.targets, mqar_vocab_size()).float()
    assert score(perfect, batch.targets, batch.mask).exact_accuracy == 1.0


def _char_encode(text: str) -> list[int]:
    """A stand-in tokenizer: one id per character (ids 100 + code point), so a hand count is easy."""
    return [100 + ord(c) for c in text]


@pytest.mark.parametrize("name", ["passkey", "number", "uuid"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_text_needle_at_the_requested_depth(name, depth):
    corpus = torch.arange(5000, 5400)  # a short corpus: the haystack wraps around it
    task = TEXT_NEEDLES[name]
    length = 600
    b, values, starts = text_needle_batch(task, _char_encode, corpus, 3, length, depth, gen(7), bos_id=1)
    check_shift(b)
    assert b.inputs.shape == (3, length) and (b.inputs[:, 0] == 1).all()
    seq = torch.cat([b.inputs, b.targets[:, -1:]], dim=1)
    marker, question = _char_encode(task.marker), _char_encode(task.question)
    for row, value in enumerate(values):
        answer = _char_encode(task.answer_prefix + value)
        k = len(answer)
        slots = length + 1 - 1 - (len(marker) + k) - (len(question) + k)
        assert starts[row] == 1 + round(depth * slots)  # haystack offset round(depth * slots), after BOS
        s = starts[row]
        assert seq[row, s : s + len(marker) + k].tolist() == marker + answer
        assert seq[row, -len(question) - k :].tolist() == question + answer
        assert b.mask[row].sum() == k and b.targets[row][b.mask[row]].tolist() == answer
        hay = torch.cat([seq[row, 1:s], seq[row, s + len(marker) + k : -len(question) - k]])
        assert hay.numel() == slots
        if task.haystack == "corpus":
            assert ((hay[1:] - hay[:-1]) % 400 == 1).all() and (hay >= 5000).all()  # contiguous, wrapping
        else:
            assert hay.tolist() == (_char_encode(task.noise) * slots)[:slots]
    if name == "number":
        assert all(v.isdigit() and len(v) == task.value_chars for v in values)
    if name == "uuid":
        assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", v) for v in values)
    assert len(set(values)) == 3


def test_text_needle_too_short_is_an_error():
    with pytest.raises(ValueError, match="too short"):
        text_needle_batch(TEXT_NEEDLES["uuid"], _char_encode, torch.arange(100), 1, 60, 0.5, gen())
