"""FLOPs per trained token (forward + backward) and device peaks, for MFU.

What is counted, per token:
- dense: 6 x the parameters used in matmuls (all but the embedding table, norms, W_0 and persistent tokens; the
  LM head is counted even when tied);
- attention: 12 x heads x head_dim x the mean number of visible keys (window/segment, persistent and MAC's
  retrieved tokens) per attention layer (QK^T and AV, forward and backward);
- memory: the chunked scan's matmuls, 3 x the forward count per memory layer. Forward per token: for every memory
  matrix (in x out per head) the keys' forward and backward, the queries' two state products and the chunk-end
  update (6 products in all, 2 in x out FLOPs each), plus the chunk-size terms G o (X A^T) and its product with
  the errors (2 x 2 x chunk x (in + out)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from titans_parallel.config import MEMORY_KINDS, ModelConfig

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity).
PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def flops_per_token(config: ModelConfig, n_params_dense: int, seq_len: int) -> float:
    """Training FLOPs per token of TitansLM(config) on sequences of seq_len; n_params_dense as in the docstring."""
    flops = 6.0 * n_params_dense
    heads, width = config.n_heads, config.head_dim
    m = config.memory
    widths = [width] + [m.expansion * width] * (m.depth - 1) + [width]
    memory_matrix = sum(widths[i] * widths[i + 1] for i in range(m.depth))
    memory_vectors = sum(widths[i] + widths[i + 1] for i in range(m.depth))
    memory_forward = heads * (6 * 2 * memory_matrix + 4 * m.chunk_size * memory_vectors)
    for kind in config.layer_pattern:
        if kind in MEMORY_KINDS:
            flops += 3 * memory_forward
        if kind == "attn":
            keys = seq_len / 2
        elif kind == "mac":
            keys = config.n_persistent + config.window  # persistent + retrieved (half) + segment (half)
        elif kind in ("mag", "mal", "swa"):
            keys = config.n_persistent + min(config.window, seq_len / 2)
        else:
            continue
        flops += 12 * heads * width * keys
    return flops


def _shape(param: torch.Tensor) -> torch.Size:
    """A parameter's full shape on this rank, also under ZeRO-3 (which leaves an empty tensor and keeps the shape
    in `ds_shape`)."""
    return getattr(param, "ds_shape", param.shape)


@dataclass(frozen=True)
class ParameterCounts:
    total: int  # every parameter of the model (all TP shards together)
    dense: int  # used in matmuls, as in the module docstring (what the 6 x N term counts)
    embedding: int  # the token embedding table


def parameter_counts(model: torch.nn.Module, tp_size: int = 1) -> ParameterCounts:
    """Counts of the whole model from one rank: a TP-sharded parameter (`tensor_model_parallel`) counts tp_size
    times, a replicated one once; ZeRO-3 partitioning does not change them."""
    def size(param: torch.Tensor) -> int:
        return _shape(param).numel() * (tp_size if getattr(param, "tensor_model_parallel", False) else 1)

    skip = ("tok_embeddings", "norm", "initial_weights", "persistent")
    params = list(model.named_parameters())
    dense = sum(size(p) for name, p in params if len(_shape(p)) >= 2 and not any(s in name for s in skip))
    embedding = size(model.tok_embeddings.weight)
    if model.config.tie_embeddings:
        dense += embedding
    return ParameterCounts(total=sum(size(p) for _, p in params), dense=dense, embedding=embedding)


def dense_parameter_count(model: torch.nn.Module) -> int:
    """Parameters used in matmuls on this rank (see the module docstring), counting a tied LM head once more."""
    return parameter_counts(model).dense


def device_peak_flops(precision: str, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of this rank's device, or None (CPU, or an unknown GPU without logging.peak_tflops)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if not torch.cuda.is_available() or precision != "bf16":
        return None
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS_BF16.items() if key in name), None)
