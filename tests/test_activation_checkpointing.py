"""Activation checkpointing (`TitansLM.activation_checkpointing`): the same loss and gradients for every variant,
decoding untouched, and the memory's explicit backward keeps nothing outside `saved_tensors`."""

import pytest
import torch
from torch.utils._pytree import tree_flatten

from titans_parallel import lm_loss
from titans_parallel.model import TitansLM
from parallel_harness import run_ranks
from test_model import VARIANTS, make_model
from test_train import _run_job

MEMORY = dict(chunk_size=4, depth=2, expansion=2)


def loss_and_grads(model: TitansLM, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The next-token loss of ids [B, T] and every parameter's gradient (fresh)."""
    model.zero_grad(set_to_none=True)
    loss = lm_loss(model(ids[:, :-1]), ids[:, 1:])
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


@pytest.mark.parametrize("memory", [MEMORY, dict(MEMORY, normalize_weights=False, polyak_step=False)],
                         ids=["stabilised", "paper-rule"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpointed_loss_and_gradients_equal_plain(variant, memory):
    ids = torch.randint(0, 61, (2, 27))
    model = make_model(variant, memory=memory)
    loss, grads = loss_and_grads(model, ids)
    model.activation_checkpointing = True
    loss_c, grads_c = loss_and_grads(model, ids)
    assert abs(loss.item() - loss_c.item()) <= 1e-12
    assert all(g is not None for g in grads_c)
    assert max((a - b).abs().max().item() for a, b in zip(grads, grads_c)) <= 1e-10


@pytest.mark.parametrize("variant", ["mac", "mal", "swa"])
def test_checkpointed_model_decodes_as_one_pass(variant):
    ids = torch.randint(0, 61, (2, 19))
    model = make_model(variant)
    model.activation_checkpointing = True
    full = model(ids)
    first, cache = model.decode(ids[:, :11], None)
    rest, _ = model.decode(ids[:, 11:], cache)
    assert (torch.cat([first, rest], dim=1) - full).abs().max().item() <= 1e-10
    with torch.no_grad():
        assert torch.equal(model.generate(ids[:, :5], 6, temperature=0), make_model(variant).generate(ids[:, :5], 6, temperature=0))


def graph_nodes(root) -> list:
    """Every autograd node reachable from root."""
    seen, stack = {}, [root]
    while stack:
        node = stack.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = node
            stack.extend(next_node for next_node, _ in node.next_functions)
    return list(seen.values())


@pytest.mark.parametrize("memory", [MEMORY, dict(MEMORY, normalize_weights=False, polyak_step=False)],
                         ids=["stabilised", "paper-rule"])
def test_memory_scan_keeps_its_intermediates_in_saved_tensors(memory):
    """The memory's explicit backward holds no tensor outside `saved_tensors` (which a non-reentrant checkpoint
    frees after the forward and recomputes), so checkpointing a block frees the scan's per-chunk intermediates."""
    model = make_model("lmm", memory=memory)
    loss = lm_loss(model(torch.randint(0, 61, (2, 26))), torch.randint(0, 61, (2, 26)))
    loops = [node for node in graph_nodes(loss.grad_fn) if type(node).__name__ == "_ChunkLoopBackward"]
    assert loops
    for node in loops:
        kept, _ = tree_flatten(list(vars(node).values()))
        assert not any(isinstance(leaf, torch.Tensor) for leaf in kept)
        assert len(node.saved_tensors) > len(node.next_functions)  # the inputs and the per-chunk intermediates


def checkpointing_runs(tmp_path, world_size: int, zero_stage: int, steps: int) -> tuple[dict, dict]:
    """(plain, checkpointed) losses and grad norms of the same job (fp32, the tiny MAC of test_train)."""
    return tuple(
        run_ranks(world_size, _run_job, {"train": {"zero_stage": zero_stage, "activation_checkpointing": on,
                                                   "steps": steps},
                                         "checkpoint": {"dir": str(tmp_path / str(on))}}, timeout=600)[0]
        for on in (False, True)
    )


def assert_same_run(plain: dict, checkpointed: dict) -> None:
    for key in ("losses", "grad_norms"):
        for a, b in zip(checkpointed[key], plain[key], strict=True):
            assert abs(a - b) <= 1e-6 * abs(b), (key, checkpointed[key], plain[key])


def test_checkpointed_job_trains_like_the_plain_one(tmp_path):
    """train.activation_checkpointing=true on one rank (ZeRO-1): the same losses and grad norms over 4 steps."""
    assert_same_run(*checkpointing_runs(tmp_path, 1, 1, steps=4))


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_checkpointed_job_trains_like_the_plain_one_under_zero(tmp_path, zero_stage):
    """DP=2 under ZeRO-2 and ZeRO-3 (whose parameter gathers are module hooks, run again by the recompute), 10
    steps."""
    assert_same_run(*checkpointing_runs(tmp_path, 2, zero_stage, steps=10))
