"""memory_scan (chunked dual form) against memory_scan_reference (token loop with autograd inner gradients)."""

import pytest
import torch

from titans_parallel.memory import MemoryState, memory_scan, memory_scan_reference

B, H, D = 2, 2, 4
F64 = torch.float64


def make_inputs(T, depth, seed=0, expansion=2, dtype=F64, eta_scale=1.0, alpha_scale=0.2, momentum_scale=0.1):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    q, k, v = rand(B, H, T, D), rand(B, H, T, D), rand(B, H, T, D)
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    theta = 0.2 * torch.rand(B, H, T, generator=g, dtype=F64)
    eta = 0.9 * eta_scale * torch.rand(B, H, T, generator=g, dtype=F64)
    alpha = alpha_scale * torch.rand(B, H, T, generator=g, dtype=F64)
    widths = [D] + [expansion * D] * (depth - 1) + [D]
    weights = tuple(rand(B, H, widths[i], widths[i + 1]) / widths[i] ** 0.5 for i in range(depth))
    momentum = tuple(momentum_scale * rand(*w.shape) for w in weights)
    tensors = dict(q=q, k=k, v=v, theta=theta, eta=eta, alpha=alpha)
    return {n: t.to(dtype) for n, t in tensors.items()}, MemoryState(weights, momentum)


def max_state_diff(a: MemoryState, b: MemoryState) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.weights + a.momentum, b.weights + b.momentum))


@pytest.mark.parametrize("retrieve", ["inclusive", "exclusive", "chunk"])
@pytest.mark.parametrize("chunk_size", [1, 3, 16])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_forward_matches_token_loop(depth, chunk_size, retrieve):
    inputs, state = make_inputs(T=37, depth=depth)  # 37: not a multiple of 3 or 16
    y, new_state = memory_scan(**inputs, state=state, chunk_size=chunk_size, retrieve=retrieve)
    y_ref, ref_state = memory_scan_reference(**inputs, state=state, chunk_size=chunk_size, retrieve=retrieve)
    assert y.shape == y_ref.shape == (B, H, 37, D)
    assert (y - y_ref).abs().max().item() <= 1e-10
    assert max_state_diff(new_state, ref_state) <= 1e-10


def loss_and_grads(scan, inputs, state, chunk_size, retrieve, activation="silu", **options):
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    w = tuple(t.clone().requires_grad_() for t in state.weights)
    s = tuple(t.clone().requires_grad_() for t in state.momentum)
    y, out_state = scan(
        **leaves, state=MemoryState(w, s), chunk_size=chunk_size, retrieve=retrieve, activation=activation, **options
    )
    g = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
    loss = loss + sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in out_state.weights + out_state.momentum)
    grads = torch.autograd.grad(loss, list(leaves.values()) + list(w) + list(s))
    return dict(zip(list(leaves) + [f"W{i}" for i in range(len(w))] + [f"S{i}" for i in range(len(s))], grads))


@pytest.mark.parametrize("retrieve", ["inclusive", "exclusive", "chunk"])
@pytest.mark.parametrize("depth,chunk_size", [(1, 3), (2, 1), (2, 4), (3, 16)])
def test_gradients_match_token_loop(depth, chunk_size, retrieve):
    inputs, state = make_inputs(T=19, depth=depth, seed=2)
    ours = loss_and_grads(memory_scan, inputs, state, chunk_size, retrieve)
    ref = loss_and_grads(memory_scan_reference, inputs, state, chunk_size, retrieve)
    for name in ref:
        scale = ref[name].abs().max().item() + 1.0
        assert (ours[name] - ref[name]).abs().max().item() <= 1e-10 * scale, name


ALL_STABILISERS = dict(polyak_step=True, momentum_ema=True, normalize_weights=True)
BOUNDED = dict(ALL_STABILISERS, power_steps=2)  # with the bounded step
STABILISERS = [dict(polyak_step=True), dict(momentum_ema=True), dict(normalize_weights=True), ALL_STABILISERS,
               dict(polyak_step=True, power_steps=3)]


