"""Read a DeepSpeed checkpoint of TitansLM into one full fp32 state dict; write and read TP-sharded start points.

`load_consolidated(path)` handles ZeRO stage 0-3 at any TP degree. For every TP (mp) rank it rebuilds that rank's
fp32 shard, preferring the fp32 master weights: ZeRO 1-3 keep them flattened and partitioned over data-parallel
ranks in `[bf16_]zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt`, which DeepSpeed's own `zero_to_fp32` routines
reassemble when handed one mp rank's files (its command line only reads mp rank 0); ZeRO-0 under bf16 keeps them
unflattened in `mp_rank_{tp:02d}_model_states.pt`'s optimizer state; otherwise (ZeRO-0 fp32) the module weights
are the weights. The shards are then concatenated along each parameter's partition dim (the layout the layers
record, `titans_parallel.parallel.metadata`); replicated parameters must be equal on every TP rank.

TP shards ("tp" format, a start point for continued pretraining at another TP degree), a folder with
    config.json                {"format": "titans-tp-shards", "model": <ModelConfig>, "tp": N,
                                "partition_dims": {name: dim or null}}
    model_tp{r:02d}.safetensors  per TP rank r < N: exactly the tensors TitansLM built under init_parallel(N) holds
                                 on TP rank r (fp32; a tied alias stored once)
`load_tp_shard(folder, rank, tp)` returns one rank's state dict at any tp (re-slicing when the folder was written
for another N), ready for `model.load_state_dict` on that rank; `load_tp_shards(folder)` reassembles the model.

Checkpoint files are pickles; every one is read weights-only (`pretrain.checkpoint.torch_load` and, for DeepSpeed's
own reads in zero_to_fp32, `weights_only_loads`): a file that would run code is refused, naming it. A checkpoint is
verified against its manifest (sizes, sha256) before it is read.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pretrain.checkpoint import (
    CheckpointError,
    read_job,
    resolve_checkpoint,
    torch_load,
    verify,
    weights_only_loads,
)
from pretrain.optim import param_groups
from titans_parallel import ModelConfig, TitansLM
from titans_parallel.parallel.metadata import tensor_parallel_layout, tied_parameters
from titans_parallel.typed_config import to_mapping

TP_FORMAT = "titans-tp-shards"
StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ModelSpec:
    """What a TitansLM of a config holds: full parameter shapes (state-dict order, tied aliases included), the TP
    partition dim of each (None: replicated), the tied aliases (alias -> source), the optimizer's order."""

    shapes: dict[str, torch.Size]
    layout: dict[str, int | None]
    tied: dict[str, str]
    param_order: list[str]  # the optimizer's parameter order (pretrain.optim.param_groups)

    @classmethod
    def of(cls, config: ModelConfig) -> ModelSpec:
        with torch.device("meta"):
            model = TitansLM(config)
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for group in param_groups(model, 0.0) for p in group["params"]]
        return cls({k: v.shape for k, v in model.state_dict().items()}, tensor_parallel_layout(model),
                   tied_parameters(model), order)

    def check_divisible(self, tp: int) -> None:
        """A ValueError listing the split parameters whose split dimension `tp` does not divide."""
        bad = [f"{k} {list(self.shapes[k])} (dim {d})" for k, d in self.layout.items()
               if d is not None and self.shapes[k][d] % tp]
        if bad:
            raise ValueError(f"tp={tp} does not divide the split dimension of {len(bad)} parameters: "
                             + ", ".join(bad[:4]) + (", ..." if len(bad) > 4 else ""))

    def shard_shape(self, name: str, tp: int) -> torch.Size:
        shape, dim = list(self.shapes[name]), self.layout[name]
        if dim is not None:
            shape[dim] //= tp
        return torch.Size(shape)


@dataclass(frozen=True)
class RankFiles:
    """One TP rank's files: model states (one, or one per DP rank under ZeRO-3) and ZeRO optimizer states (one per
    DP rank; none under ZeRO-0)."""

    model: list[Path]
    optim: list[Path]


def load_consolidated(path: str | Path, progress: bool = True) -> tuple[StateDict, dict[str, Any], int]:
    """(full fp32 state dict, the job config as a plain dict, step) of the checkpoint at `path` (see
    `resolve_checkpoint`). Errors name the missing, unreadable or mismatching file."""
    tag_dir = resolve_checkpoint(path)
    problems = verify(tag_dir)
    if problems:
        raise CheckpointError("; ".join(problems))
    job = read_job(tag_dir)
    config = job["config"]
    tp = config["parallel"]["tp"]
    spec = ModelSpec.of(ModelConfig.from_saved(config["model"]))
    files = rank_files(tag_dir, config["train"]["zero_stage"], tp, job["world_size"] // tp,
                       bf16=config["train"]["precision"] == "bf16")
    shards = []
    for rank in tqdm(range(tp), desc="read TP ranks", unit="rank", disable=not progress):
        shard = _rank_weights(files[rank], spec)
        _check_shard(shard, spec, tp, f"{files[rank].model[0]} (TP rank {rank} of {tp})")
        shards.append(shard)
    return merge_tp_shards(shards, spec, [str(f.model[0]) for f in files]), config, job["step"]


