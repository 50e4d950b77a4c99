"""The embedded default dataset: ``data/default/corpus.jsonl.gz`` (public-domain text, see its README).

``prepare_default_dataset()`` builds token shards from it once and returns the existing ones while their
manifest still matches the request (same corpus bytes, vocab_size, seq_len, val_fraction, intact files).
A lock file beside it (``.<name>.lock``) serialises concurrent callers on one filesystem; on a multi-node job
without a shared lock, call it on one rank and barrier.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from pretrain.data.prepare import prepare_dataset
from pretrain.data.shards import ManifestError, read_manifest, sha256_file, shard_problems

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CORPUS = REPO / "data" / "default" / "corpus.jsonl.gz"
PREPARED = REPO / "data" / "prepared"


def default_dataset_dir(vocab_size: int, seq_len: int) -> Path:
    """Where ``prepare_default_dataset`` puts the shards by default: ``data/prepared/default-v{vocab}-t{seq_len}``."""
    return PREPARED / f"default-v{vocab_size}-t{seq_len}"


def prepare_default_dataset(
    out_dir: str | os.PathLike | None = None,
    *,
    vocab_size: int = 4096,
    seq_len: int = 1024,
    val_fraction: float = 0.1,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Shards of the embedded corpus in ``out_dir`` (default ``default_dataset_dir(vocab_size, seq_len)``)."""
    out = Path(out_dir) if out_dir is not None else default_dataset_dir(vocab_size, seq_len)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:  # beside: `out` itself is replaced by a rebuild
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_current(out, vocab_size=vocab_size, seq_len=seq_len, val_fraction=val_fraction):
            prepare_dataset(
                [DEFAULT_CORPUS],
                out,
                seq_len=seq_len,
                vocab_size=vocab_size,
                val_fraction=val_fraction,
                workers=workers,
                progress=progress,
                overwrite=True,
            )
    return out


def _is_current(out: Path, *, vocab_size: int, seq_len: int, val_fraction: float) -> bool:
    try:
        manifest = read_manifest(out)
        tokenizer = out / manifest["tokenizer"]["file"]
        return (
            manifest["seq_len"] == seq_len
            and manifest["vocab_size"] == vocab_size
            and manifest["build"]["val_fraction"] == val_fraction
            and [i["sha256"] for i in manifest["build"]["inputs"]] == [sha256_file(DEFAULT_CORPUS)]
            and tokenizer.is_file()
            and sha256_file(tokenizer) == manifest["tokenizer"]["sha256"]
            and not any(shard_problems(out, split["shards"]) for split in manifest["splits"].values())
        )
    except (ManifestError, KeyError):
        return False
