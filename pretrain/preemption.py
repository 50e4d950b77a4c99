"""Preemption: a signal to the job becomes a checkpoint on every rank and a clean exit (status 0).

Ranks (`PreemptionFlag`, used by pretrain/train.py): SIGTERM or SIGUSR1 sets a flag, and so does the deepspeed
launcher vanishing (a SIGTERM or SIGKILL to the bare `deepspeed` process kills it without telling the ranks); the
ranks agree on the flag once per step, so every rank checkpoints the same step, and each leaves a marker for the
supervisor below before exiting 0.

Launch scripts (`python -m pretrain.preemption deepspeed ...`, used by launch/single_node.sh and multi_node.sh): run
the deepspeed launcher under a supervisor that

- on SIGTERM or SIGUSR1 sends SIGUSR1 to this node's ranks (the processes started with `--local_rank=`), not to
  DeepSpeed's launcher: on SIGTERM that one sends SIGTERM to the ranks and SIGKILLs them 30 s later, a limit
  hard-coded in deepspeed/launcher/launch.py (`terminate_process_tree`: `psutil.wait_procs(children, timeout=30)`,
  DeepSpeed 0.19; no option or variable changes it), too short for a large checkpoint; and then exits 1;
- starts the launcher with SIGUSR1 ignored (the ranks install their own handler), so a SIGUSR1 sent to every
  process of a job step (SLURM `--signal=USR1@N`) reaches the ranks and leaves the launcher processes running;
- waits for the ranks too (they may outlive a killed launcher), and exits 0 when the launcher failed although every
  rank of this node left its clean-preemption marker (DeepSpeed's launcher exits 1 after forwarding a SIGTERM
  even when every rank exits 0), else with the launcher's status;
- with no ranks on this node (an ssh/pdsh launch of other nodes) passes the signal to the launcher unchanged.

`DRY_RUN=1` prints the command instead of running it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

MARKER_DIR_ENV = "TITANS_PREEMPT_DIR"  # set by the supervisor for the ranks it starts
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _marker(directory: str | Path, local_rank: int | str) -> Path:
    return Path(directory) / f"local{local_rank}"


def mark_clean_exit() -> None:
    """A rank that checkpointed on preemption and is about to exit 0 says so to the supervisor (if any)."""
    directory = os.environ.get(MARKER_DIR_ENV)
    if directory and Path(directory).is_dir():
        _marker(directory, os.environ.get("LOCAL_RANK", "0")).write_text(f"{os.getpid()}\n")


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _is_launcher(proc: psutil.Process) -> bool:
    """DeepSpeed's per-node launcher (deepspeed.launcher.launch) or its front end (the `deepspeed` script)."""
    try:
        cmdline = proc.cmdline()
    except psutil.Error:
        return False
    return any(a in ("deepspeed.launcher.launch", "deepspeed.launcher.runner") or os.path.basename(a) == "deepspeed"
               for a in cmdline[:4])


class PreemptionFlag:
    """SIGTERM / SIGUSR1 set a flag, as does the deepspeed launcher above this rank exiting; ranks agree on it once
    per step (all-reduce MAX), so every rank checkpoints the same step before exiting, however far apart the
    signals arrived."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        self.launchers: list[psutil.Process] = []
        proc = psutil.Process()
        for _ in range(2):  # launch.py, then the `deepspeed` front end
            proc = proc.parent() if proc is not None else None
            if proc is None or not _is_launcher(proc):
                break
            self.launchers.append(proc)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def _launcher_gone(self) -> bool:
        gone = next((p for p in self.launchers if not _alive(p)), None)
        if gone is not None:
            self.launchers = []
            print(f"rank {os.environ.get('RANK', '0')}: the deepspeed launcher (pid {gone.pid}) is gone: "
                  "checkpointing and exiting", file=sys.stderr, flush=True)
        return gone is not None

    def agreed(self, device) -> bool:
        import torch
        import torch.distributed as dist

        self.requested = self._launcher_gone() or self.requested
        flag = torch.tensor(float(self.requested), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _local_ranks(root: psutil.Process) -> dict[int, tuple[int, psutil.Process]]:
    """pid -> (local rank, process) of the ranks under `root`."""
    found = {}
    try:
        children = root.children(recursive=True)
    except psutil.Error:
        return found
    for proc in children:
        try:
            arg = next((a for a in proc.cmdline() if a.startswith("--local_rank=")), None)
        except psutil.Error:
            continue
        if arg is not None:
            found[proc.pid] = (int(arg.split("=", 1)[1]), proc)
    return found


def supervise(command: list[str], poll: float = 0.5) -> int:
    """Run `command` (the deepspeed launcher) as described in the module docstring; returns the exit status."""
    marker_dir = tempfile.mkdtemp(prefix="titans-preempt-")
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in SIGNALS}
    try:
        child = subprocess.Popen(command, env={**os.environ, MARKER_DIR_ENV: marker_dir},
                                 preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN))
        root = psutil.Process(child.pid)
        ranks: dict[int, tuple[int, psutil.Process]] = {}
        handled = 0
        while True:
            if child.poll() is None:
                ranks.update(_local_ranks(root))
            for signum in received[handled:]:
                targets = [proc for _, proc in ranks.values() if _alive(proc)]
                for proc in targets:
                    proc.send_signal(signal.SIGUSR1)
                if not targets and child.poll() is None:
                    child.send_signal(signum)
                print(f"[launch] {signal.Signals(signum).name}: asked {len(targets)} rank(s) on this node to "
                      "checkpoint and exit", file=sys.stderr, flush=True)
            handled = len(received)
            if child.poll() is not None and not any(_alive(proc) for _, proc in ranks.values()):
                break
            time.sleep(poll)
        status = child.returncode
        clean = bool(ranks) and all(_marker(marker_dir, local).is_file() for local, _ in ranks.values())
        if status != 0 and clean:
            print(f"[launch] clean preemption: every rank on this node checkpointed and exited 0 (the deepspeed "
                  f"launcher reported status {status}); exiting 0", file=sys.stderr, flush=True)
            status = 0
        return status if status >= 0 else 128 - status
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(marker_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    command = sys.argv[1:] if argv is None else argv
    if not command or command[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if command else 2
    if os.environ.get("DRY_RUN"):
        print(shlex.join(command), flush=True)
        return 0
    return supervise(command)


if __name__ == "__main__":
    sys.exit(main())
