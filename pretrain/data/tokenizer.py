"""SentencePiece tokenizer: training (BPE with byte fallback) and parallel, order-preserving encoding.

The trained model is lossless: identity normalisation, no whitespace folding and no dummy prefix, so
``decode(encode(text)) == text`` for any UTF-8 text (characters outside the vocabulary fall back to bytes).
``"\\n"`` is a piece of its own. Special ids: unk 0, bos 1, eos 2, no pad; documents are joined with eos.
"""

from __future__ import annotations

import io
import itertools
import multiprocessing as mp
import os
import re
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import sentencepiece as spm

Tag = TypeVar("Tag")

TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    character_coverage=0.9995,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    user_defined_symbols=["\n"],
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    input_sentence_size=4_000_000,
    shuffle_input_sentence=True,
    minloglevel=2,
)
# sentencepiece drops training "sentences" longer than 4192 bytes; lines are cut to this many characters
# (at most 4 bytes each in UTF-8) so long single-line documents still count.
TRAIN_PIECE_CHARS = 1024


def train_tokenizer(texts: Iterable[str], out_path: str | os.PathLike, vocab_size: int, num_threads: int = 1) -> Path:
    """Train a BPE model on ``texts`` and write it to ``out_path``; returns the path."""
    out_path = Path(out_path)
    buf = io.BytesIO()
    failures: list[BaseException] = []  # an error of `texts` itself (a bad input line), re-raised as it was
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_pieces(texts, failures),
            model_writer=buf,
            vocab_size=vocab_size,
            num_threads=max(1, num_threads),
            **TRAINER_OPTIONS,
        )
    except RuntimeError as e:
        if failures:
            raise failures[0] from None
        raise ValueError(training_error(str(e), vocab_size)) from None
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out_path)
    return out_path


def training_error(message: str, vocab_size: int) -> str:
    """A one-line account of a sentencepiece training failure (its own message is C++ source locations and a
    Python stack), with what to do for the common one: a vocabulary larger than the corpus can fill."""
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if too_high:
        return (
            f"vocab_size={vocab_size} is too large for this corpus: sentencepiece can make at most "
            f"{too_high.group(2)} pieces from the training documents; give a smaller --vocab-size "
            f"(<= {too_high.group(2)}) or more text"
        )
    too_low = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_low:
        return (
            f"vocab_size={vocab_size} is too small: this corpus needs at least {too_low.group(2)} pieces (the "
            f"special and byte-fallback pieces and its characters); give --vocab-size >= {too_low.group(2)}"
        )
    message = message.split("\n\nAt:")[0]
    message = re.sub(r"^\w+: (src/\S+\(\d+\) )?(\[.*?\] )?", "", message.strip())
    return f"sentencepiece training failed (vocab_size={vocab_size}): {' '.join(message.split())}"


def _training_pieces(texts: Iterable[str], failures: list[BaseException]) -> Iterator[str]:
    try:
        for text in texts:
            for line in text.split("\n"):
                for start in range(0, len(line), TRAIN_PIECE_CHARS):
                    yield line[start : start + TRAIN_PIECE_CHARS]
    except Exception as e:
        failures.append(e)
        raise


def load_tokenizer(path: str | os.PathLike) -> spm.SentencePieceProcessor:
    """Load a sentencepiece model file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model {path} does not exist")
    return spm.SentencePieceProcessor(model_file=str(path))


def newline_is_a_boundary(sp: spm.SentencePieceProcessor) -> bool:
    """Whether encoding a text in pieces that each end with "\\n" gives the ids of encoding it whole.

    True for the models ``train_tokenizer`` makes: "\\n" is a piece no other piece contains (so no merge
    crosses it) and encoding adds or removes no whitespace at the ends of a piece.
    """
    newline = sp.piece_to_id("\n")
    return (
        sp.id_to_piece(newline) == "\n"
        and all("\n" not in sp.id_to_piece(i) for i in range(sp.vocab_size()) if i != newline)
        and sp.encode(" a \n b ") == sp.encode(" a \n") + sp.encode(" b ")
    )


def split_at_newlines(text: str, min_chars: int) -> list[str]:
    """``text`` cut right after the first "\\n" at or beyond every ``min_chars`` characters; joins back to ``text``."""
    pieces, start = [], 0
    while start < len(text):
        cut = text.find("\n", start + min_chars - 1) + 1 or len(text)
        pieces.append(text[start:cut])
        start = cut
    return pieces


def encode_pieces(sp: spm.SentencePieceProcessor, pieces: list[tuple[str, bool]]) -> np.ndarray:
    """Ids of ``(text, ends_document)`` pieces, concatenated, with eos after each piece that ends a document.

    Returns uint32 ``[sum(len(ids_i) + ends_document_i)]``.
    """
    ids = sp.encode([text for text, _ in pieces], num_threads=1)
    eos = [sp.eos_id()]
    flat = itertools.chain.from_iterable(x + eos if ends else x for x, (_, ends) in zip(ids, pieces, strict=True))
    total = sum(map(len, ids)) + sum(ends for _, ends in pieces)
    return np.fromiter(flat, dtype=np.uint32, count=total)


def encode_batches(
    model_path: str | os.PathLike, batches: Iterable[tuple[Tag, list[tuple[str, bool]]]], workers: int = 1
) -> Iterator[tuple[Tag, np.ndarray]]:
    """Encode ``(tag, pieces)`` batches with ``encode_pieces`` in ``workers`` processes.

    Results come back in input order (so the output is the same for any number of workers) and at most
    ``2 * workers`` batches are in flight, so memory stays bounded on inputs of any size.
    """
    if workers <= 1:
        sp = load_tokenizer(model_path)
        for tag, pieces in batches:
            yield tag, encode_pieces(sp, pieces)
        return
    with mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(str(model_path),)) as pool:
        pending: deque = deque()
        for tag, pieces in batches:
            pending.append((tag, pool.apply_async(_encode_in_worker, (pieces,))))
            if len(pending) >= 2 * workers:
                tag0, result = pending.popleft()
                yield tag0, result.get()
        while pending:
            tag0, result = pending.popleft()
            yield tag0, result.get()


_worker_sp: spm.SentencePieceProcessor | None = None


def _init_worker(model_path: str) -> None:
    global _worker_sp
    _worker_sp = load_tokenizer(model_path)


def _encode_in_worker(pieces: list[tuple[str, bool]]) -> np.ndarray:
    assert _worker_sp is not None
    return encode_pieces(_worker_sp, pieces)
