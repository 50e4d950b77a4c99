"""prepare_data: formats, tokenizer, packing, validation split, manifest, errors, the embedded default dataset.

References are computed independently: token streams with sentencepiece directly, documents with json/gzip/
pyarrow, shard hashes with hashlib, split membership from the documented rule.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from pretrain.data.default import DEFAULT_CORPUS, prepare_default_dataset
from pretrain.data.loader import build_loader
from pretrain.data.prepare import prepare_dataset
from pretrain.data.shards import read_manifest
from pretrain.data.sources import read_documents, resolve_inputs
from pretrain.prepare_data import main

SEQ_LEN = 63
VOCAB = 400


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Twelve short real documents (slices of the embedded corpus), with some non-ASCII text mixed in."""
    with gzip.open(DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    pieces = [doc[start : start + 1500 + 97 * k] for k, doc in enumerate(docs[:6]) for start in (0, 5000)]
    pieces[3] += "\nnaïve café — “quotes” 漢字 🙂\n\ttabbed   spaces"
    return pieces


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": i, field: text}) + "\n")
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, texts) -> Path:
    src = write_jsonl(tmp_path_factory.mktemp("src") / "docs.jsonl", texts)
    out = tmp_path_factory.mktemp("prepared")
    return prepare_dataset(
        [src], out, seq_len=SEQ_LEN, vocab_size=VOCAB, val_fraction=0.0, shard_mb=0.01, progress=False
    )


def reference_stream(model: Path, texts: list[str]) -> list[int]:
    sp = spm.SentencePieceProcessor(model_file=str(model))
    return [t for text in texts for t in sp.encode(text) + [sp.eos_id()]]


def test_round_trip_text_to_shards_to_loader_to_text(prepared, texts):
    manifest = read_manifest(prepared)
    train = manifest["splits"]["train"]
    assert len(train["shards"]) > 1 and manifest["dtype"] == "uint16" and manifest["vocab_size"] == VOCAB
    loader = build_loader(prepared, batch_size=5, dp_rank=0, dp_size=1, shuffle=False, epochs=1, num_workers=2)
    streamed = [t for batch in loader for t in batch.flatten().tolist()]

    reference = reference_stream(prepared / "tokenizer.model", texts)
    assert len(streamed) == train["tokens"] == train["samples"] * (SEQ_LEN + 1)
    assert train["dropped_tokens"] == len(reference) % (SEQ_LEN + 1)
    assert streamed == reference[: len(streamed)]

    sp = spm.SentencePieceProcessor(model_file=str(prepared / "tokenizer.model"))
    decoded = _split_docs(sp, streamed)
    assert decoded[:-1] == texts[: len(decoded) - 1]
    assert texts[len(decoded) - 1].startswith(decoded[-1])


def _split_docs(sp: spm.SentencePieceProcessor, ids: list[int]) -> list[str]:
    docs, current = [], []
    for t in ids:
        if t == sp.eos_id():
            docs.append(sp.decode(current))
            current = []
        else:
            current.append(t)
    return docs + [sp.decode(current)]


