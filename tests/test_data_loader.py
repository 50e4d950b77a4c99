"""Streaming loader: exactly-once delivery over DP ranks x workers, TP peers, exact resume, manifest and damage checks.

The datasets here are synthetic shards whose sample ``i`` carries its own index (tokens[0] + tokens[1] * vocab),
so every check compares sample identities against an independent count, never a recorded result.
"""

from __future__ import annotations

import itertools
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.data.loader import CorruptShardError, build_loader
from pretrain.data.order import SampleOrder
from pretrain.data.shards import (
    FORMAT,
    MANIFEST,
    ManifestError,
    SplitWriter,
    read_manifest,
    sha256_file,
    token_dtype,
    write_manifest,
)

SEQ_LEN = 7
VOCAB = 1000


def sample_tokens(i: int, vocab: int = VOCAB) -> np.ndarray:
    """Sample ``i``: its index in the first two ids, then a pattern spread over the vocabulary."""
    pattern = [(7919 * i + 104729 * k) % vocab for k in range(SEQ_LEN - 1)]
    return np.array([i % VOCAB, i // VOCAB] + pattern, dtype=np.uint32)


def sample_ids(batch: torch.Tensor) -> list[int]:
    return (batch[:, 0] + batch[:, 1] * VOCAB).tolist()


def make_dataset(root: Path, n_samples: int = 23, shard_samples: int = 5, vocab: int = VOCAB) -> Path:
    """A train split of ``n_samples`` synthetic samples in shards of ``shard_samples`` (the last one shorter)."""
    writer = SplitWriter(root, "train", SEQ_LEN, vocab, shard_samples)
    for i in range(n_samples):
        writer.add(sample_tokens(i, vocab))
    (root / "tokenizer.model").write_bytes(b"stand-in tokenizer")
    manifest = {
        "format": FORMAT,
        "seq_len": SEQ_LEN,
        "vocab_size": vocab,
        "dtype": token_dtype(vocab).name,
        "eos_id": 2,
        "tokenizer": {"file": "tokenizer.model", "sha256": sha256_file(root / "tokenizer.model")},
        "build": {},
        "splits": {"train": writer.close()},
    }
    write_manifest(root, manifest)
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "ds")


def take(loader, n_batches: int) -> list[torch.Tensor]:
    return list(itertools.islice(iter(loader), n_batches))


def take_samples(loader, n_samples: int) -> list[int]:
    ids: list[int] = []
    for batch in loader:
        assert batch.dtype == torch.int64 and batch.shape[1] == SEQ_LEN + 1
        ids += sample_ids(batch)
        if len(ids) >= n_samples:
            return ids[:n_samples]
    raise AssertionError("loader ended early")


def shard_of_sample(root: Path) -> dict[int, str]:
    """Independent map sample -> shard name, read from the tar files themselves."""
    out = {}
    for shard in read_manifest(root)["splits"]["train"]["shards"]:
        with tarfile.open(root / shard["name"]) as tar:
            for member in tar.getmembers():
                out[int(member.name.split(".")[0])] = shard["name"]
    return out


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("dp_size,num_workers", [(1, 0), (3, 0), (3, 2), (4, 2)])
def test_every_sample_once_per_epoch(dataset, dp_size, num_workers, shuffle):
    n_total = 23
    per_rank = n_total // dp_size
    shards = shard_of_sample(dataset)
    for epoch in range(2):
        seen = []
        for rank in range(dp_size):
            loader = build_loader(
                dataset,
                batch_size=2,
                dp_rank=rank,
                dp_size=dp_size,
                num_workers=num_workers,
                shuffle=shuffle,
                shuffle_buffer=6,
                shuffle_lanes=2,
            )
            stream = take_samples(loader, per_rank * (epoch + 1))
            assert loader.samples_per_epoch == per_rank
            seen += stream[per_rank * epoch :]
        assert len(seen) == len(set(seen)) == per_rank * dp_size
        dropped = sorted(set(range(n_total)) - set(seen))
        assert len(dropped) == n_total % dp_size
        if dropped:
            # The dropped remainder is the tail of the epoch's last shard: consecutive samples ending a shard.
            (shard,) = {shards[i] for i in dropped}
            last_of_shard = max(i for i, s in shards.items() if s == shard)
            assert dropped == list(range(last_of_shard - len(dropped) + 1, last_of_shard + 1))
            if not shuffle:
                assert dropped[-1] == n_total - 1


@pytest.mark.parametrize("trial", range(20))
def test_sample_order_partitions_every_epoch(trial):
    """SampleOrder alone, on random shard counts and settings: ranks x blocks cover each epoch exactly once."""
    rng = np.random.default_rng(trial)
    counts = rng.integers(0, 40, size=rng.integers(1, 12)).tolist() + [int(rng.integers(1, 40))]
    total = sum(counts)
    dp_size = int(rng.integers(1, min(total, 6) + 1))
    options = dict(seed=trial, shuffle=bool(trial % 4), buffer=int(rng.integers(1, 50)), lanes=int(rng.integers(1, 6)))
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for epoch in range(2):
        seen = []
        for rank in range(dp_size):
            order = SampleOrder(counts, dp_rank=rank, dp_size=dp_size, **options)
            assert order.block_starts[-1] == order.samples_per_epoch == total // dp_size
            for block in range(len(order.block_starts) - 1):
                stream = [
                    first[p.shard] + i
                    for lane in order.block_pieces(epoch, block)
                    for p in lane
                    for i in range(p.start, p.stop)
                ]
                perm = order.block_permutation(epoch, block)
                assert sorted(perm) == list(range(len(stream))) == list(range(order.block_size(block)))
                seen += [stream[i] for i in perm]
        assert len(seen) == len(set(seen)) == total - total % dp_size


def test_shuffle_changes_order_between_epochs_and_seeds(dataset):
    loader = build_loader(dataset, batch_size=4, dp_rank=0, dp_size=1, shuffle_buffer=8, shuffle_lanes=2)
    two_epochs = take_samples(loader, 46)
    assert sorted(two_epochs[:23]) == sorted(two_epochs[23:]) == list(range(23))
    assert two_epochs[:23] != two_epochs[23:] and two_epochs[:23] != list(range(23))
    other_seed = build_loader(dataset, batch_size=4, dp_rank=0, dp_size=1, seed=1, shuffle_buffer=8, shuffle_lanes=2)
    assert take_samples(other_seed, 23) != two_epochs[:23]


def test_order_independent_of_workers_and_batch_size(dataset):
    streams = [
        take_samples(build_loader(dataset, batch_size=b, dp_rank=1, dp_size=2, num_workers=w, shuffle_buffer=5), 40)
        for b, w in [(1, 0), (4, 0), (3, 2), (5, 2)]
    ]
    assert all(s == streams[0] for s in streams)


def test_tp_peers_get_identical_batches(dataset, monkeypatch):
    """Two tensor-parallel peers: same dp_rank, different global RANK in the environment."""
    batches = []
    for global_rank in (0, 1):
        monkeypatch.setenv("RANK", str(global_rank))
        monkeypatch.setenv("WORLD_SIZE", "4")
        monkeypatch.setenv("LOCAL_RANK", str(global_rank))
        loader = build_loader(dataset, batch_size=3, dp_rank=1, dp_size=2, num_workers=2)
        batches.append(torch.cat(take(loader, 6)))
    assert torch.equal(batches[0], batches[1])
    other = torch.cat(take(build_loader(dataset, batch_size=3, dp_rank=0, dp_size=2, num_workers=2), 3))
    assert not set(sample_ids(other)) & set(sample_ids(batches[0][:11]))


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop_after", [2, 5, 9])  # positions 6 (mid epoch 0), 15 (epoch 1), 27 (epoch 2 of 11)
def test_resume_reproduces_the_uninterrupted_stream(dataset, num_workers, stop_after):
    def make(workers: int):
        return build_loader(dataset, batch_size=3, dp_rank=0, dp_size=2, num_workers=workers, shuffle_buffer=4)

    reference = torch.cat(take(make(num_workers), 14))
    first = make(num_workers)
    head = take(first, stop_after)
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint holds plain JSON
    assert state["samples"] == 3 * stop_after
    assert (state["epoch"], state["sample_in_epoch"]) == divmod(3 * stop_after, 11)
    for workers in (num_workers, 2 - num_workers):  # also resume under a different number of workers
        resumed = make(workers)
        resumed.load_state_dict(state)
        tail = take(resumed, 14 - stop_after)
        assert torch.equal(torch.cat(head + tail), reference)


def test_state_for_another_order_is_rejected(dataset):
    state = build_loader(dataset, batch_size=2, dp_rank=0, dp_size=2).state_dict()
    for changed in ({"dp_size": 3}, {"seed": 5}, {"dp_rank": 1}):
        options = {"dp_rank": 0, "dp_size": 2, **changed}
        with pytest.raises(ValueError, match=next(iter(changed))):
            build_loader(dataset, batch_size=2, **options).load_state_dict(state)


def test_wide_vocabulary_is_stored_as_uint32(tmp_path):
    root = make_dataset(tmp_path / "wide", n_samples=7, vocab=70_000)
    assert read_manifest(root)["dtype"] == "uint32"
    (batch,) = build_loader(root, batch_size=7, dp_rank=0, dp_size=1, shuffle=False, epochs=1)
    assert torch.equal(batch, torch.from_numpy(np.stack([sample_tokens(i, 70_000) for i in range(7)]).astype(np.int64)))
    assert int(batch.max()) >= 1 << 16


def test_one_pass_mode_yields_one_epoch(dataset):
    loader = build_loader(dataset, batch_size=4, dp_rank=1, dp_size=2, shuffle=False, epochs=1, num_workers=2)
    batches = list(loader)
    assert [len(b) for b in batches] == [4, 4, 3]
    assert sum(map(sample_ids, batches), []) == list(range(11, 22))


# Manifest checks.


def test_missing_shard_names_it(dataset):
    (dataset / "train" / "shard-000002.tar").unlink()
    with pytest.raises(ManifestError, match="missing shard train/shard-000002.tar"):
        build_loader(dataset, batch_size=2, dp_rank=0, dp_size=1)


def test_wrong_tokenizer_and_seq_len_and_vocab_are_named(dataset):
    good = sha256_file(dataset / "tokenizer.model")
    build_loader(dataset, batch_size=2, dp_rank=0, dp_size=1, tokenizer_sha256=good, seq_len=SEQ_LEN, vocab_size=VOCAB)
    with pytest.raises(ManifestError, match="tokenizer mismatch"):
        build_loader(dataset, batch_size=2, dp_rank=0, dp_size=1, tokenizer_sha256="0" * 64)
    with pytest.raises(ManifestError, match=f"seq_len mismatch: manifest has {SEQ_LEN}, the config expects 16"):
        build_loader(dataset, batch_size=2, dp_rank=0, dp_size=1, seq_len=16)
    with pytest.raises(ManifestError, match="vocab_size mismatch"):
        build_loader(dataset, batch_size=2, dp_rank=0, dp_size=1, vocab_size=VOCAB - 1)
    with pytest.raises(ManifestError, match="split 'val' not in"):
        build_loader(dataset, batch_size=2, dp_rank=0, dp_size=1, split="val")
    with pytest.raises(ValueError, match="cannot give each of 24"):
        build_loader(dataset, batch_size=2, dp_rank=0, dp_size=24)


def test_missing_or_foreign_manifest(tmp_path, dataset):
    with pytest.raises(ManifestError, match="does not exist"):
        build_loader(tmp_path, batch_size=2, dp_rank=0, dp_size=1)
    manifest = json.loads((dataset / MANIFEST).read_text())
    manifest["format"] = "something-else"
    (dataset / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="format"):
        build_loader(dataset, batch_size=2, dp_rank=0, dp_size=1)


# Damaged shards.


def corrupt_member(path: Path, sample_in_shard: int) -> None:
    """Overwrite the start of one tar member's data (the .npy header) with garbage, keeping the size."""
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[sample_in_shard].offset_data
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xde\xad\xbe\xef garbage")


def epoch_loader(root: Path, **options):
    return build_loader(root, batch_size=4, dp_rank=0, dp_size=1, shuffle_buffer=8, **options)


def test_garbage_in_a_member_raises_naming_shard_and_sample(dataset):
    corrupt_member(dataset / "train" / "shard-000001.tar", 3)
    with pytest.raises(CorruptShardError, match=r"train/shard-000001.tar: sample 3: cannot decode tokens.npy"):
        take_samples(epoch_loader(dataset, verify_sha256=False), 23)
    with pytest.raises(CorruptShardError, match=r"train/shard-000001.tar: sha256"):
        take_samples(epoch_loader(dataset), 23)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_garbage_in_a_member_is_skipped_counted_and_logged(dataset, caplog, num_workers):
    corrupt_member(dataset / "train" / "shard-000001.tar", 3)  # sample 8
    loader = epoch_loader(dataset, on_corrupt="skip", num_workers=num_workers, verify_sha256=False)
    with caplog.at_level(logging.WARNING, logger="pretrain.data.loader"):
        stream = take_samples(loader, 46)
    for epoch in (stream[:23], stream[23:]):
        assert 8 not in epoch
        assert set(epoch) == set(range(23)) - {8}  # the slot is refilled by another sample of the epoch
    assert loader.skipped == 2
    if num_workers == 0:  # worker processes log through their own handlers
        assert "train/shard-000001.tar: sample 3" in caplog.text


def test_truncated_shard_fails_the_size_check(dataset):
    path = dataset / "train" / "shard-000003.tar"
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(CorruptShardError, match=r"train/shard-000003.tar: size 3000 bytes, manifest says"):
        epoch_loader(dataset)
    loader = epoch_loader(dataset, on_corrupt="skip")
    stream = take_samples(loader, 23)
    assert not set(stream) & set(range(15, 20))
    assert set(stream) == set(range(23)) - set(range(15, 20))
    assert loader.skipped == 5


def test_truncation_found_while_reading(dataset):
    """A shard cut short whose manifest entry agrees on the size (e.g. written by a crashed job)."""
    path = dataset / "train" / "shard-000003.tar"
    with tarfile.open(path) as tar:
        cut = tar.getmembers()[2].offset_data + 100
    path.write_bytes(path.read_bytes()[:cut])
    manifest = read_manifest(dataset)
    manifest["splits"]["train"]["shards"][3]["bytes"] = cut
    write_manifest(dataset, manifest)
    with pytest.raises(CorruptShardError, match=r"train/shard-000003.tar: sample 2: unreadable"):
        take_samples(epoch_loader(dataset, shuffle=False, verify_sha256=False), 23)
    loader = epoch_loader(dataset, on_corrupt="skip", shuffle=False, verify_sha256=False)
    assert set(take_samples(loader, 23)) == set(range(23)) - {17, 18, 19}
    assert loader.skipped == 3


@pytest.mark.parametrize("on_corrupt", ["raise", "skip"])
def test_token_id_out_of_vocabulary_is_an_error(dataset, on_corrupt):
    manifest = read_manifest(dataset)
    manifest["vocab_size"] = 20  # the pattern ids spread over [0, 1000)
    write_manifest(dataset, manifest)
    with pytest.raises(ValueError, match=r"train/shard-\d+.tar: sample \d+: token id \d+ >= vocab_size 20"):
        take_samples(epoch_loader(dataset, on_corrupt=on_corrupt), 23)


def change_a_token(path: Path, sample_in_shard: int) -> None:
    """Same-size corruption that still decodes: one token id of a sample becomes another valid id."""
    with tarfile.open(path) as tar:
        member = tar.getmembers()[sample_in_shard]
    with open(path, "r+b") as f:
        f.seek(member.offset_data + member.size - 2)  # the last uint16 id
        old = int.from_bytes(f.read(2), "little")
        f.seek(-2, 1)
        f.write(((old + 1) % VOCAB).to_bytes(2, "little"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_same_size_corruption_is_found_by_default_naming_the_shard(dataset, num_workers):
    path = dataset / "train" / "shard-000002.tar"
    size = path.stat().st_size
    change_a_token(path, 1)
    assert path.stat().st_size == size
    assert set(take_samples(epoch_loader(dataset, verify_sha256=False, shuffle=False), 23)) == set(range(23))
    loader = epoch_loader(dataset, num_workers=num_workers)  # the start checks (sizes) pass
    with pytest.raises(CorruptShardError, match=r"train/shard-000002.tar: sha256 [0-9a-f]+ differs from the manifest"):
        take_samples(loader, 23)


def test_same_size_corruption_with_skip_drops_the_shard(dataset, caplog):
    change_a_token(dataset / "train" / "shard-000002.tar", 1)  # samples 10-14
    loader = epoch_loader(dataset, on_corrupt="skip")
    with caplog.at_level(logging.WARNING, logger="pretrain.data.loader"):
        stream = take_samples(loader, 23)
    assert set(stream) == set(range(23)) - set(range(10, 15)) and loader.skipped == 5
    assert "train/shard-000002.tar: sha256" in caplog.text and "skipping the whole shard" in caplog.text


def test_sha256_is_computed_once_per_shard_cached_by_size_and_mtime(dataset, monkeypatch):
    import os

    import pretrain.data.loader as loader_module

    hashed: list[str] = []
    real = loader_module.sha256_file
    monkeypatch.setattr(loader_module, "_VERIFIED", {})
    monkeypatch.setattr(loader_module, "sha256_file", lambda path: hashed.append(Path(path).name) or real(path))
    take_samples(epoch_loader(dataset), 3 * 23)  # three epochs
    assert sorted(hashed) == [f"shard-{i:06d}.tar" for i in range(5)]
    take_samples(epoch_loader(dataset), 23)  # a new loader in the same process (e.g. the next evaluation)
    assert len(hashed) == 5
    path = dataset / "train" / "shard-000004.tar"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # touched: hashed again
    take_samples(epoch_loader(dataset), 23)
    assert hashed[5:] == ["shard-000004.tar"]
