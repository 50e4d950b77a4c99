"""End to end through the real `deepspeed` launcher on CPU: one node with 2 ranks, and two "nodes" on loopback."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))


def overrides(tmp_path: Path, data: Path, steps: int = 6) -> list[str]:
    return [f"data.path={data}", "data.seq_len=64", "model.vocab_size=512", f"train.steps={steps}",
            "train.micro_batch_size=4", "train.eval_every=3", "train.eval_batches=2", f"checkpoint.dir={tmp_path}/ckpt",
            "checkpoint.every=3", "logging.every=1", "logging.progress=false", f"logging.tensorboard_dir={tmp_path}/tb",
            f"logging.metrics_file={tmp_path}/metrics.jsonl"]


def run(cmd: list[str], **env_extra: str) -> subprocess.Popen:
    """Start a launcher in its own process group (so a test can kill it and every rank at once)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", **env_extra)
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


def strict_records(path: Path) -> list[dict]:
    """The metrics file's records; a bare NaN/Infinity (not JSON) fails."""
    def refuse(name):
        raise AssertionError(f"{path}: bare {name} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


NOISE = ("Transformer Engine and Apex", "all_gather_into_tensor", "built successfully", "\r")


@pytest.mark.slow
def test_single_node_two_ranks(tmp_path, small_dataset):
    log = finish(launch_single_node(tmp_path, small_dataset))
    assert len(losses(log)) == 6 and "val_loss" in log
    checkpoints = tmp_path / "ckpt"
    assert (checkpoints / "latest").read_text().strip() == "step00000006"
    assert sorted(p.name for p in checkpoints.glob("step*")) == ["step00000003", "step00000006"]
    assert any((tmp_path / "tb").iterdir())
    # the run explains itself (rank 0 only), without library noise
    assert (checkpoints / "resolved_config.yaml").is_file() and log.count("config (resolved; in full in") == 1
    assert "layout: 2 ranks = dp 2 x tp 1, ZeRO-1, fp32" in log and f"dataset: {small_dataset}: train " in log
    assert f"checkpoint written: {checkpoints / 'step00000003'} (" in log
    closing = next(line for line in log.splitlines() if line.startswith("done: "))
    assert "steps/s after start-up" in closing and closing.endswith(f"last checkpoint {checkpoints / 'step00000006'}")
    assert not [n for n in NOISE if n in log], log
    records = strict_records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    again = finish(launch_single_node(tmp_path, small_dataset))  # a finished job, re-run
    assert "nothing to train: the checkpoint is at step 6 and train.steps=6" in again and "raise train.steps" in again


@pytest.mark.slow
def test_two_nodes_on_loopback(tmp_path, small_dataset):
    """The README's recipe: two launch/multi_node.sh, one per "node" (NODE_RANK 0/1: deepspeed --no_ssh
    --node_rank), one rank each, meeting on 127.0.0.1 (a hostfile naming one host twice is refused by DeepSpeed)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    procs = [
        run(["bash", "launch/multi_node.sh", str(hostfile), "configs/train/tiny_cpu.yaml",
             *overrides(tmp_path, small_dataset, steps=4)], NODE_RANK=str(node), MASTER_ADDR="127.0.0.1",
            MASTER_PORT="29532")
        for node in (0, 1)
    ]
    logs = [finish(p) for p in procs]
    assert len(losses(logs[0])) == 4
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step00000004"


def wait_for_step(path: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and max((r["step"] for r in strict_records(path) if "loss" in r), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def launch_script(tmp_path: Path, data: Path, port: int, steps: int = 40) -> subprocess.Popen:
    return run(["bash", "launch/single_node.sh", "configs/train/tiny_cpu.yaml", *overrides(tmp_path, data, steps),
                "checkpoint.every=0", "train.eval_every=0"], MASTER_PORT=str(port), NPROC="2")


def assert_preempted(proc: subprocess.Popen, tmp_path: Path, steps: int = 40) -> str:
    from pretrain import checkpoint

    log = finish(proc)  # exit status 0
    assert "preempted: checkpoint written at step" in log, log[-4000:]
    stopped_at = checkpoint.read_job(checkpoint.find_resume_point(tmp_path / "ckpt"))["step"]
    assert 3 <= stopped_at < steps
    return log


@pytest.mark.slow
def test_sigterm_to_the_launch_script_checkpoints_and_exits_0(tmp_path, small_dataset):
    """What SLURM or a user signals: the script's process. The ranks get it (as SIGUSR1, past DeepSpeed's 30 s
    SIGKILL), checkpoint and exit 0, and so does the script."""
    proc = launch_script(tmp_path, small_dataset, port=29533)
    wait_for_step(tmp_path / "metrics.jsonl", 3, proc)
    os.kill(proc.pid, signal.SIGTERM)
    log = assert_preempted(proc, tmp_path)
    assert "[launch] SIGTERM: asked 2 rank(s) on this node to checkpoint and exit" in log


@pytest.mark.slow
def test_sigterm_to_the_deepspeed_process_reaches_the_ranks(tmp_path, small_dataset):
    """The bare `deepspeed` front end dies of a SIGTERM without telling anyone: the ranks notice it is gone,
    checkpoint and exit 0; the script exits 0 on their markers although the launcher did not."""
    proc = launch_script(tmp_path, small_dataset, port=29534)
    wait_for_step(tmp_path / "metrics.jsonl", 3, proc)
    runner = next(p for p in psutil.Process(proc.pid).children() if any("deepspeed" in a for a in p.cmdline()[:2]))
    runner.send_signal(signal.SIGTERM)
    log = assert_preempted(proc, tmp_path)
    assert f"the deepspeed launcher (pid {runner.pid}) is gone" in log
    assert "[launch] clean preemption: every rank on this node checkpointed and exited 0" in log


FAKE = """
import os, signal, subprocess, sys, time
from pathlib import Path
role, behaviour, ready = sys.argv[1:4]
stop = []
if role == "launcher":  # like deepspeed.launcher.launch: SIGTERM goes on to the rank, then exit 1
    rank = subprocess.Popen([sys.executable, __file__, "rank", behaviour, ready, "--local_rank=0"],
                            env={**os.environ, "LOCAL_RANK": "0"})
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    while rank.poll() is None and not stop:
        time.sleep(0.05)
    if stop:
        rank.send_signal(signal.SIGTERM)
        rank.wait()
        sys.exit(1)
    sys.exit(rank.returncode)
for sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(sig, lambda signum, frame: stop.append(signum))
Path(ready).write_text("ready")
while not stop:
    time.sleep(0.05)
if behaviour == "fail":
    sys.exit(3)
from pretrain.preemption import mark_clean_exit
mark_clean_exit()
"""


@pytest.mark.parametrize("target,behaviour,status", [("script", "clean", 0), ("group", "clean", 0),
                                                      ("group", "fail", 1)])
def test_supervisor_forwards_signals_and_reads_clean_preemption(tmp_path, target, behaviour, status):
    """A fake launcher and rank: a signal to the supervisor reaches the rank as SIGUSR1 (the launcher sees a clean
    exit); a SIGTERM to every process makes the launcher exit 1, and the rank's marker turns that into 0 unless
    the rank failed."""
    fake, ready = tmp_path / "fake.py", tmp_path / "ready"
    fake.write_text(FAKE)
    proc = run([sys.executable, "-m", "pretrain.preemption", sys.executable, str(fake), "launcher", behaviour,
                str(ready)])
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # the supervisor has seen the rank
    if target == "script":
        os.kill(proc.pid, signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == status, out
    assert ("clean preemption" in out) == (target == "group" and status == 0), out


FAKE_SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do echo "$1" >> "$SRUN_LOG"; shift; done
SLURM_NODEID=0 exec "$@"
"""


def test_slurm_batch_script_keeps_arguments_and_logs_into_the_submit_dir(tmp_path):
    """launch/slurm.sbatch on a fake one-node SLURM (srun and scontrol stubs; DRY_RUN prints the deepspeed command
    the node would run): an override with a space stays one argument, the step gets the node's CPUs, and the log
    goes to the submit directory (sbatch does not create folders for --output)."""
    import shlex

    script = (ROOT / "launch/slurm.sbatch").read_text()
    output = next(line.split("=", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH --output="))
    assert os.path.dirname(output) == "", output
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho node-a\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    job_id = f"pytest-{os.getpid()}"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID=job_id,
               SLURM_JOB_NODELIST="node-a", SLURM_GPUS_ON_NODE="2", SLURM_CPUS_ON_NODE="6", DRY_RUN="1",
               SRUN_LOG=str(tmp_path / "srun.log"))
    spaced = f"logging.metrics_file={tmp_path}/with space/metrics.jsonl"
    try:
        out = subprocess.run(["bash", str(ROOT / "launch/slurm.sbatch"), "configs/train/tiny_cpu.yaml", spaced,
                              "train.steps=5"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert (ROOT / "runs" / f"hostfile-{job_id}").read_text() == "node-a slots=2\n"
    finally:
        (ROOT / "runs" / f"hostfile-{job_id}").unlink(missing_ok=True)
    command = shlex.split(out.stdout.strip().splitlines()[-1])
    assert command[0] == "deepspeed" and command[-3:] == ["configs/train/tiny_cpu.yaml", spaced, "train.steps=5"]
    assert " ".join(command).count("--no_ssh --node_rank 0") == 1 and "--master_addr node-a" in " ".join(command)
    assert "--cpus-per-task=6" in (tmp_path / "srun.log").read_text().split()


def test_venv_setup_runs_once_when_launchers_start_together(tmp_path):
    """Two launchers (or nodes) sourcing env.sh on a fresh venv at once: one installs, the other waits for it."""
    venv, log = tmp_path / "venv", tmp_path / "pip.log"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/usr/bin/env bash\necho "start $$" >> {log}\nsleep 1\necho "end $$" >> {log}\n')
    (venv / "bin" / "python").chmod(0o755)
    env = dict(os.environ, TITANS_VENV=str(venv))
    procs = [subprocess.Popen(["bash", "-c", "source launch/env.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    events = log.read_text().split()[::2]
    assert events == ["start", "end", "start", "end"], log.read_text()  # one install: two pip calls, in turn
    assert "".join(outs).count("[env] setting up") == 1


def test_srun_python_train_is_refused(monkeypatch):
    """`srun -n 4 python pretrain/train.py` would start 4 independent single-rank jobs."""
    from pretrain import train

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    with pytest.raises(SystemExit, match=r"SLURM task 1 of 4 without a launcher.*launch/slurm\.sbatch"):
        train.main(["--config", "configs/train/tiny_cpu.yaml"])
    assert "RANK" not in os.environ
