"""Raw text sources: resolve input paths to files and read them as a stream of documents.

Formats, by extension: ``.txt`` / ``.txt.gz`` (the whole file is one document), ``.jsonl`` / ``.jsonl.gz``
(one JSON object per line, the document is its ``text_field``; blank lines are ignored) and ``.parquet``
(one document per row of the ``text_field`` column; null rows are ignored). Empty documents are ignored.

An input is a file, a glob (``*``, ``?``, ``[``; ``**`` recurses) or a directory (searched recursively; files
with other extensions and hidden files are passed over with a log line). Named files and glob matches with
an unknown extension are an error. Files are read in the order given, globs and directories in sorted order,
so the document order — and everything derived from it — is deterministic.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

FORMATS = {".txt": "text", ".txt.gz": "text", ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".parquet": "parquet"}


class Document(NamedTuple):
    """One document: its text and where it came from (``file``, ``file:line`` or ``file:row``)."""

    text: str
    origin: str


def file_format(path: Path) -> str | None:
    """The format name of ``path`` from its extension, or None when the extension is not supported."""
    name = path.name.lower()
    return next((fmt for ext, fmt in FORMATS.items() if name.endswith(ext)), None)


def resolve_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files, globs and directories into a deduplicated, deterministic list of readable files.

    Raises FileNotFoundError for a path or glob that matches nothing (or a directory without a readable
    file) and ValueError for a named file with an unknown extension.
    """
    if not inputs:
        raise ValueError("no input given")
    files: list[Path] = []
    for item in map(str, inputs):
        if any(c in item for c in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(f"input glob {item!r} matches no file")
            for match in map(Path, matches):
                files.extend(_directory_files(match) if match.is_dir() else [_checked_file(match)])
        elif Path(item).is_dir():
            files.extend(_directory_files(Path(item)))
        elif Path(item).exists():
            files.append(_checked_file(Path(item)))
        else:
            raise FileNotFoundError(f"input path {item!r} does not exist")
    seen: set[Path] = set()
    unique = []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique


def _checked_file(path: Path) -> Path:
    if file_format(path) is None:
        raise ValueError(f"{path}: unknown extension; expected one of {', '.join(FORMATS)}")
    return path


def _directory_files(root: Path) -> list[Path]:
    found, ignored = [], 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
        if not hidden and file_format(path) is not None:
            found.append(path)
        else:
            ignored += 1
    if ignored:
        log.info("%s: ignoring %d file(s) with unsupported extensions or hidden names", root, ignored)
    if not found:
        raise FileNotFoundError(
            f"input directory {root} holds no file with a supported extension ({', '.join(FORMATS)})"
        )
    return found


def read_documents(files: Sequence[Path], text_field: str = "text") -> Iterator[Document]:
    """Stream the non-empty documents of ``files`` in order. Errors name the file (and line or row)."""
    readers = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet}
    for path in files:
        for doc in readers[file_format(_checked_file(path))](path, text_field):
            if doc.text:
                yield doc


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _decode(data: bytes, where: Path | str, first_line: int = 1) -> str:
    """``data`` as UTF-8; an error names the file, line and column of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{where}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column})") from None


def _read_text(path: Path, text_field: str) -> Iterator[Document]:
    with _open_bytes(path) as f:
        text = _decode(f.read(), path)
    yield Document(text, str(path))


def _read_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    with _open_bytes(path) as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, path, lineno)
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: bad JSON line ({e})") from e
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{where}: missing text field {text_field!r}")
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{where}: text field {text_field!r} is {type(text).__name__}, not a string")
            yield Document(text, where)


def _read_parquet(path: Path, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise ValueError(f"{path}: missing text field {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    for batch in pf.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{path}:{row}: text field {text_field!r} is {type(text).__name__}, not a string")
            if text is not None:
                yield Document(text, f"{path}:{row}")
            row += 1
