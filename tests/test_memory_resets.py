"""Document resets in the memory scan: every document of a packed row is scanned as if the row began there."""

import pytest
import torch

from test_memory_scan import ALL_STABILISERS, STABILISERS, B, make_inputs, max_state_diff
from titans_parallel.memory import MemoryState, memory_scan, memory_scan_reference

RETRIEVES = ["inclusive", "exclusive", "chunk"]
# Reset positions per batch row, for each chunk size: row 0 resets at 0 and inside a chunk; row 1 on a chunk
# boundary of its first document's grid and twice inside one chunk of the next (C = 1: a one-token document).
RESETS = {1: ([0, 3], [7, 8, 10]), 4: ([0, 6], [8, 13, 14]), 16: ([0, 5], [16, 20, 22])}
LENGTHS = {1: 13, 4: 23, 16: 37}  # not multiples of C > 1


def reset_mask(T: int, rows: tuple[list[int], ...]) -> torch.Tensor:
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, positions in enumerate(rows):
        mask[b, positions] = True
    return mask


def make_reset_state(depth: int, seed: int = 20) -> MemoryState:
    """A W_0-like reset state with zero momentum, distinct from the fixtures' start state."""
    _, state = make_inputs(T=1, depth=depth, seed=seed)
    return MemoryState.from_weights(state.weights)


def documents(mask: torch.Tensor, b: int) -> list[tuple[int, int]]:
    """(start, end) of row b's documents that begin at a reset (the tokens before the first one are not one)."""
    starts = mask[b].nonzero().flatten().tolist()
    return list(zip(starts, starts[1:] + [mask.shape[1]]))


def row(state: MemoryState, b: int) -> MemoryState:
    return MemoryState(tuple(w[b : b + 1] for w in state.weights), tuple(s[b : b + 1] for s in state.momentum))


def loss_and_grads(scan, inputs: dict, state: MemoryState, reset_state: MemoryState, **options) -> dict:
    """Gradients of a random linear function of (y, end state) w.r.t. every input, the state and the reset state."""
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    states = {
        name: MemoryState(tuple(t.clone().requires_grad_() for t in st.weights),
                          tuple(t.clone().requires_grad_() for t in st.momentum))
        for name, st in (("state", state), ("reset", reset_state))
    }
    y, end = scan(**leaves, state=states["state"], reset_state=states["reset"], **options)
    g = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in (y, *end.weights, *end.momentum))
    names = list(leaves) + [f"{n}.{part}{i}" for n, st in states.items() for part in ("W", "S") for i in
                            range(len(st.weights))]
    tensors = list(leaves.values()) + [t for st in states.values() for t in st.weights + st.momentum]
    return dict(zip(names, torch.autograd.grad(loss, tensors, allow_unused=True)))


def assert_close(ours: dict, ref: dict) -> None:
    for name, r in ref.items():
        assert (ours[name] is None) == (r is None), name
        if r is not None:
            assert (ours[name] - r).abs().max().item() <= 1e-10 * (r.abs().max().item() + 1.0), name


@pytest.mark.parametrize("options", [{}, ALL_STABILISERS])
@pytest.mark.parametrize("retrieve", RETRIEVES)
@pytest.mark.parametrize("chunk_size", [1, 4])
def test_token_loop_scans_each_document_alone(chunk_size, retrieve, options):
    """The spec against itself: with resets, each document's outputs (and the last one's end state) are those of
    the token loop on that document alone from the reset state; the tokens before the first reset are the plain
    call's (row 1)."""
    T, mask = LENGTHS[chunk_size], reset_mask(LENGTHS[chunk_size], RESETS[chunk_size])
    inputs, state = make_inputs(T=T, depth=2, seed=21)
    reset_state = make_reset_state(2)
    kw = dict(chunk_size=chunk_size, retrieve=retrieve, **options)
    y, end = memory_scan_reference(**inputs, state=state, resets=mask, reset_state=reset_state, **kw)
    y_plain, _ = memory_scan_reference(**inputs, state=state, **kw)
    for b in range(B):
        first = documents(mask, b)[0][0]
        assert torch.allclose(y[b, :, :first], y_plain[b, :, :first], rtol=0, atol=1e-12)
        for start, stop in documents(mask, b):
            alone = {n: t[b : b + 1, :, start:stop] for n, t in inputs.items()}
            y_doc, end_doc = memory_scan_reference(**alone, state=row(reset_state, b), **kw)
            assert (y[b : b + 1, :, start:stop] - y_doc).abs().max().item() <= 1e-10, (b, start)
        assert max_state_diff(row(end, b), end_doc) <= 1e-10