@pytest.mark.parametrize("options", STABILISERS)
@pytest.mark.parametrize("retrieve", ["inclusive", "exclusive", "chunk"])
@pytest.mark.parametrize("depth,chunk_size", [(1, 1), (1, 3), (2, 4), (3, 16)])
def test_stabilisers_match_token_loop(depth, chunk_size, retrieve, options):
    """Outputs, end state and every gradient of the stabilised rule (the Polyak factor differentiated through)
    equal the token loop's, with a padded last chunk (T=19)."""
    inputs, state = make_inputs(T=19, depth=depth, seed=10)
    y, end = memory_scan(**inputs, state=state, chunk_size=chunk_size, retrieve=retrieve, **options)
    y_ref, end_ref = memory_scan_reference(**inputs, state=state, chunk_size=chunk_size, retrieve=retrieve, **options)
    assert (y - y_ref).abs().max().item() <= 1e-10
    assert max_state_diff(end, end_ref) <= 1e-10
    ours = loss_and_grads(memory_scan, inputs, state, chunk_size, retrieve, **options)
    ref = loss_and_grads(memory_scan_reference, inputs, state, chunk_size, retrieve, **options)
    for name in ref:
        scale = ref[name].abs().max().item() + 1.0
        assert (ours[name] - ref[name]).abs().max().item() <= 1e-10 * scale, name


@pytest.mark.parametrize("options", STABILISERS)
def test_stabilisers_change_the_rule(options):
    """Each option computes something else than the paper's rule (so the tests above compare a real change)."""
    inputs, state = make_inputs(T=19, depth=2, seed=10)
    y, _ = memory_scan(**inputs, state=state, chunk_size=4)
    y_opt, _ = memory_scan(**inputs, state=state, chunk_size=4, **options)
    assert (y - y_opt).abs().max().item() > 1e-3


def test_bounded_step_converges_to_the_largest_curvature():
    """With many power steps a token's factor is 1 / (2 (lambda_max(J J^T) + rho)), J = df(k; W)/dW from
    torch.func.jacrev and lambda_max from eigvalsh: one step from W_0 (theta 1, no momentum or forgetting)."""
    inputs, state = make_inputs(T=1, depth=3, seed=14, momentum_scale=0.0)
    ones, zeros = torch.ones_like(inputs["theta"]), torch.zeros_like(inputs["theta"])
    inputs = {**inputs, "theta": ones, "eta": zeros, "alpha": zeros}
    y, _ = memory_scan(**inputs, state=state, chunk_size=1, polyak_step=True, power_steps=200)
    y_polyak, _ = memory_scan(**inputs, state=state, chunk_size=1, polyak_step=True)
    k, v, q = (inputs[n][..., 0, :] for n in ("k", "v", "q"))  # [B, H, d]

    def mlp(x, weights):
        for layer, w in enumerate(weights):
            x = x @ w
            x = torch.nn.functional.silu(x) if layer < len(weights) - 1 else x
        return x

    rho = 1e-2  # state.POLYAK_CURVATURE_FLOOR
    for b in range(B):
        for h in range(H):
            w0 = tuple(w[b, h] for w in state.weights)
            jac = torch.func.jacrev(lambda *ws: mlp(k[b, h], ws), argnums=tuple(range(len(w0))))(*w0)
            J = torch.cat([j.flatten(1) for j in jac], dim=1)  # [d_out, all weights]
            c = 1 / (2 * (torch.linalg.eigvalsh(J @ J.T)[-1] + rho))
            step = -c * 2 * (J.T @ (mlp(k[b, h], w0) - v[b, h]))
            sizes = [w.numel() for w in w0]
            w1 = tuple(w + s.view_as(w) for w, s in zip(w0, step.split(sizes)))
            assert (y[b, h, 0] - mlp(q[b, h], w1)).abs().max().item() <= 1e-10
    assert (y - y_polyak).abs().max().item() > 1e-3  # the largest curvature is not the error's