def test_manifest_hashes_and_counts_match_the_files(prepared):
    manifest = read_manifest(prepared)
    tokenizer = prepared / "tokenizer.model"
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(tokenizer.read_bytes()).hexdigest()
    train = manifest["splits"]["train"]
    for shard in train["shards"]:
        data = (prepared / shard["name"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(data).hexdigest() and shard["bytes"] == len(data)
    assert sum(s["samples"] for s in train["shards"]) == train["samples"]
    assert [s["name"] for s in train["shards"]] == [f"train/shard-{i:06d}.tar" for i in range(len(train["shards"]))]


def test_reproducible_and_independent_of_workers(tmp_path, texts):
    src = write_jsonl(tmp_path / "docs.jsonl.gz", texts)
    manifests = []
    for workers in (1, 2):
        out = prepare_dataset(
            [src],
            tmp_path / f"w{workers}",
            seq_len=31,
            vocab_size=VOCAB,
            val_fraction=0.25,
            workers=workers,
            shard_mb=0.01,
            progress=False,
        )
        manifests.append(read_manifest(out)["splits"])
    assert manifests[0] == manifests[1]


def test_validation_split_is_by_document(tmp_path, texts):
    fraction = 0.25
    out = prepare_dataset(
        [write_jsonl(tmp_path / "d.jsonl", texts)],
        tmp_path / "out",
        seq_len=15,
        vocab_size=VOCAB,
        val_fraction=fraction,
        progress=False,
    )
    val_index = [i for i in range(len(texts)) if math.floor((i + 1) * fraction) > math.floor(i * fraction)]
    assert len(val_index) == math.floor(len(texts) * fraction)
    splits = {
        "val": [texts[i] for i in val_index],
        "train": [t for i, t in enumerate(texts) if i not in val_index],
    }
    manifest = read_manifest(out)
    for name, docs in splits.items():
        entry = manifest["splits"][name]
        assert entry["documents"] == len(docs)
        loader = build_loader(out, split=name, batch_size=4, dp_rank=0, dp_size=1, shuffle=False, epochs=1)
        streamed = [t for batch in loader for t in batch.flatten().tolist()]
        assert streamed == reference_stream(out / "tokenizer.model", docs)[: entry["tokens"]]


def test_given_tokenizer_is_used_and_stored(tmp_path, prepared, texts):
    src = write_jsonl(tmp_path / "d.jsonl", texts[:4])
    out = prepare_dataset(
        [src],
        tmp_path / "out",
        seq_len=SEQ_LEN,
        tokenizer=prepared / "tokenizer.model",
        val_fraction=0.0,
        progress=False,
    )
    assert (out / "tokenizer.model").read_bytes() == (prepared / "tokenizer.model").read_bytes()
    assert read_manifest(out)["tokenizer"] == {**read_manifest(prepared)["tokenizer"], "trained": False}
    with pytest.raises(ValueError, match="has 400 pieces, vocab_size asks for 500"):
        prepare_dataset(
            [src],
            tmp_path / "o2",
            seq_len=SEQ_LEN,
            tokenizer=prepared / "tokenizer.model",
            vocab_size=500,
            progress=False,
        )


def test_all_formats_paths_globs_and_directories(tmp_path, texts):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(texts[0], encoding="utf-8")
    with gzip.open(root / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write(texts[1])
    write_jsonl(root / "sub" / "c.jsonl", texts[2:4], field="body")
    write_jsonl(root / "sub" / "d.jsonl.gz", texts[4:6], field="body")
    pq.write_table(pa.table({"body": texts[6:9] + [None]}), root / "sub" / "e.parquet", row_group_size=2)
    (root / "notes.csv").write_text("ignored inside a directory")
    (root / ".hidden.txt").write_text("ignored")

    from_dir = [d.text for d in read_documents(resolve_inputs([root]), text_field="body")]
    assert sorted(from_dir) == sorted(texts[:9])
    from_glob = resolve_inputs([str(root / "**" / "*.jsonl*"), root / "a.txt", str(root / "*.txt*")])
    assert [p.name for p in from_glob] == ["c.jsonl", "d.jsonl.gz", "a.txt", "b.txt.gz"]
    out = prepare_dataset(
        [root], tmp_path / "out", seq_len=15, vocab_size=VOCAB, val_fraction=0.0, text_field="body", progress=False
    )
    assert read_manifest(out)["splits"]["train"]["documents"] == 9


@pytest.mark.parametrize(
    "setup,match",
    [
        (lambda d: [d / "nope.jsonl"], "does not exist"),
        (lambda d: [str(d / "*.nothing")], "matches no file"),
        (lambda d: [_write(d / "x.csv", "a,b")], r"x.csv: unknown extension"),
        (lambda d: [_write(d / "x.jsonl", '{"text": "ok"}\n\n{"text": broken}\n')], r"x.jsonl:3: bad JSON line"),
        (
            lambda d: [_write(d / "x.jsonl", '{"text": "ok"}\n{"body": "no"}\n')],
            r"x.jsonl:2: missing text field 'text'",
        ),
        (lambda d: [_write(d / "x.jsonl", '{"text": 5}\n')], r"x.jsonl:1: text field 'text' is int"),
        (
            lambda d: [_parquet(d / "x.parquet", {"body": ["a"]})],
            r"x.parquet: missing text field 'text' \(columns: body\)",
        ),
        (lambda d: [_write(d / "x.jsonl", '{"text": ""}\n\n'), _write(d / "y.txt", "")], "no text found"),
        (lambda d: [_write(d / "x.txt", "too short")], "fewer than one sample"),
    ],
)
def test_clear_errors(tmp_path, prepared, setup, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        prepare_dataset(
            setup(tmp_path),
            tmp_path / "out",
            seq_len=SEQ_LEN,
            tokenizer=prepared / "tokenizer.model",
            val_fraction=0.0,
            progress=False,
        )


def test_small_corpus_still_gets_one_validation_document(tmp_path, texts, prepared):
    """Fewer documents than 1 / val_fraction: the last one is the validation split (floor(N * f) would pick none)."""
    src = write_jsonl(tmp_path / "d.jsonl", texts[:3])
    out = prepare_dataset(
        [src], tmp_path / "out", seq_len=15, tokenizer=prepared / "tokenizer.model", val_fraction=0.1, progress=False
    )
    splits = read_manifest(out)["splits"]
    assert splits["val"]["documents"] == 1 and splits["train"]["documents"] == 2
    loader = build_loader(out, split="val", batch_size=4, dp_rank=0, dp_size=1, shuffle=False, epochs=1)
    streamed = [t for batch in loader for t in batch.flatten().tolist()]
    assert streamed == reference_stream(out / "tokenizer.model", texts[2:3])[: splits["val"]["tokens"]]


def test_one_document_with_a_validation_fraction_fails_before_any_work(tmp_path, texts, monkeypatch):
    import pretrain.data.prepare as prepare

    monkeypatch.setattr(prepare, "train_tokenizer", lambda *a, **k: pytest.fail("tokenizer trained"))
    src = write_jsonl(tmp_path / "d.jsonl", texts[:1])
    with pytest.raises(ValueError, match=r"1 document: too few for a validation split \(val_fraction=0.01\)"):
        prepare_dataset([src], tmp_path / "out", seq_len=15, vocab_size=VOCAB, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


# An existing --out: refused unless asked; replaced only by a complete build.


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_failed_rebuild_leaves_the_existing_dataset_intact(tmp_path, texts):
    good = write_jsonl(tmp_path / "good.jsonl", texts)
    options = dict(seq_len=31, vocab_size=VOCAB, val_fraction=0.0, progress=False)
    out = prepare_dataset([good], tmp_path / "out", **options)
    before = _snapshot(out)
    bad = _write(tmp_path / "bad.jsonl", json.dumps({"text": texts[0]}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: bad JSON line"):
        prepare_dataset([good, bad], out, overwrite=True, **options)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl", "out"]  # no staging left
    batch = next(iter(build_loader(out, batch_size=2, dp_rank=0, dp_size=1, seq_len=31, vocab_size=VOCAB)))
    assert batch.shape == (2, 32)

    more = write_jsonl(tmp_path / "more.jsonl", texts[:5])
    rebuilt = prepare_dataset([good, more], out, overwrite=True, **options)  # a complete build replaces it
    assert rebuilt == out and read_manifest(out)["splits"]["train"]["documents"] == len(texts) + 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl", "more.jsonl", "out"]


def test_existing_out_is_refused_before_any_work(tmp_path, texts, monkeypatch, capsys):
    import pretrain.data.prepare as prepare

    src = write_jsonl(tmp_path / "d.jsonl", texts)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    monkeypatch.setattr(prepare, "train_tokenizer", lambda *a, **k: pytest.fail("tokenizer trained"))
    with pytest.raises(FileExistsError, match=r"out already exists.*overwrite=True"):
        prepare_dataset([src], tmp_path / "out", seq_len=15, vocab_size=VOCAB, progress=False)
    argv = ["--input", str(src), "--out", str(tmp_path / "out"), "--vocab-size", str(VOCAB), "--seq-len", "15"]
    assert main(argv + ["--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "out" / "keep.txt").read_text() == "mine"
    monkeypatch.undo()
    assert main(argv + ["--no-progress", "--force", "--val-fraction", "0"]) == 0
    assert not (tmp_path / "out" / "keep.txt").exists() and read_manifest(tmp_path / "out")["seq_len"] == 15
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is not a dataset to protect
    prepare_dataset([src], empty, seq_len=15, vocab_size=VOCAB, val_fraction=0.0, progress=False)


def test_failure_leaves_no_folder_behind(tmp_path, texts, prepared):
    bad = _write(tmp_path / "bad.jsonl", json.dumps({"text": texts[0]}) + "\n{not json\n")
    with pytest.raises(ValueError, match="bad JSON line"):
        prepare_dataset(
            [bad], tmp_path / "a" / "b" / "out", seq_len=15, tokenizer=prepared / "tokenizer.model", progress=False
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


# Error messages: one line, naming the cause.


def test_vocabulary_too_large_for_the_corpus_says_so(tmp_path, texts):
    src = write_jsonl(tmp_path / "d.jsonl", texts[:2])
    with pytest.raises(ValueError) as info:
        prepare_dataset([src], tmp_path / "out", seq_len=15, vocab_size=50_000, val_fraction=0.0, progress=False)
    message = str(info.value)
    assert "\n" not in message and "INTERNAL" not in message and "At:" not in message
    assert "vocab_size=50000 is too large for this corpus" in message and "--vocab-size" in message
    limit = int(message.split("<= ")[1].split(")")[0].split(" ")[0])
    assert 256 < limit < 50_000  # sentencepiece's own bound, passed on
    assert not (tmp_path / "out").exists()


def test_vocabulary_too_small_and_the_cli_line(tmp_path, texts, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", texts[:2])
    argv = ["--input", str(src), "--out", str(tmp_path / "out"), "--seq-len", "15", "--val-fraction", "0"]
    assert main([*argv, "--vocab-size", "100", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vocab_size=100 is too small" in err and "--vocab-size >= " in err
    assert main([*argv, "--vocab-size", "50000", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "too large for this corpus" in err and not (tmp_path / "out").exists()


def test_input_error_during_tokenizer_training_is_the_input_error(tmp_path, texts):
    bad = _write(tmp_path / "bad.jsonl", json.dumps({"text": texts[0]}) + "\n" + json.dumps({"text": texts[1]}) + "\n[")
    with pytest.raises(ValueError) as info:
        prepare_dataset([bad], tmp_path / "out", seq_len=15, vocab_size=VOCAB, val_fraction=0.0, progress=False)
    assert str(info.value).startswith(f"{bad}:3: bad JSON line") and "INTERNAL" not in str(info.value)


@pytest.mark.parametrize("name", ["x.jsonl", "x.jsonl.gz", "x.txt"])
def test_utf8_error_names_the_file_and_line(tmp_path, name):
    good = (json.dumps({"text": "fine"}) + "\n").encode() if "jsonl" in name else b"fine\n"
    raw = good * 2 + b'{"text": "caf\xe9"}\n' + good
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    with pytest.raises(ValueError, match=rf"{name}:3: not valid UTF-8 \(byte 0xe9 at column 14\)"):
        list(read_documents([path]))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def test_cli(tmp_path, texts, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", texts)
    argv = [
        "--input",
        str(src),
        "--out",
        str(tmp_path / "out"),
        "--vocab-size",
        str(VOCAB),
        "--seq-len",
        "31",
        "--val-fraction",
        "0.2",
        "--workers",
        "2",
        "--no-progress",
    ]
    assert main(argv) == 0
    manifest = read_manifest(tmp_path / "out")
    assert set(manifest["splits"]) == {"train", "val"} and manifest["seq_len"] == 31
    assert (
        main(
            [
                "--input",
                str(tmp_path / "missing.jsonl"),
                "--out",
                str(tmp_path / "o"),
                "--vocab-size",
                "300",
                "--seq-len",
                "8",
            ]
        )
        == 2
    )
    assert "missing.jsonl' does not exist" in capsys.readouterr().err


def test_default_dataset_is_built_once_and_reused(tmp_path):
    out = prepare_default_dataset(tmp_path / "default", vocab_size=512, seq_len=255, progress=False)
    manifest = read_manifest(out)
    assert manifest["vocab_size"] == 512 and set(manifest["splits"]) == {"train", "val"}
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert prepare_default_dataset(out, vocab_size=512, seq_len=255, progress=False) == out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp

    shard = out / manifest["splits"]["train"]["shards"][0]["name"]
    shard.write_bytes(shard.read_bytes()[:1000])
    prepare_default_dataset(out, vocab_size=512, seq_len=255, progress=False)
    assert read_manifest(out)["splits"] == manifest["splits"]  # rebuilt, byte for byte the same
    batch = next(iter(build_loader(out, batch_size=2, dp_rank=0, dp_size=1, seq_len=255, vocab_size=512)))
    assert batch.shape == (2, 256) and int(batch.max()) < 512