@pytest.mark.parametrize("options", [{}] + STABILISERS, ids=["paper", "polyak", "ema", "normalize", "all", "bounded"])
@pytest.mark.parametrize("retrieve", RETRIEVES)
@pytest.mark.parametrize("chunk_size", [1, 4, 16])
def test_chunked_matches_token_loop_with_resets(chunk_size, retrieve, options):
    """memory_scan with resets (explicit backward): outputs, end state and the gradients of every input, of the
    start state and of the reset state equal the token loop's. Row 0 resets at token 0, so it never reads
    `state`."""
    T, mask = LENGTHS[chunk_size], reset_mask(LENGTHS[chunk_size], RESETS[chunk_size])
    inputs, state = make_inputs(T=T, depth=2, seed=22)
    reset_state = make_reset_state(2)
    kw = dict(chunk_size=chunk_size, retrieve=retrieve, resets=mask, **options)
    y, end = memory_scan(**inputs, state=state, reset_state=reset_state, **kw)
    y_ref, end_ref = memory_scan_reference(**inputs, state=state, reset_state=reset_state, **kw)
    assert (y - y_ref).abs().max().item() <= 1e-10
    assert max_state_diff(end, end_ref) <= 1e-10
    ours = loss_and_grads(memory_scan, inputs, state, reset_state, **kw)
    ref = loss_and_grads(memory_scan_reference, inputs, state, reset_state, **kw)
    assert_close(ours, ref)
    assert ours["state.W0"][0].abs().max() == 0 and ours["state.W0"][1].abs().max() > 0
    assert ours["reset.W0"].abs().min(-1).values.min() > 0


@pytest.mark.parametrize("options", [{}, ALL_STABILISERS])
@pytest.mark.parametrize("chunk_size", [4, 16])
def test_autograd_backward_matches_token_loop_with_resets(chunk_size, options):
    T, mask = LENGTHS[chunk_size], reset_mask(LENGTHS[chunk_size], RESETS[chunk_size])
    inputs, state = make_inputs(T=T, depth=2, seed=23)
    reset_state = make_reset_state(2)
    kw = dict(chunk_size=chunk_size, resets=mask, **options)
    ours = loss_and_grads(lambda **a: memory_scan(**a, backward="autograd"), inputs, state, reset_state, **kw)
    assert_close(ours, loss_and_grads(memory_scan_reference, inputs, state, reset_state, **kw))


@pytest.mark.parametrize("options", [{}] + STABILISERS, ids=["paper", "polyak", "ema", "normalize", "all", "bounded"])
@pytest.mark.parametrize("retrieve", RETRIEVES)
def test_explicit_backward_matches_autograd_with_resets(retrieve, options):
    """Depth 3, chunk 8, T = 45 with resets scattered over both rows (one at the last token)."""
    mask = reset_mask(45, ([3, 11, 12, 30], [8, 16, 17, 18, 44]))
    inputs, state = make_inputs(T=45, depth=3, seed=24)
    reset_state = make_reset_state(3)
    kw = dict(chunk_size=8, retrieve=retrieve, resets=mask, **options)
    explicit = loss_and_grads(memory_scan, inputs, state, reset_state, **kw)
    autograd = loss_and_grads(lambda **a: memory_scan(**a, backward="autograd"), inputs, state, reset_state, **kw)
    assert_close(explicit, autograd)


@pytest.mark.parametrize("options", [{}, ALL_STABILISERS])
def test_chunked_scans_a_document_inside_a_chunk_as_if_alone(options):
    """The contract on memory_scan directly: document B starting inside a 16-token chunk of A."""
    inputs, state = make_inputs(T=40, depth=2, seed=25)
    reset_state = make_reset_state(2)
    mask = reset_mask(40, ([21], [9]))
    y, end = memory_scan(**inputs, state=state, chunk_size=16, resets=mask, reset_state=reset_state, **options)
    for b, start in ((0, 21), (1, 9)):
        alone = {n: t[b : b + 1, :, start:] for n, t in inputs.items()}
        y_doc, end_doc = memory_scan(**alone, state=row(reset_state, b), chunk_size=16, **options)
        assert (y[b : b + 1, :, start:] - y_doc).abs().max().item() <= 1e-10
        assert max_state_diff(row(end, b), end_doc) <= 1e-10


