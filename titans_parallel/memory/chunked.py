"""The chunked dual form of the memory scan (DESIGN.md section 2): all tokens of a chunk at once, with matmuls.

Per chunk (length C, start state W, S) and per layer l, with X the queries' activations entering layer l:
    Zq_l = b * (X W_l) + f * (X S_l) - (G o (X A_{l-1}^T)) Delta_l = [b*X, f*X] [W_l; S_l] - (G o (X A^T)) Delta_l
where A, Delta are the keys' activations and back-propagated errors at W. The state of layer l is kept stacked as
M_l = [W_l; S_l] ([BH, 2 in_l, out_l]) so both retrieval terms and the chunk-end update are single matmuls. Every
coefficient depends on the gates only, so all chunks' coefficients (and the first layer's query-side products) are
computed at once before the sequential loop over chunks.
"""

from __future__ import annotations

import torch

from .state import GATE_EPS, MemoryState, check_scan_args


def _activation_grad(activation: str, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """sigma'(z) given a = sigma(z), written with differentiable ops (outer gradients flow through it)."""
    if activation == "silu":
        s = torch.sigmoid(z)
        return torch.addcmul(a, a, s, value=-1) + s  # s + a (1 - s)
    c = 0.7978845608028654  # gelu (tanh approximation); sqrt(2 / pi)
    t = torch.tanh(c * (z + 0.044715 * z**3))
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * 0.044715 * z * z)


def _activation(activation: str, z: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(z) if activation == "silu" else torch.nn.functional.gelu(z, approximate="tanh")


class ChunkCoefficients:
    """Gate-only coefficients of N chunks of C tokens, for a flattened batch*heads dimension BH.

    retrieval [BH, N, C, 2, 1]: (b, f), the coefficients of W and S in each token's weights (rows shifted down one
    for exclusive retrieval); mixing [BH, N, C, C]: G = (P R) diag(theta), likewise shifted;
    end_state [BH, N, 2, 2]: [[b_end, f_end], [0, exp(L_eta_end)]] mapping (W, S) to the chunk-end state;
    end_updates [BH, N, 2, C, 1]: (g, m), the weights of each token's inner gradient in the chunk-end W and S.
    The chunk end is the last real token (the final chunk may be padded).
    """

    def __init__(self, theta: torch.Tensor, eta: torch.Tensor, alpha: torch.Tensor, last: int, retrieve: str):
        C = theta.shape[-1]
        log_keep = torch.cumsum(torch.log((1 - alpha).clamp(GATE_EPS, 1.0)), dim=-1)
        log_eta = torch.cumsum(torch.log(eta.clamp(GATE_EPS, 1.0)), dim=-1)
        causal = torch.ones(C, C, dtype=torch.bool, device=theta.device).tril()
        P = torch.exp((log_keep[..., :, None] - log_keep[..., None, :]).masked_fill(~causal, float("-inf")))
        R = torch.exp((log_eta[..., :, None] - log_eta[..., None, :]).masked_fill(~causal, float("-inf")))
        G = (P @ R) * theta[..., None, :]
        b = torch.exp(log_keep)
        f = (P @ torch.exp(log_eta)[..., None]).squeeze(-1)

        rows = torch.full(theta.shape[-2:-1], C - 1, dtype=torch.long, device=theta.device)
        rows[-1] = last
        pick = rows.view(1, -1, 1)
        end_log_eta = torch.take_along_dim(log_eta, pick, dim=-1)
        upto = torch.arange(C, device=theta.device) <= rows[:, None]
        end_g = torch.take_along_dim(G, pick[..., None], dim=-2).squeeze(-2)
        end_m = theta * torch.exp((end_log_eta - log_eta).masked_fill(~upto, float("-inf")))
        top = torch.cat([torch.take_along_dim(b, pick, dim=-1), torch.take_along_dim(f, pick, dim=-1)], dim=-1)
        bottom = torch.cat([torch.zeros_like(end_log_eta), torch.exp(end_log_eta)], dim=-1)
        self.end_state = torch.stack([top, bottom], dim=-2)
        self.end_updates = torch.stack([end_g, end_m], dim=-2)[..., None]

        if retrieve == "exclusive":
            b = torch.cat([torch.ones_like(b[..., :1]), b[..., :-1]], dim=-1)
            f = torch.cat([torch.zeros_like(f[..., :1]), f[..., :-1]], dim=-1)
            G = torch.cat([torch.zeros_like(G[..., :1, :]), G[..., :-1, :]], dim=-2)
        self.retrieval = torch.stack([b, f], dim=-1)[..., None]
        self.mixing = G


def memory_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    state: MemoryState,
    chunk_size: int = 16,
    retrieve: str = "inclusive",
    activation: str = "silu",
) -> tuple[torch.Tensor, MemoryState]:
    """Run the neural memory over a sequence; returns (y [B, H, T, d_out] in q's dtype, state at the end).

    q, k: [B, H, T, d]; v: [B, H, T, d_out]; theta, eta, alpha: [B, H, T] (theta already scaled);
    state: MemoryState with W_l, S_l [B, H, in_l, out_l]. Chunks of `chunk_size` tokens are counted from the first
    token of the call; T need not be a multiple of it. Computation and the returned state are fp32 (fp64 for fp64
    inputs). Differentiable in every input and in the state. No per-token weights are ever materialised.
    """
    check_scan_args(q, k, v, theta, eta, alpha, state, chunk_size, retrieve, activation)
    B, H, T, _ = q.shape
    out_dtype, dtype = q.dtype, torch.promote_types(q.dtype, torch.float32)
    widths = [w.shape[-2] for w in state.weights]
    stacked = [torch.cat([w, s], dim=-2).to(dtype).flatten(0, 1) for w, s in zip(state.weights, state.momentum)]
    if T > 0:
        y, stacked = _scan_chunks(q, k, v, theta, eta, alpha, stacked, chunk_size, retrieve, activation, dtype)
    else:
        y = q.new_zeros(B, H, 0, v.shape[-1])
    weights = tuple(m[:, :n].unflatten(0, (B, H)) for m, n in zip(stacked, widths))
    momentum = tuple(m[:, n:].unflatten(0, (B, H)) for m, n in zip(stacked, widths))
    return y.to(out_dtype), MemoryState(weights, momentum)