def test_bounded_step_is_the_polyak_step_at_depth_1():
    """A linear memory's K = |k|^2 I has one curvature, so power steps change nothing."""
    inputs, state = make_inputs(T=19, depth=1, seed=15)
    y, end = memory_scan(**inputs, state=state, chunk_size=4, **ALL_STABILISERS)
    y_bounded, end_bounded = memory_scan(**inputs, state=state, chunk_size=4, **BOUNDED)
    assert (y - y_bounded).abs().max().item() <= 1e-10
    assert max_state_diff(end, end_bounded) <= 1e-10


@pytest.mark.parametrize("options,ratio", [(ALL_STABILISERS, 1e6), (BOUNDED, 1.0)])
def test_bounded_step_keeps_a_deep_memory_differentiable(options, ratio):
    """Depth 4 at theta_max 1 (the sweep's draw, float64, T=1024, chunk 16): the outer gradient explodes with the
    Polyak step (its curvature is the error's, below K's largest) and stays of order one with the bounded step."""
    g = torch.Generator().manual_seed(0)
    T, d = 1024, 32
    q, k = (torch.nn.functional.normalize(torch.randn(1, 1, T, d, generator=g, dtype=F64), dim=-1) for _ in range(2))
    v = torch.randn(1, 1, T, d, generator=g, dtype=F64)
    gates = [torch.sigmoid(torch.randn(1, 1, T, generator=g, dtype=F64) + shift) for shift in (0, 0, -4)]
    widths = [d, 4 * d, 4 * d, 4 * d, d]
    weights = tuple(torch.randn(1, 1, a, b, generator=g, dtype=F64) / a**0.5 for a, b in zip(widths, widths[1:]))
    leaves = [t.requires_grad_() for t in (q, k, v, *gates)]
    y, end = memory_scan(*leaves, MemoryState.from_weights(weights), chunk_size=16, **options)
    loss = y.square().mean() + sum(w.square().mean() for w in end.weights)
    norm = max(grad.norm().item() for grad in torch.autograd.grad(loss, leaves))
    assert (norm > ratio) if options is ALL_STABILISERS else (norm < ratio), norm


def test_normalize_weights_keeps_the_column_norms():
    """Every W_l at the end has the column lengths of the start state, and its directions did change."""
    inputs, state = make_inputs(T=19, depth=3, seed=13)
    _, end = memory_scan(**inputs, state=state, chunk_size=4, normalize_weights=True)
    for w0, w in zip(state.weights, end.weights):
        assert (w.norm(dim=-2) - w0.norm(dim=-2)).abs().max().item() <= 1e-12
        assert (w - w0).abs().max().item() > 1e-3


def test_polyak_step_is_the_delta_rule_for_a_linear_memory():
    """Depth 1, unit keys, theta 1, no momentum or forgetting, chunk 1: one step stores v exactly (W k = v)."""
    inputs, state = make_inputs(T=1, depth=1, seed=11, momentum_scale=0.0)
    ones, zeros = torch.ones_like(inputs["theta"]), torch.zeros_like(inputs["theta"])
    inputs = {**inputs, "theta": ones, "eta": zeros, "alpha": zeros, "q": inputs["k"]}
    y, _ = memory_scan(**inputs, state=state, chunk_size=1, polyak_step=True)
    rho = 1e-2  # state.POLYAK_CURVATURE_FLOOR: the step is 1 / (1 + rho) of the full correction
    expected = inputs["k"] @ state.weights[0] + (inputs["v"] - inputs["k"] @ state.weights[0]) / (1 + rho)
    assert (y - expected).abs().max().item() <= 1e-10


@pytest.mark.parametrize("options", STABILISERS)
def test_stabilised_explicit_backward_matches_autograd(options):
    inputs, state = make_inputs(T=45, depth=2, seed=12)
    explicit = loss_and_grads(memory_scan, inputs, state, 8, "inclusive", **options)
    autograd = loss_and_grads(
        lambda **kw: memory_scan(**kw, backward="autograd"), inputs, state, 8, "inclusive", **options
    )
    for name in autograd:
        scale = autograd[name].abs().max().item() + 1.0
        assert (explicit[name] - autograd[name]).abs().max().item() <= 1e-10 * scale, name