def build_model(config: ModelConfig, state: StateDict) -> TitansLM:
    """A single-process TitansLM (TP off, CPU, eval mode) holding the full state dict `state` (tied aliases may be
    absent). Built normally (its init draws under a forked RNG, leaving the caller's untouched) so parameters keep
    their ties and TP marks, then overwritten; strict about keys and shapes."""
    with torch.random.fork_rng(devices=[]):
        model = TitansLM(config)
    model.load_state_dict(_with_aliases(state, ModelSpec.of(config)), strict=True)
    return model.eval()


def _with_aliases(state: StateDict, spec: ModelSpec) -> StateDict:
    """`state` with each tied alias present (the same tensor as its source), e.g. after a file stored it once."""
    return {**{alias: state[source] for alias, source in spec.tied.items() if source in state}, **state}


def rank_files(tag_dir: Path, zero_stage: int, tp: int, dp: int, bf16: bool) -> list[RankFiles]:
    """`expected_rank_files`, with a CheckpointError naming the first missing one."""
    files = expected_rank_files(tag_dir, zero_stage, tp, dp, bf16)
    missing = [p for f in files for p in f.model + f.optim if not p.is_file()]
    if missing:
        raise CheckpointError(f"{missing[0]} is missing ({len(missing)} rank file(s) missing; a ZeRO-{zero_stage}, "
                              f"tp={tp} x dp={dp} checkpoint has {sum(len(f.model) + len(f.optim) for f in files)})")
    return files


def expected_rank_files(tag_dir: Path, zero_stage: int, tp: int, dp: int, bf16: bool) -> list[RankFiles]:
    """Every rank's file names as DeepSpeed writes them for this stage / TP / DP / precision."""
    prefix = "bf16_" if bf16 else ""
    files = []
    for r in range(tp):
        if zero_stage == 3:
            model = [tag_dir / f"zero_pp_rank_{d}_mp_rank_{r:02d}_model_states.pt" for d in range(dp)]
        else:
            model = [tag_dir / f"mp_rank_{r:02d}_model_states.pt"]
        optim = [tag_dir / f"{prefix}zero_pp_rank_{d}_mp_rank_{r:02d}_optim_states.pt" for d in range(dp)]
        files.append(RankFiles(model, optim if zero_stage else []))
    return files


def _load(path: Path) -> dict[str, Any]:
    return torch_load(path, map_location="cpu", mmap=True)


def _rank_weights(files: RankFiles, spec: ModelSpec) -> StateDict:
    """This TP rank's fp32 weights (tied aliases filled in)."""
    shard = _zero_master_weights(files) if files.optim else _zero0_weights(_load(files.model[0]), spec)
    return _with_aliases(shard, spec)


def _zero_master_weights(files: RankFiles) -> StateDict:
    """DeepSpeed's zero_to_fp32 reconstruction, pointed at one mp rank's files (its prints and bars silenced)."""
    from deepspeed.utils import zero_to_fp32 as z

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), weights_only_loads():
            models = z.parse_model_states([str(p) for p in files.model])
            optim = [str(p) for p in files.optim]
            stage, world, flat_groups, paddings = z.parse_optim_states(optim, str(files.optim[0].parent))
            if stage <= 2:
                state = z._get_fp32_state_dict_from_zero2_checkpoint(world, flat_groups, models, False, paddings)
            else:
                state = z._get_fp32_state_dict_from_zero3_checkpoint(world, flat_groups, models, False)
            return {k: v.float() for k, v in z.to_torch_tensor(state).items()}
    except Exception as e:
        for path in files.model + files.optim:
            _load(path)  # names an unreadable file
        raise CheckpointError(f"cannot rebuild fp32 weights from {[p.name for p in files.model + files.optim]}: "
                              f"{type(e).__name__}: {e}") from e


def _zero0_weights(state: dict[str, Any], spec: ModelSpec) -> StateDict:
    """ZeRO-0: the optimizer's unflattened fp32 master copies when it keeps them (bf16: listed in the optimizer's
    parameter order, checked against the bf16 module weights), else the module weights."""
    module = state["module"]
    optimizer = state.get("optimizer")
    masters = optimizer.get("fp32_groups") if isinstance(optimizer, dict) else None
    if masters is None:
        return {k: v.float() for k, v in module.items()}
    flat = [t.float() for group in masters for t in group]
    if len(flat) != len(spec.param_order):
        raise CheckpointError(f"{len(flat)} fp32 master weights for {len(spec.param_order)} parameters")
    weights = dict(zip(spec.param_order, flat))
    bad = [k for k, v in weights.items()
           if v.shape != module[k].shape or not torch.equal(v.to(module[k].dtype), module[k])]
    if bad:
        raise CheckpointError(f"fp32 master weights do not round to the module weights for {bad[:5]}: the optimizer's "
                              "parameter order is not pretrain.optim.param_groups'")
    return weights