def _scan_chunks(q, k, v, theta, eta, alpha, stacked, chunk_size, retrieve, activation, dtype):
    """The sequential loop over chunks on [BH, ...] tensors; `stacked` holds M_l = [W_l; S_l] per layer."""
    B, H, T, d = q.shape
    C = min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T

    def chunks(x: torch.Tensor, fill: float) -> torch.Tensor:
        x = x.to(dtype).flatten(0, 1)
        if pad:
            x = torch.cat([x, x.new_full((x.shape[0], pad, *x.shape[2:]), fill)], dim=1)
        return x.view(B * H, N, C, *x.shape[2:])

    qc, kc, vc = chunks(q, 0.0), chunks(k, 0.0), chunks(v, 0.0)
    coef = ChunkCoefficients(chunks(theta, 0.0), chunks(eta, 1.0), chunks(alpha, 0.0), (T - 1) % C, retrieve)
    L = len(stacked)
    # First layer's query side for every chunk at once: [b*q, f*q] and G o (q k^T).
    first_left = (qc[..., None, :] * coef.retrieval).flatten(-2)
    first_scores = coef.mixing * (qc @ kc.transpose(-1, -2))
    per_chunk = zip(
        kc.unbind(1), (-2 * vc).unbind(1), qc.unbind(1), first_left.unbind(1), first_scores.unbind(1),
        coef.retrieval.unbind(1), coef.mixing.unbind(1), coef.end_state.unbind(1), coef.end_updates.unbind(1),
    )
    outputs = []
    for k_n, neg2v_n, q_n, left_n, scores_n, retrieval_n, mixing_n, end_state_n, end_updates_n in per_chunk:
        weights = [m[:, : m.shape[1] // 2] for m in stacked]
        # Keys forward at the chunk-start weights, then one backward pass for the per-layer errors Delta_l.
        acts, pres = [k_n], []
        for layer in range(L - 1):
            pres.append(acts[-1] @ weights[layer])
            acts.append(_activation(activation, pres[-1]))
        deltas = [torch.baddbmm(neg2v_n, acts[-1], weights[-1], alpha=2)]  # 2 (f(k) - v)
        for layer in range(L - 1, 0, -1):
            back = deltas[0] @ weights[layer].transpose(-1, -2)
            deltas.insert(0, back * _activation_grad(activation, pres[layer - 1], acts[layer]))

        x = q_n
        for layer in range(L):
            if retrieve == "chunk":
                z = x @ weights[layer]
            else:
                if layer > 0:
                    left_n = (x[..., None, :] * retrieval_n).flatten(-2)
                    scores_n = mixing_n * (x @ acts[layer].transpose(-1, -2))
                z = torch.baddbmm(left_n @ stacked[layer], scores_n, deltas[layer], alpha=-1)
            x = _activation(activation, z) if layer < L - 1 else z
        outputs.append(x)

        new_stacked = []
        for layer, m in enumerate(stacked):
            n_in = m.shape[1] // 2
            mixed = (end_state_n @ m.view(B * H, 2, -1)).view_as(m)
            updates = acts[layer].transpose(-1, -2)[:, None] @ (end_updates_n * deltas[layer][:, None])
            new_stacked.append(mixed - updates.view(B * H, 2 * n_in, -1))
        stacked = new_stacked
    y = torch.stack(outputs, dim=1).view(B, H, N * C, -1)[:, :, :T]
    return y, stacked
