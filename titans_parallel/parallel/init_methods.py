"""Weight initialisers the layer factories take (`init_method`): in-place functions of a full fp32 weight."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

InitMethod = Callable[[torch.Tensor], object]


def normal_init(std: float = 0.02) -> InitMethod:
    """In-place N(0, std²) initialiser."""
    return partial(nn.init.normal_, mean=0.0, std=std)


DEFAULT_INIT = normal_init(0.02)
