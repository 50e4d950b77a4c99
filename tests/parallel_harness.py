"""Run a function on N gloo ranks (spawned processes on 127.0.0.1) from inside pytest.

    results = run_ranks(2, fn, arg1, arg2)   # fn(rank, world_size, arg1, arg2) on each rank, results[rank]

`fn` and its arguments must be picklable (a module-level function). Each rank gets torch.distributed initialised
(gloo, world `world_size`, loopback only, RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* set as a launcher would) and
cpu_count // world_size torch threads. An exception on any rank fails the call with that rank's traceback; a rank
that dies silently or a run that exceeds `timeout` kills every rank. No rank outlives the call.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankError(RuntimeError):
    """A rank raised, died, or the run timed out."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=120),
        )
        message = (rank, True, pickle.dumps(fn(rank, world_size, *args)))
    except BaseException:  # reported to the parent, which fails the call with it
        message = (rank, False, traceback.format_exc())
    results.put(message)
    if dist.is_initialized():
        dist.destroy_process_group()


def run_ranks(world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 180.0) -> list[Any]:
    """Call fn(rank, world_size, *args) on `world_size` spawned gloo ranks; return the results by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(rank, world_size, port, fn, args, results))
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise RankError(f"timed out after {timeout:.0f}s; ranks done: {sorted(outputs)}") from None
                dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in outputs]
                if dead and results.empty():
                    codes = {r: procs[r].exitcode for r in dead}
                    raise RankError(f"rank(s) exited without a result, exit codes {codes}") from None
                continue
            if not ok:
                raise RankError(f"rank {rank} failed:\n{payload}")
            outputs[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5 if len(outputs) == world_size else 0)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    return [outputs[r] for r in range(world_size)]
