"""DeepSpeed's universal checkpoint for this model: the `universal_checkpoint_info` client state each checkpoint
carries (how `ds_to_universal` merges TP slices, derived from the layers' own TP marks) and the conversion of a
checkpoint into that form, loadable at any TP x DP layout or ZeRO stage 1-2.
"""

from __future__ import annotations

import os
import re
import shutil
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from pretrain import checkpoint
from titans_parallel.parallel.metadata import tensor_parallel_layout


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


def to_universal(tag_dir: Path) -> Path:
    """DeepSpeed's universal form of a checkpoint (made once by rank 0 with ds_to_universal, then reused):
    parameters and optimizer states merged over TP and ZeRO shards, loadable at any layout."""
    out = tag_dir.parent / "universal" / tag_dir.name
    if dist.get_rank() == 0 and not (out / checkpoint.JOB_FILE).is_file():
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        shutil.rmtree(out, ignore_errors=True)
        workers = max(1, min(8, (os.cpu_count() or 1) // 2))
        with checkpoint.weights_only_loads():
            ds_to_universal(Namespace(input_folder=str(tag_dir), output_folder=str(out), num_extract_workers=workers,
                                      num_merge_workers=workers, keep_temp_folder=False, strict=True,
                                      inject_missing_state=False))
        shutil.copy(tag_dir / checkpoint.JOB_FILE, out / checkpoint.JOB_FILE)  # marks the conversion complete
    dist.barrier()
    return out
