"""Flush-to-zero for CPU float math, set once by every entry point that trains, evaluates or times a model.

The memory's backward carries gradients through its momentum and forgetting chain, a product of per-token factors
below 1; over thousands of tokens they decay into the fp32 denormal range (below 1.2e-38), where x86 arithmetic
is tens of times slower. With flush-to-zero (and denormals-are-zero) on, such values become 0: the result changes
only below 1.2e-38 (fp32) / 2.2e-308 (fp64), and MAC's backward stops slowing down with T (docs/long_context.md).
CUDA is unaffected (`torch.set_flush_denormal` sets the CPU's flags).
"""

import torch


def flush_denormals() -> None:
    """Set flush-to-zero for this process's CPU float math (a no-op on CPUs without the SSE3 flags)."""
    torch.set_flush_denormal(True)
