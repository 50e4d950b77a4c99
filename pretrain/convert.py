"""Convert a training checkpoint (DeepSpeed, any ZeRO stage, any TP degree) into a model you can use elsewhere.

    python -m pretrain.convert --checkpoint runs/x/checkpoints --out exports/x --format safetensors
    python -m pretrain.convert --checkpoint runs/x/checkpoints/step00001000 --out exports/x-hf --format hf
    python -m pretrain.convert --checkpoint runs/x/checkpoints --out exports/x-tp4 --format tp --tp 4

--checkpoint is a checkpoint folder (its `latest` tag is used) or one tag folder. Formats, each a folder:

- safetensors: `model.safetensors` (full fp32 TitansLM state dict, a tied alias stored once; metadata: step),
  `config.json` (the ModelConfig), `tokenizer.model`. Load it on one process, no DeepSpeed: `load_model(path)`.
- hf: a transformers export: `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` (and
  `AutoTokenizer` likewise); self-contained (the model's code is copied in), see `titans_parallel.hf.export`.
- tp: `model_tp{r:02d}.safetensors` per TP rank + `config.json`, a start point for pretraining at TP degree --tp
  (`pretrain.checkpoint_io.load_tp_shard`).

The tokenizer is the `tokenizer.model` of the dataset in the job config's `data.path` (the embedded default
dataset when null), or --tokenizer. An existing --out is never touched without --force; the export is written
next to it and moved into place only when complete.

The checkpoint is verified against its manifest (every file present, its size and sha256) before it is read. Its
.pt files (DeepSpeed's *_model_states.pt and *_optim_states.pt) are pickles: they are read weights-only (tensors,
plain data and a few named DeepSpeed classes), so a crafted file is refused rather than run; still convert only
checkpoints from sources you trust.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from pretrain.checkpoint import CheckpointError, read_job, resolve_checkpoint
from pretrain.checkpoint_io import (
    ModelSpec,
    StateDict,
    build_model,
    load_consolidated,
    save_tp_shards,
)
from titans_parallel import ModelConfig, TitansLM
from titans_parallel.typed_config import to_mapping

FORMATS = ("safetensors", "hf", "tp")
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.model"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pretrain.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (uses its latest) or a tag folder")
    parser.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--tp", type=int, default=None, help="TP degree of the shards (--format tp)")
    parser.add_argument("--tokenizer", default=None, help="sentencepiece model (default: the training dataset's)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    if (args.format == "tp") != (args.tp is not None):
        parser.error("--tp N goes with --format tp, and only with it")
    if args.tp is not None and args.tp < 1:
        parser.error("--tp must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        convert(args.checkpoint, args.out, args.format, tp=args.tp, tokenizer=args.tokenizer, force=args.force)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
        sys.exit(f"convert: {e}")


def convert(checkpoint: str | Path, out: str | Path, fmt: str, *, tp: int | None = None,
            tokenizer: str | Path | None = None, force: bool = False) -> Path:
    """Write `checkpoint` to the folder `out` in format `fmt` (module doc); returns `out`."""
    out, tag_dir = Path(out), resolve_checkpoint(checkpoint)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    if out.resolve() in (tag_dir.resolve(), *tag_dir.resolve().parents):
        raise ValueError(f"--out {out} would replace the checkpoint {tag_dir} itself")
    job = read_job(tag_dir)["config"]
    model_config = ModelConfig.from_saved(job["model"])
    if fmt == "tp":
        ModelSpec.of(model_config).check_divisible(tp)
    sp_path = tokenizer_path(job, tokenizer, model_config.vocab_size) if fmt != "tp" else None
    state, _, step = load_consolidated(tag_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if fmt == "safetensors":
            save_safetensors(state, model_config, tmp, metadata={"step": str(step), "checkpoint": str(tag_dir)})
        elif fmt == "hf":
            from titans_parallel.hf.export import save_hf_export

            save_hf_export(state, model_config, tmp, tokenizer=sp_path, seq_len=job["data"]["seq_len"])
        else:
            save_tp_shards(state, model_config, tp, tmp)
        if sp_path is not None and fmt == "safetensors":
            shutil.copyfile(sp_path, tmp / TOKENIZER)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out} ({fmt}, step {step})", file=sys.stderr)
    return out


def tokenizer_path(
    job: dict[str, Any], given: str | Path | None, vocab_size: int, required: bool = False
) -> Path | None:
    """--tokenizer (must exist), else the training dataset's tokenizer.model, else (none there) a
    FileNotFoundError when `required`, or None with a warning; a tokenizer whose vocabulary is not the model's is an
    error."""
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise FileNotFoundError(f"--tokenizer {path} does not exist")
    else:
        from pretrain.data.default import default_dataset_dir

        data = job["data"]
        root = Path(data["path"]) if data["path"] else default_dataset_dir(vocab_size, data["seq_len"])
        path = root / TOKENIZER
        if not path.is_file():
            if required:
                raise FileNotFoundError(f"no tokenizer at {path} (the job's dataset); pass --tokenizer PATH")
            print(f"convert: warning: no tokenizer at {path} (the job's dataset); exporting without one "
                  "(pass --tokenizer PATH)", file=sys.stderr)
            return None
    from pretrain.data.tokenizer import load_tokenizer

    pieces = load_tokenizer(path).vocab_size()
    if pieces != vocab_size:
        raise ValueError(f"tokenizer {path} has {pieces} pieces, the model's vocab_size is {vocab_size}")
    return path


def save_safetensors(state: StateDict, model_config: ModelConfig, out_dir: Path, metadata: dict[str, str]) -> None:
    """The "safetensors" format's weights and config into the existing folder `out_dir`."""
    from safetensors.torch import save_file

    tied = ModelSpec.of(model_config).tied
    save_file({k: v.contiguous() for k, v in state.items() if k not in tied}, out_dir / WEIGHTS,
              metadata={"format": "pt", **metadata})
    (out_dir / CONFIG).write_text(json.dumps(to_mapping(model_config), indent=1))


def load_model(path: str | Path) -> TitansLM:
    """The TitansLM of a "safetensors" export folder, on the CPU in fp32 and eval mode; one process, no DeepSpeed."""
    from safetensors.torch import load_file

    path = Path(path)
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing: not a safetensors export folder")
    config = ModelConfig.from_saved(json.loads((path / CONFIG).read_text()))
    try:
        state = load_file(path / WEIGHTS)
    except Exception as e:
        raise CheckpointError(f"{path / WEIGHTS} cannot be read, the file is truncated or corrupt ({e})") from None
    try:
        return build_model(config, state)
    except RuntimeError as e:
        raise CheckpointError(f"{path / WEIGHTS} does not fit {path / CONFIG}: {e}") from None


if __name__ == "__main__":
    main()