def test_gelu_activation_matches_token_loop():
    inputs, state = make_inputs(T=11, depth=2, seed=3)
    ours = loss_and_grads(memory_scan, inputs, state, 4, "inclusive", activation="gelu")
    ref = loss_and_grads(memory_scan_reference, inputs, state, 4, "inclusive", activation="gelu")
    for name in ref:
        assert (ours[name] - ref[name]).abs().max().item() <= 1e-10 * (ref[name].abs().max().item() + 1.0), name


@pytest.mark.parametrize("options", [{}, ALL_STABILISERS, BOUNDED])
@pytest.mark.parametrize("split", [3, 6, 12, 21])
def test_state_carry_equals_one_call(split, options):
    """With normalize_weights too: the carried state's column norms are the first call's targets."""
    inputs, state = make_inputs(T=29, depth=2, seed=4)
    y, end = memory_scan(**inputs, state=state, chunk_size=3, **options)
    first = {n: t[:, :, :split] for n, t in inputs.items()}
    second = {n: t[:, :, split:] for n, t in inputs.items()}
    y1, mid = memory_scan(**first, state=state, chunk_size=3, **options)
    y2, end2 = memory_scan(**second, state=mid, chunk_size=3, **options)
    assert torch.equal(torch.cat([y1, y2], dim=2), y) or (torch.cat([y1, y2], dim=2) - y).abs().max() <= 1e-12
    assert max_state_diff(end, end2) <= 1e-12


@pytest.mark.parametrize(
    "case",
    [
        dict(T=5, chunk_size=16),  # T < C
        dict(T=1, chunk_size=4),  # a single token
        dict(T=20, chunk_size=4, eta_scale=1e-7),  # eta near 0 (below the clamp)
        dict(T=20, chunk_size=4, eta_scale=1e-3),  # eta small but above the clamp
        dict(T=20, chunk_size=4, alpha_scale=0.0),  # alpha = 0: no forgetting
        dict(T=20, chunk_size=4, momentum_scale=0.0),  # S_0 = 0
    ],
)
def test_edge_cases(case):
    case = dict(case)
    T, chunk_size = case.pop("T"), case.pop("chunk_size")
    inputs, state = make_inputs(T=T, depth=2, seed=5, **case)
    for retrieve in ("inclusive", "exclusive"):
        y, st = memory_scan(**inputs, state=state, chunk_size=chunk_size, retrieve=retrieve)
        y_ref, st_ref = memory_scan_reference(**inputs, state=state, chunk_size=chunk_size, retrieve=retrieve)
        assert torch.isfinite(y).all()
        assert (y - y_ref).abs().max().item() <= 1e-10
        assert max_state_diff(st, st_ref) <= 1e-10


def test_empty_sequence_returns_state_unchanged():
    inputs, state = make_inputs(T=0, depth=2)
    y, st = memory_scan(**inputs, state=state, chunk_size=4)
    assert y.shape == (B, H, 0, D)
    assert max_state_diff(st, state) == 0.0


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_inputs_track_float64(dtype, tol):
    """fp32 / bf16 inputs (state stays fp32): outputs within `tol` relative to the float64 result on the same inputs."""
    inputs, state = make_inputs(T=64, depth=2, seed=6)
    low = {n: t.to(dtype) for n, t in inputs.items()}
    exact_inputs = {n: t.to(F64) for n, t in low.items()}  # same rounded inputs, exact arithmetic
    state32 = MemoryState(tuple(w.float() for w in state.weights), tuple(s.float() for s in state.momentum))
    y, st = memory_scan(**low, state=state32, chunk_size=16)
    y_exact, st_exact = memory_scan(**exact_inputs, state=state, chunk_size=16)
    assert y.dtype == dtype and all(w.dtype == torch.float32 for w in st.weights + st.momentum)
    scale = y_exact.abs().max().item()
    assert (y.to(F64) - y_exact).abs().max().item() <= tol * scale
    assert max_state_diff(MemoryState(*[tuple(t.to(F64) for t in ts) for ts in st]), st_exact) <= tol * scale