def _check_shard(shard: StateDict, spec: ModelSpec, tp: int, source: str) -> None:
    """Same keys and this TP degree's shard shapes as `spec`'s model, else a CheckpointError naming `source` and
    listing the differences."""
    problems = [f"missing {k}" for k in spec.shapes if k not in shard]
    problems += [f"unexpected {k}" for k in shard if k not in spec.shapes]
    problems += [f"{k}: {list(v.shape)} in the file, {list(spec.shard_shape(k, tp))} expected"
                 for k, v in shard.items() if k in spec.shapes and v.shape != spec.shard_shape(k, tp)]
    if problems:
        more = f"; ... {len(problems) - 8} more" if len(problems) > 8 else ""
        raise CheckpointError(f"{source} does not match the model of its config (another model size?): "
                              + "; ".join(problems[:8]) + more)


def merge_tp_shards(shards: list[StateDict], spec: ModelSpec, sources: list[str]) -> StateDict:
    """TP rank shards (checked by `_check_shard`) -> the full state dict: split parameters concatenated along their
    partition dim in rank order; replicated ones must be identical on every rank (a CheckpointError naming the
    parameter and the rank files otherwise)."""
    full = {}
    for name in spec.shapes:
        parts = [s[name] for s in shards]
        dim = spec.layout[name]
        if dim is not None:
            full[name] = torch.cat(parts, dim)
            continue
        for rank, part in enumerate(parts[1:], 1):
            if not torch.equal(part, parts[0]):
                raise CheckpointError(f"replicated parameter {name} differs between TP rank 0 ({sources[0]}) and TP "
                                      f"rank {rank} ({sources[rank]}): max |diff| {(part - parts[0]).abs().max():.3g}")
        full[name] = parts[0]
    return full


def shard_state_dict(state: StateDict, spec: ModelSpec, tp: int, rank: int) -> StateDict:
    """The full state dict -> TP rank `rank`'s shard at degree `tp` (contiguous copies)."""
    spec.check_divisible(tp)
    return {k: (v if spec.layout[k] is None else v.chunk(tp, spec.layout[k])[rank]).contiguous()
            for k, v in state.items()}


def save_tp_shards(state: StateDict, model_config: ModelConfig, tp: int, out_dir: str | Path) -> list[Path]:
    """Write the "tp" format (module doc) for degree `tp` into the existing folder `out_dir`; returns the shard
    files."""
    from safetensors.torch import save_file

    spec = ModelSpec.of(model_config)
    _check_shard(state, spec, 1, "the state dict")
    out_dir = Path(out_dir)
    paths = []
    for rank in range(tp):
        shard = shard_state_dict(state, spec, tp, rank)
        path = out_dir / f"model_tp{rank:02d}.safetensors"
        save_file({k: v for k, v in shard.items() if k not in spec.tied}, path,
                  metadata={"format": "pt", "tp_rank": str(rank), "tp_size": str(tp)})
        paths.append(path)
    (out_dir / "config.json").write_text(json.dumps(
        {"format": TP_FORMAT, "model": to_mapping(model_config), "tp": tp, "partition_dims": spec.layout}, indent=1))
    return paths


def read_tp_config(folder: str | Path) -> tuple[ModelConfig, int]:
    path = Path(folder) / "config.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if meta.get("format") != TP_FORMAT:
        raise CheckpointError(f"{path} is not a {TP_FORMAT} config")
    return ModelConfig.from_saved(meta["model"]), meta["tp"]


def _read_shard(folder: Path, rank: int, tp: int, spec: ModelSpec) -> StateDict:
    from safetensors.torch import load_file

    path = folder / f"model_tp{rank:02d}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (the folder holds tp={tp} shards)")
    try:
        shard = load_file(path)
    except Exception as e:
        raise CheckpointError(f"{path} cannot be read, the file is truncated or corrupt ({e})") from None
    shard = _with_aliases(shard, spec)
    _check_shard(shard, spec, tp, str(path))
    return shard


def load_tp_shards(folder: str | Path) -> tuple[StateDict, ModelConfig]:
    """The full state dict reassembled from a "tp" folder, and its model config."""
    folder = Path(folder)
    config, tp = read_tp_config(folder)
    spec = ModelSpec.of(config)
    shards = [_read_shard(folder, r, tp, spec) for r in range(tp)]
    return merge_tp_shards(shards, spec, [str(folder / f"model_tp{r:02d}.safetensors") for r in range(tp)]), config


def load_tp_shard(folder: str | Path, rank: int, tp: int) -> tuple[StateDict, ModelConfig]:
    """TP rank `rank`'s state dict at degree `tp` (tied aliases included) from a "tp" folder written for any
    degree, and the model config."""
    folder = Path(folder)
    config, saved_tp = read_tp_config(folder)
    spec = ModelSpec.of(config)
    if saved_tp == tp:
        return _read_shard(folder, rank, tp, spec), config
    full, _ = load_tp_shards(folder)
    return shard_state_dict(full, spec, tp, rank), config
