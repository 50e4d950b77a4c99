"""A model's tensor-parallel layout, read from the marks its layers put on their parameters, and what DeepSpeed's
universal checkpoint needs to know about it.

Every sharded parameter carries megatron's `tensor_model_parallel` / `partition_dim` marks, set by the factories in
`layers` (and by megatron's own layers) whatever the TP degree, so the layout can be read off any build of the
model: a TP=1 model on the meta device gives the same layout as the TP=N model on a training rank. Nothing here
keeps a list of parameter names.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn


def tensor_parallel_layout(model: nn.Module) -> dict[str, int | None]:
    """Parameter name -> the dimension it is split along over TP ranks (contiguous blocks, rank order), or None
    for a parameter replicated on every TP rank. Tied parameters are listed under every name (state-dict keys)."""
    return {
        name: param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
        for name, param in model.named_parameters(remove_duplicate=False)
    }


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """alias -> source for parameters registered under more than one name (e.g. a tied LM head):
    the source is the first name, the one `named_parameters()` keeps."""
    first: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied


def universal_checkpoint_info(model: nn.Module) -> dict[str, Any]:
    """The `universal_checkpoint_info` client state that `deepspeed.checkpoint.ds_to_universal` reads to merge TP
    slices, derived from `tensor_parallel_layout`: replicated parameters (checked equal across TP ranks and kept
    once), row-parallel ones (partition_dim 1: concatenated along dim 1); the rest are concatenated along dim 0,
    DeepSpeed's default. Patterns are anchored regexes over parameter names with layer indices generalised
    (`\\d+`) where that stays unambiguous. The vocabulary is never padded (tp divides it), so no vocabulary
    patterns. Raises NotImplementedError for a partition dim DeepSpeed cannot express (> 1)."""
    from deepspeed.checkpoint import constants as ds

    full = tensor_parallel_layout(model)
    layout = {name: full[name] for name, _ in model.named_parameters()}  # tied aliases are not optimizer params
    odd = {name: dim for name, dim in layout.items() if dim not in (None, 0, 1)}
    if odd:
        raise NotImplementedError(f"universal checkpoints only concatenate along dim 0 or 1; got {odd}")
    patterns = _patterns(layout)
    return {
        ds.UNIVERSAL_CHECKPOINT_VERSION_KEY: ds.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        ds.TP_REPLICATED_PARAMETER_PATTERNS: patterns[None],
        ds.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: patterns[1],
    }


def _patterns(layout: dict[str, int | None]) -> dict[int | None, list[str]]:
    """Anchored regexes per partition dim (None, 1): a name's numeric components generalised to `\\d+` unless the
    general pattern would also match a name of another class, then the exact name."""
    general = {name: "^" + re.sub(r"(?<=\\\.)\d+(?=\\\.|$)", r"\\d+", re.escape(name)) + "$" for name in layout}
    classes: dict[str, set] = {}
    for name, dim in layout.items():
        classes.setdefault(general[name], set()).add(dim)
    out: dict[int | None, set[str]] = {None: set(), 1: set()}
    for name, dim in layout.items():
        if dim in out:
            unique = len(classes[general[name]]) == 1
            out[dim].add(general[name] if unique else "^" + re.escape(name) + "$")
    return {dim: sorted(patterns) for dim, patterns in out.items()}