def test_bad_arguments_are_named():
    inputs, state = make_inputs(T=8, depth=2)
    with pytest.raises(ValueError, match="theta"):
        memory_scan(**{**inputs, "theta": inputs["theta"][:, :, :4]}, state=state)
    with pytest.raises(ValueError, match="retrieve"):
        memory_scan(**inputs, state=state, retrieve="future")
    with pytest.raises(ValueError, match="activation"):
        memory_scan(**inputs, state=state, activation="tanh")
    with pytest.raises(ValueError, match="state layer 1"):
        memory_scan(**inputs, state=MemoryState(state.weights[:1] + state.weights[:1], state.momentum))
    with pytest.raises(ValueError, match="explicit"):
        memory_scan(**inputs, state=state, backward="autograd", compile=True)
    with pytest.raises(ValueError, match="power_steps must be an int >= 0"):
        memory_scan(**inputs, state=state, polyak_step=True, power_steps=-1)
    for scan in (memory_scan, memory_scan_reference):
        with pytest.raises(ValueError, match="power_steps=2 sets the Polyak step's curvature"):
            scan(**inputs, state=state, power_steps=2)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("retrieve", ["inclusive", "exclusive", "chunk"])
@pytest.mark.parametrize("depth", [1, 2, 4])
def test_explicit_backward_matches_autograd_through_dual_form(depth, retrieve, activation):
    inputs, state = make_inputs(T=45, depth=depth, seed=7)
    explicit = loss_and_grads(memory_scan, inputs, state, 8, retrieve, activation)
    autograd = loss_and_grads(
        lambda **kw: memory_scan(**kw, backward="autograd"), inputs, state, 8, retrieve, activation
    )
    for name in autograd:
        scale = autograd[name].abs().max().item() + 1.0
        assert (explicit[name] - autograd[name]).abs().max().item() <= 1e-10 * scale, name


def test_only_some_outputs_used():
    """Gradients flow when only y, or only the end state, enters the loss."""
    inputs, state = make_inputs(T=10, depth=2, seed=8)
    for pick in (lambda y, st: y.sum(), lambda y, st: st.weights[0].sum()):
        grads = {}
        for mode in ("explicit", "autograd"):
            k = inputs["k"].clone().requires_grad_()
            y, st = memory_scan(**{**inputs, "k": k}, state=state, chunk_size=4, backward=mode)
            grads[mode] = torch.autograd.grad(pick(y, st), k)[0]
        assert (grads["explicit"] - grads["autograd"]).abs().max().item() <= 1e-12


@pytest.mark.slow
@pytest.mark.parametrize(
    "retrieve,options", [("inclusive", {}), ("chunk", {}), ("inclusive", ALL_STABILISERS), ("inclusive", BOUNDED)]
)
def test_compiled_chunk_steps_match_token_loop(retrieve, options):
    """compile=True (torch.compile of each full chunk's forward and backward step) computes the same function:
    outputs, end state and every gradient against the token loop, with a padded last chunk (T=21, C=8)."""
    inputs, state = make_inputs(T=21, depth=2, seed=9)
    compiled = lambda **kw: memory_scan(**kw, compile=True)  # noqa: E731
    y, end = compiled(**inputs, state=state, chunk_size=8, retrieve=retrieve, **options)
    y_ref, end_ref = memory_scan_reference(**inputs, state=state, chunk_size=8, retrieve=retrieve, **options)
    assert (y - y_ref).abs().max().item() <= 1e-10
    assert max_state_diff(end, end_ref) <= 1e-10
    ours = loss_and_grads(compiled, inputs, state, 8, retrieve, **options)
    ref = loss_and_grads(memory_scan_reference, inputs, state, 8, retrieve, **options)
    for name in ref:
        scale = ref[name].abs().max().item() + 1.0
        assert (ours[name] - ref[name]).abs().max().item() <= 1e-10 * scale, name
