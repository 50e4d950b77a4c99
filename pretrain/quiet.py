"""Known harmless library noise, filtered in one place (importing this module installs the warning filters, so
import it before megatron-core or DeepSpeed are loaded).

Every entry is a message that is expected on a correct run and says nothing the user can act on; anything not
listed here is shown as usual, on every rank. `rank_policy(rank)` then keeps ranks other than 0 quiet (their
library INFO logging off; warnings, errors and tracebacks still shown).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import warnings
from collections.abc import Iterator

# (category, regex matched at the start of the message, why it is harmless)
HARMLESS_WARNINGS: list[tuple[type[Warning], str, str]] = [
    (UserWarning, r"Transformer Engine and Apex are not installed",
     "megatron-core falls back to its local kernels; the project uses neither TE nor Apex"),
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
     "DeepSpeed ZeRO calls the old names; same collective"),
]

# Lines libraries print to stdout (regex matched against the whole line).
HARMLESS_LINES: list[tuple[str, str]] = [
    (r"DeepSpeed deepspeed\.ops\.comm\.\w+ built successfully",
     "DeepSpeed's CPU accelerator announces its shared-memory collective op on every rank"),
]


def filter_warnings() -> None:
    for category, message, _ in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def rank_policy(rank: int) -> None:
    """Ranks other than 0 log only warnings and errors (DeepSpeed's INFO lines are rank 0's job)."""
    if rank != 0:
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def is_harmless_line(line: str) -> bool:
    return any(re.fullmatch(pattern, line.strip()) for pattern, _ in HARMLESS_LINES)


@contextlib.contextmanager
def filtered_stdout() -> Iterator[None]:
    """Run a block whose Python-level prints may include HARMLESS_LINES: those are dropped, the rest are printed
    (after the block, in order)."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        kept = [line for line in buffer.getvalue().splitlines(keepends=True) if not is_harmless_line(line)]
        sys.stdout.write("".join(kept))
        sys.stdout.flush()


filter_warnings()