@pytest.mark.parametrize("backward", ["explicit", "autograd"])
def test_no_resets_is_the_plain_scan(backward):
    """An all-False mask computes what resets=None does (the grid is the plain one)."""
    inputs, state = make_inputs(T=23, depth=2, seed=26)
    reset_state = make_reset_state(2)
    kw = dict(chunk_size=4, backward=backward, **ALL_STABILISERS)
    plain = loss_and_grads(lambda reset_state, **a: memory_scan(**a), inputs, state, reset_state, **kw)
    masked = loss_and_grads(memory_scan, inputs, state, reset_state, resets=torch.zeros(B, 23, dtype=torch.bool), **kw)
    for name, g in plain.items():
        if g is None:
            assert masked[name] is None or masked[name].abs().max() == 0, name
        else:
            assert (masked[name] - g).abs().max().item() <= 1e-12, name


def test_normalized_weights_keep_the_reset_weights_column_norms():
    inputs, state = make_inputs(T=23, depth=2, seed=27)
    reset_state = make_reset_state(2)
    mask = reset_mask(23, ([5], [0, 17]))
    _, end = memory_scan(**inputs, state=state, chunk_size=4, resets=mask, reset_state=reset_state,
                         normalize_weights=True)
    for w_reset, w0, w in zip(reset_state.weights, state.weights, end.weights):
        assert (w.norm(dim=-2) - w_reset.norm(dim=-2)).abs().max().item() <= 1e-12
        assert (w.norm(dim=-2) - w0.norm(dim=-2)).abs().max().item() > 1e-3


@pytest.mark.parametrize("T,chunk_size,rows", [(5, 16, ([2], [4])), (1, 4, ([0], [])), (9, 4, ([8], [1, 2, 3]))])
def test_short_rows_and_one_token_documents(T, chunk_size, rows):
    inputs, state = make_inputs(T=T, depth=2, seed=28)
    reset_state = make_reset_state(2)
    kw = dict(chunk_size=chunk_size, resets=reset_mask(T, rows), **ALL_STABILISERS)
    assert_close(loss_and_grads(memory_scan, inputs, state, reset_state, **kw),
                 loss_and_grads(memory_scan_reference, inputs, state, reset_state, **kw))


def test_float32_with_resets_tracks_float64():
    """fp32 inputs and states: the explicit path's outputs and end state within 1e-5 of float64 on the same values."""
    inputs, state = make_inputs(T=40, depth=2, seed=30)
    reset_state = make_reset_state(2)
    kw = dict(chunk_size=16, resets=reset_mask(40, ([5, 21], [0, 33])), **ALL_STABILISERS)
    single = lambda st: MemoryState(*[tuple(t.float() for t in ts) for ts in st])  # noqa: E731
    y, end = memory_scan(**{n: t.float() for n, t in inputs.items()}, state=single(state),
                         reset_state=single(reset_state), **kw)
    exact = {n: t.float().double() for n, t in inputs.items()}
    y_exact, end_exact = memory_scan(**exact, state=single(state), reset_state=single(reset_state), **kw)
    assert y.dtype == torch.float32 and y_exact.dtype == torch.float64
    scale = y_exact.abs().max().item()
    assert (y.double() - y_exact).abs().max().item() <= 1e-5 * scale
    assert max_state_diff(MemoryState(*[tuple(t.double() for t in ts) for ts in end]), end_exact) <= 1e-5 * scale


def test_bad_reset_arguments_are_named():
    inputs, state = make_inputs(T=8, depth=2)
    mask = torch.zeros(B, 8, dtype=torch.bool)
    for scan in (memory_scan, memory_scan_reference):
        with pytest.raises(ValueError, match="bool mask"):
            scan(**inputs, state=state, resets=mask.long(), reset_state=state)
        with pytest.raises(ValueError, match="bool mask"):
            scan(**inputs, state=state, resets=mask[:, :4], reset_state=state)
        with pytest.raises(ValueError, match="reset_state"):
            scan(**inputs, state=state, resets=mask)
        with pytest.raises(ValueError, match="shaped like state"):
            scan(**inputs, state=state, resets=mask, reset_state=MemoryState(state.weights[:1], state.momentum[:1]))


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, ALL_STABILISERS])
def test_compiled_chunk_steps_with_resets(options):
    """compile=True: the restarts and the grid live outside the compiled chunk steps, so resets compile as is."""
    T, mask = LENGTHS[4], reset_mask(LENGTHS[4], RESETS[4])
    inputs, state = make_inputs(T=T, depth=2, seed=29)
    reset_state = make_reset_state(2)
    kw = dict(chunk_size=4, resets=mask, **options)
    ours = loss_and_grads(lambda **a: memory_scan(**a, compile=True), inputs, state, reset_state, **kw)
    assert_close(ours, loss_and_grads(memory_scan_reference, inputs, state, reset_state, **kw))
