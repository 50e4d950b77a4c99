"""Forward+backward tokens/s of every variant at one shape, and lucidrains' MemoryAsContextTransformer beside ours.

    python bench/model.py                         # D=256, 4 layers, segment/window 128, memory in layers 2 and 4
    python bench/model.py --seq 4096 --device cuda --no-peer
    python bench/model.py --seq 1024 4096 16384 --no-peer --compile off   # tokens/s against T, one run
    python bench/model.py --no-peer --compile off --documents 4   # each variant also on packed rows, resets on

Memory variants run eager and with `memory.compile_scan` (torch.compile of each chunk step; compiled in the
warm-up round). The peer (pip install -r requirements-bench.txt) is built at matched size: dim 256, depth 4,
heads 4 x 64, segment 128, 4 persistent tokens, 16 long-term memory tokens per segment, 4 residual streams, neural
memory (depth-2 MLP, expansion 4) in layers 2 and 4, twice: with its defaults (memory chunk = segment + long-term
tokens = 144; batch_size=None, every inner gradient taken at the weights the call started from) and matched to what
ours computes (memory chunk 16 with the paper's rule, batch_size = chunk). Our Titans variants
use the same width, depth, window and memory; memory-free layers are SWA. All runs alternate round by round.
`--documents N` also times every variant with `model.document_reset` on rows holding N EOS at random places.
"""

from __future__ import annotations

import argparse
import time

import torch

from timing import interleaved_medians

from pretrain.denormals import flush_denormals
from titans_parallel import MemoryConfig, ModelConfig, TitansLM, lm_loss
from titans_parallel.config import MEMORY_KINDS
from titans_parallel.parallel import SINGLE_RANK, ParallelDims

VARIANTS = ("mac", "mag", "mal", "lmm", "swa", "transformer")


EOS = 2


def our_model(variant: str, compiled: bool, args, parallel: ParallelDims = SINGLE_RANK,
              document_reset: bool = False, n_heads: int | None = None, expansion: int = 4) -> TitansLM:
    """Titans variants put memory in layers 2 and 4 of 4 (SWA elsewhere), as the peer does; built with `parallel`.
    n_heads defaults to dim // 64; expansion is the memory MLP's."""
    pattern = None
    if variant in MEMORY_KINDS and args.layers == 4:
        pattern = ["swa", variant, "swa", variant]
    memory = MemoryConfig(chunk_size=args.chunk, depth=2, expansion=expansion, compile_scan=compiled)
    config = ModelConfig(
        vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=n_heads or args.dim // 64, variant=variant,
        layer_pattern=pattern, window=args.window, memory=memory, document_reset=document_reset, eos_id=EOS,
    )
    return TitansLM(config, parallel)


def peer_model(args, matched: bool) -> torch.nn.Module:
    from titans_pytorch import MemoryAsContextTransformer

    memory_chunk = dict(neural_memory_segment_len=args.chunk, neural_memory_batch_size=args.chunk) if matched else {}
    return MemoryAsContextTransformer(
        num_tokens=args.vocab, dim=args.dim, depth=args.layers, segment_len=args.window, dim_head=64,
        heads=args.dim // 64, num_persist_mem_tokens=4, num_longterm_mem_tokens=16, neural_memory_layers=(2, 4),
        neural_memory_kwargs=dict(dim_head=64, heads=args.dim // 64), **memory_chunk,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, nargs="+", default=[1024], help="one or more lengths, timed in the same rounds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--compile", choices=("off", "on", "both"), default="both", help="memory variants' scan")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time (a loaded box's other processes do not count)")
    parser.add_argument("--documents", type=int, default=0, help="also time each variant on rows of N+1 documents")
    parser.add_argument("--keep-denormals", action="store_true", help="CPU: leave flush-to-zero off (pretrain/denormals.py)")
    args = parser.parse_args()
    if not args.keep_denormals:
        flush_denormals()

    torch.manual_seed(0)
    ids = {T: torch.randint(EOS + 1, args.vocab, (args.batch, T + 1), device=args.device) for T in args.seq}
    packed = {T: t.clone() for T, t in ids.items()}
    for T, t in packed.items():
        for row in t:
            row[torch.randperm(T - 1)[: args.documents] + 1] = EOS
    print(f"shape: B={args.batch} T={','.join(map(str, args.seq))} D={args.dim} layers={args.layers} window/segment={args.window} "
          f"chunk={args.chunk} device={args.device} threads={torch.get_num_threads()} rounds={args.reps} clock={args.clock}")
    modes = {"off": (False,), "on": (True,), "both": (False, True)}[args.compile]
    models: dict[str, torch.nn.Module] = {}
    for variant in args.variants.split(","):
        for compiled in modes if variant in MEMORY_KINDS else (False,):
            name = f"titans-parallel {variant}" + (" compiled" if compiled else "")
            models[name] = our_model(variant, compiled, args)
            if args.documents:
                models[f"{name}, {args.documents + 1} documents"] = our_model(variant, compiled, args, document_reset=True)
    if not args.no_peer:
        models["lucidrains MAC, its defaults"] = peer_model(args, matched=False)
        models["lucidrains MAC, matched (chunk 16, paper rule)"] = peer_model(args, matched=True)

    def fwd_bwd(name: str, model: torch.nn.Module, ids: torch.Tensor):
        model.to(args.device)
        if name.startswith("lucidrains"):
            return lambda: model(ids, return_loss=True).backward()
        return lambda: lm_loss(model(ids[:, :-1]), ids[:, 1:]).backward()

    steps = {(n, T): fwd_bwd(n, m, (packed if n.endswith("documents") else ids)[T])
             for n, m in models.items() for T in args.seq}
    cuda = args.device.startswith("cuda")
    clock = time.process_time if args.clock == "cpu" and not cuda else time.perf_counter
    seconds = interleaved_medians(steps, args.warmup, args.reps, cuda, clock)
    rates = {key: args.batch * key[1] / s for key, s in seconds.items()}
    lengths = "".join(f"{f'T={T}':>12s}" for T in args.seq)
    print(f"{'tokens/s':48s} {'params':>7s} {lengths}" + (f" {'last/first':>11s}" if len(args.seq) > 1 else ""))
    for name, model in models.items():
        n_params = sum(p.numel() for p in model.parameters())
        row = "".join(f"{rates[name, T]:12,.0f}" for T in args.seq)
        flat = f" {rates[name, args.seq[-1]] / rates[name, args.seq[0]]:10.2f}x" if len(args.seq) > 1 else ""
        print(f"{name:48s} {n_params / 1e6:6.2f}M {row}{flat}")
    for T in args.seq:
        for ours in (n for n in models if n.startswith("titans-parallel mac")):
            for peer in (n for n in models if n.startswith("lucidrains")):
                print(f"ratio at T={T}: {ours} / {peer}: {rates[ours, T] / rates[peer, T]:.1f}x")


if __name__ == "__main__":
    main()
