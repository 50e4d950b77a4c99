"""A model's tensor-parallel layout, read from the marks its layers put on their parameters.

Every sharded parameter carries megatron's `tensor_model_parallel` / `partition_dim` marks, set by the factories in
`layers` (and by megatron's own layers) whatever the TP degree, so the layout can be read off any build of the
model: a TP=1 model on the meta device gives the same layout as the TP=N model on a training rank. Nothing here
keeps a list of parameter names.
"""

from __future__ import annotations

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
