"""End to end through the real `deepspeed` launcher on CPU: one node with 2 ranks, and two "nodes" on loopback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))


def overrides(tmp_path: Path, data: Path, steps: int = 6) -> list[str]:
    return [f"data.path={data}", "data.seq_len=64", "model.vocab_size=512", f"train.steps={steps}",
            "train.micro_batch_size=4", "train.eval_every=3", "train.eval_batches=2", f"checkpoint.dir={tmp_path}/ckpt",
            "checkpoint.every=3", "logging.every=1", "logging.progress=false", f"logging.tensorboard_dir={tmp_path}/tb",
            f"logging.metrics_file={tmp_path}/metrics.jsonl"]


def run(cmd: list[str]) -> subprocess.Popen:
    """Start a launcher in its own process group (so a test can kill it and every rank at once)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def launch_single_node(tmp_path: Path, data: Path, *extra: str, steps: int = 6, port: int = 29531) -> subprocess.Popen:
    return run([DEEPSPEED, "--num_nodes", "1", "--num_gpus", "2", "--master_port", str(port), "pretrain/train.py",
                "--config", "configs/train/tiny_cpu.yaml", *overrides(tmp_path, data, steps), *extra])


def finish(proc: subprocess.Popen, timeout: int = 600) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"timed out:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-6000:]
    return out


def losses(log: str) -> list[float]:
    return [float(line.split(" loss ")[1].split()[0]) for line in log.splitlines() if line.startswith("step ") and " loss " in line]


@pytest.mark.slow
def test_single_node_two_ranks(tmp_path, small_dataset):
    log = finish(launch_single_node(tmp_path, small_dataset))
    assert len(losses(log)) == 6 and "val_loss" in log
    checkpoints = tmp_path / "ckpt"
    assert (checkpoints / "latest").read_text().strip() == "step00000006"
    assert sorted(p.name for p in checkpoints.glob("step*")) == ["step00000003", "step00000006"]
    assert any((tmp_path / "tb").iterdir())


@pytest.mark.slow
def test_two_nodes_on_loopback(tmp_path, small_dataset):
    """Two launchers, one per "node" (--no_ssh --node_rank 0/1), one rank each, meeting on 127.0.0.1."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    procs = [
        run([DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_addr",
             "127.0.0.1", "--master_port", "29532", "pretrain/train.py", "--config", "configs/train/tiny_cpu.yaml",
             *overrides(tmp_path, small_dataset, steps=4)])
        for node in (0, 1)
    ]
    logs = [finish(p) for p in procs]
    assert len(losses(logs[0])) == 4
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step00000004"
