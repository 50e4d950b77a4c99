"""Raw text -> sentencepiece tokenizer -> packed token shards + manifest (the library behind ``prepare_data``).

Validation split, by document and deterministic: the ``i``-th non-empty document of the inputs (0-based,
in the order ``sources.resolve_inputs`` lists the files) goes to ``val`` when
``floor((i + 1) * val_fraction) > floor(i * val_fraction)``: exactly ``floor(N * val_fraction)`` documents,
evenly spread, the same on every run and for any number of workers. A corpus too small for that to pick any
(``N < 1 / val_fraction``) gives its last document to ``val`` (one document alone is an error, raised before
any work). The tokenizer is trained on the train documents only. Each split is packed on its own; its tail
shorter than ``seq_len + 1`` is dropped (counted as ``dropped_tokens`` in the manifest). The output layout is
described in ``shards``.

The dataset is built in a hidden staging folder beside ``out_dir`` (``.<name>.staging-*``) and renamed into
place only when complete, so a failed build leaves an existing dataset as it was and no folder behind. An
existing ``out_dir`` (other than an empty folder) is refused unless ``overwrite=True`` (``--force``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from tqdm import tqdm

from pretrain.data.shards import (
    FORMAT,
    MANIFEST,
    TOKENIZER,
    SplitWriter,
    sha256_file,
    token_dtype,
    write_manifest,
)
from pretrain.data.sources import Document, read_documents, resolve_inputs
from pretrain.data.tokenizer import (
    encode_batches,
    load_tokenizer,
    newline_is_a_boundary,
    split_at_newlines,
    train_tokenizer,
)

log = logging.getLogger(__name__)

BATCH_CHARS = 1 << 20  # characters of text per tokenization task
PIECE_CHARS = 1 << 16  # long documents are encoded in pieces of about this size (faster, and spread over tasks)


def is_val(index: int, val_fraction: float) -> bool:
    """Whether document ``index`` (0-based, input order) belongs to the validation split of a corpus with at least
    ``1 / val_fraction`` documents (see ``val_rule`` for smaller ones)."""
    return math.floor((index + 1) * val_fraction) > math.floor(index * val_fraction)


def val_rule(files: Sequence[Path], text_field: str, val_fraction: float) -> Callable[[int], bool]:
    """``index -> in val`` for these inputs: ``is_val``, or for a corpus of ``N < 1 / val_fraction`` documents
    (counted here, reading at most that many) its last document. ValueError, before any work, for no text at all
    or a single document with ``val_fraction > 0``."""
    count = 0
    for count, _ in enumerate(read_documents(files, text_field), start=1):
        if math.floor(count * val_fraction) >= 1 or (val_fraction == 0 and count >= 1):
            return lambda i: is_val(i, val_fraction)
    if count == 0:
        raise ValueError(f"no text found in the inputs ({', '.join(map(str, files))})")
    if count == 1:
        raise ValueError(
            f"1 document: too few for a validation split (val_fraction={val_fraction}); "
            "give more documents or val_fraction 0 (--val-fraction 0)"
        )
    log.warning(
        "val_fraction=%s selects no document of %d; the last document is the validation split", val_fraction, count
    )
    return lambda i: i == count - 1


def prepare_dataset(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    seq_len: int,
    vocab_size: int | None = None,
    tokenizer: str | os.PathLike | None = None,
    val_fraction: float = 0.01,
    text_field: str = "text",
    workers: int | None = None,
    shard_mb: float = 64.0,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Build a token-shard dataset in ``out_dir`` and return ``out_dir``.

    Trains a ``vocab_size`` BPE tokenizer on the train documents unless ``tokenizer`` (a sentencepiece
    model file) is given; either way it is stored as ``out_dir/tokenizer.model``. Shards hold about
    ``shard_mb`` MiB each. ``workers`` tokenizer processes (default: all cores). An existing ``out_dir`` is
    replaced (once the new build is complete) only with ``overwrite=True``.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, not {seq_len}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), not {val_fraction}")
    if tokenizer is None and vocab_size is None:
        raise ValueError("give vocab_size (to train a tokenizer) or tokenizer (a sentencepiece model)")
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder")
        if not overwrite:
            raise FileExistsError(f"{out} already exists; replace it with --force (overwrite=True)")
    workers = workers or os.cpu_count() or 1
    files = resolve_inputs(inputs)
    in_val = val_rule(files, text_field, val_fraction)
    if tokenizer is not None:
        load_tokenizer(tokenizer)
    with _staging(out) as staging:
        _build(files, staging, seq_len, vocab_size, tokenizer, in_val, val_fraction, text_field, workers, shard_mb,
               progress)
    return out


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out``, renamed to ``out`` (replacing it) when the block succeeds, removed (with the
    parent folders made for it) when it fails."""
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield staging
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(staging, out)
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in made:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _build(files, out, seq_len, vocab_size, tokenizer, in_val, val_fraction, text_field, workers, shard_mb,
           progress) -> None:
    model_path = out / TOKENIZER
    if tokenizer is None:
        train_docs = (d.text for i, d in enumerate(read_documents(files, text_field)) if not in_val(i))
        train_tokenizer(
            tqdm(train_docs, desc="train tokenizer", unit="doc", disable=not progress), model_path, vocab_size, workers
        )
    else:
        shutil.copyfile(tokenizer, model_path)
    sp = load_tokenizer(model_path)
    if vocab_size is not None and sp.vocab_size() != vocab_size:
        raise ValueError(f"tokenizer {tokenizer} has {sp.vocab_size()} pieces, vocab_size asks for {vocab_size}")

    vocab = sp.vocab_size()
    shard_samples = max(1, int(shard_mb * 2**20) // ((seq_len + 1) * token_dtype(vocab).itemsize))
    names = ["train", "val"] if val_fraction > 0 else ["train"]
    writers = {name: SplitWriter(out, name, seq_len, vocab, shard_samples) for name in names}
    piece_chars = PIECE_CHARS if newline_is_a_boundary(sp) else None
    batches = _batches(read_documents(files, text_field), in_val, piece_chars)
    with tqdm(desc="tokenize", unit="tok", unit_scale=True, disable=not progress) as bar:
        for (split, documents), ids in encode_batches(model_path, batches, workers):
            writers[split].add(ids, documents)
            bar.update(len(ids))
    splits = {name: writer.close() for name, writer in writers.items()}
    for name, entry in splits.items():
        if entry["samples"] == 0:
            raise ValueError(
                f"{name} split: {entry['dropped_tokens']} tokens, fewer than one sample of seq_len + 1 = {seq_len + 1}"
            )

    write_manifest(
        out,
        {
            "format": FORMAT,
            "seq_len": seq_len,
            "vocab_size": vocab,
            "dtype": token_dtype(vocab).name,
            "eos_id": sp.eos_id(),
            "tokenizer": {"file": TOKENIZER, "sha256": sha256_file(model_path), "trained": tokenizer is None},
            "build": {
                "inputs": [{"path": str(f), "bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in files],
                "text_field": text_field,
                "val_fraction": val_fraction,
            },
            "splits": splits,
        },
    )


def _batches(
    docs: Iterable[Document], in_val: Callable[[int], bool], piece_chars: int | None
) -> Iterator[tuple[tuple[str, int], list[tuple[str, bool]]]]:
    """Tokenization tasks ``((split, documents ending in it), [(text, ends_document), ...])`` of about
    BATCH_CHARS, in document order per split; documents are cut at newlines into ``piece_chars`` pieces."""
    pending: dict[str, list[tuple[str, bool]]] = {"train": [], "val": []}
    chars = dict.fromkeys(pending, 0)
    for i, doc in enumerate(docs):
        split = "val" if in_val(i) else "train"
        pieces = split_at_newlines(doc.text, piece_chars) if piece_chars else [doc.text]
        for k, piece in enumerate(pieces):
            pending[split].append((piece, k == len(pieces) - 1))
            chars[split] += len(piece)
            if chars[split] >= BATCH_CHARS:
                yield _task(split, pending[split])
                pending[split], chars[split] = [], 0
    for split, pieces in pending.items():
        if pieces:
            yield _task(split, pieces)


def _task(split: str, pieces: list[tuple[str, bool]]) -> tuple[tuple[str, int], list[tuple[str, bool]]]:
    return (split, sum(ends for _, ends in pieces)), pieces
