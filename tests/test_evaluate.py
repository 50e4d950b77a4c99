"""`python -m pretrain.evaluate`: one run on a tiny export writes every figure (strict JSON, heatmaps), and bad
input is one line naming the flag or file, exit status 2."""

import json
import subprocess
import sys

import pytest
import torch

from titans_parallel import ModelConfig, TitansLM
from titans_parallel.config import MemoryConfig


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny random MAC model as a safetensors export (vocabulary of the small_dataset tokenizer)."""
    from pretrain.convert import save_safetensors

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=2, variant="mac", window=16, n_persistent=2,
                         memory=MemoryConfig(chunk_size=4))
    out = tmp_path_factory.mktemp("export")
    save_safetensors(TitansLM(config).state_dict(), config, out, {})
    return out


def test_a_run_writes_every_figure(export, small_dataset, tmp_path, capsys):
    from pretrain.evaluate import main

    main(["--model", str(export), "--data", str(small_dataset), "--seq-len", "64", "--lengths", "32,64,160",
          "--samples", "2", "--stream-chunk", "48", "--niah-lengths", "192,256", "--depths", "0,100",
          "--niah-samples", "2", "--memory-off-too", "--device", "cpu", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "beyond training" in out and "S-NIAH uuid, test-time learning off" in out and "\n tokens " in out
    results = json.loads((tmp_path / "results.json").read_text(), parse_constant=pytest.fail)
    ppl = {(r["length"], r["learning"]): r for r in results["perplexity"]}
    assert set(ppl) == {(n, m) for n in (32, 64, 160) for m in ("on", "off")}
    assert ppl[160, "on"]["by_position"][-2]["positions"] == "beyond the window (>= 16)"
    assert ppl[64, "on"]["loss"] != ppl[64, "off"]["loss"]
    assert len(results["niah"]) == 3 * 2 * 2 * 2
    assert {c["task"] for c in results["niah"]} == {"passkey", "number", "uuid"}
    for task in ("passkey", "number", "uuid"):
        for mode in ("on", "off"):
            assert (tmp_path / f"niah_{task}_{mode}.png").stat().st_size > 0


def one_line_error(argv: list[str], capsys) -> str:
    """The stderr line of `evaluate` run in this process on argv, which must exit with status 2."""
    from pretrain.evaluate import main

    with pytest.raises(SystemExit) as exit:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("flags,message", [
    (["--lengths", "128,x"], "argument --lengths: expected comma-separated integers, got '128,x'"),
    (["--depths", "0,120"], "argument --depths: depths are percentages in [0, 100], got '0,120'"),
    (["--niah-tasks", "passkey,kv"], "argument --niah-tasks: tasks are among ['number', 'passkey', 'uuid'], got"),
    (["--stream-chunk", "0"], "argument --stream-chunk: must be >= 1, got 0"),
])
def test_bad_flags_are_one_line(flags, message, tmp_path, capsys):
    assert one_line_error(["--model", str(tmp_path), *flags], capsys).startswith(f"evaluate: error: {message}")


def test_too_short_needle_and_missing_checkpoint_name_the_culprit(export, small_dataset, tmp_path, capsys):
    line = one_line_error(["--model", str(export), "--data", str(small_dataset), "--seq-len", "64", "--skip",
                           "perplexity", "--niah-lengths", "20,256"], capsys)
    assert line == ("evaluate: error: argument --niah-lengths: 20 is too short to hold the passkey needle and its "
                    "question")
    missing = tmp_path / "nothing-here"
    done = subprocess.run([sys.executable, "-m", "pretrain.evaluate", "--model", str(missing)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"evaluate: error: {missing}: no such checkpoint folder"]


def test_default_niah_lengths_run_from_below_the_window_per_task(export, small_dataset, tmp_path, capsys):
    """Default lengths window x 1/2 ... 16: each task keeps those that hold its needle (a passkey fits in fewer
    tokens than a UUID), and says which it left out."""
    from pretrain.evaluate import main

    main(["--model", str(export), "--data", str(small_dataset), "--seq-len", "64", "--skip", "perplexity",
          "--depths", "50", "--niah-samples", "1", "--niah-tasks", "passkey,uuid", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    cells = json.loads((tmp_path / "results.json").read_text())["niah"]
    lengths = {task: sorted(c["length"] for c in cells if c["task"] == task) for task in ("passkey", "uuid")}
    assert lengths["passkey"][-1] == lengths["uuid"][-1] == 256 and lengths["passkey"][0] < lengths["uuid"][0]
    assert set(lengths["uuid"]) < set(lengths["passkey"]) <= {8, 16, 32, 64, 128, 256}
    assert "S-NIAH uuid: default lengths [8, 16" in out and "left out" in out


def test_perplexity_table_puts_off_beside_on_with_the_gap():
    from pretrain.evaluate import format_perplexity

    def report(length, learning, loss):
        buckets = [dict(positions="0-7", loss=loss), dict(positions="all positions", loss=loss)]
        return dict(length=length, learning=learning, loss=loss, ppl=2 * loss, sequences=2, by_position=buckets)

    lines = format_perplexity([report(64, "on", 2.0), report(64, "off", 2.2), report(128, "on", 2.0),
                               report(128, "off", 2.1)], 64).splitlines()
    assert lines[1].split() == ["length", "seqs", "loss", "on", "ppl", "on", "loss", "off", "ppl", "off", "off", "vs",
                                "on"]
    assert lines[2].split() == ["64", "2", "2.0000", "4.00", "2.2000", "4.40", "+10.00%"]
    assert lines[3].split()[-3:] == ["+5.00%", "beyond", "training"]
    assert lines[4] == "loss by position at length 64 (learning on / off, off vs on):"
    assert lines[5].split() == ["0-7", "2.0000", "2.2000", "+10.00%"]
