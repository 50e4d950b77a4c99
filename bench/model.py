"""Forward+backward tokens/s of every variant at one shape, and lucidrains' MemoryAsContextTransformer beside ours.

    python bench/model.py                         # D=256, 4 layers, segment/window 128, memory in layers 2 and 4
    python bench/model.py --seq 4096 --device cuda --no-peer

The peer (pip install -r requirements-bench.txt) is built at matched size: dim 256, depth 4, heads 4 x 64,
segment 128, 4 persistent tokens, neural memory (depth-2 MLP, chunk 16) in layers 2 and 4; its own defaults
elsewhere (16 long-term memory tokens per segment, 4 residual streams). Our Titans variants use the same width,
depth, window and memory; memory-free layers are SWA.
"""

from __future__ import annotations

import argparse
import torch

from timing import median_seconds
from titans_parallel import MemoryConfig, ModelConfig, TitansLM, lm_loss

VARIANTS = ("mac", "mag", "mal", "lmm", "swa", "transformer")


def time_step(model, ids: torch.Tensor, warmup: int, reps: int) -> float:
    """Median seconds of forward + LM loss + backward."""

    def step() -> None:
        out = model(ids[:, :-1])
        lm_loss(out[0] if isinstance(out, tuple) else out, ids[:, 1:]).backward()

    return median_seconds(step, warmup, reps, ids.is_cuda)


def our_model(variant: str, args) -> TitansLM:
    """Titans variants put memory in layers 2 and 4 of 4 (SWA elsewhere), as the peer does."""
    pattern = None
    if variant in ("mac", "mag", "mal", "lmm") and args.layers == 4:
        pattern = ["swa", variant, "swa", variant]
    config = ModelConfig(
        vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.dim // 64, variant=variant,
        layer_pattern=pattern, window=args.window, memory=MemoryConfig(chunk_size=args.chunk, depth=2, expansion=4),
    )
    return TitansLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--no-peer", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=args.device)
    tokens = args.batch * args.seq
    print(f"shape: B={args.batch} T={args.seq} D={args.dim} layers={args.layers} window/segment={args.window} "
          f"chunk={args.chunk} device={args.device} threads={torch.get_num_threads()}")
    rates = {}
    for variant in args.variants.split(","):
        model = our_model(variant, args).to(args.device)
        rates[variant] = tokens / time_step(model, ids, args.warmup, args.reps)
        print(f"titans-parallel {variant:12s} {model.num_parameters() / 1e6:6.2f}M params {rates[variant]:10,.0f} tokens/s")
    if not args.no_peer:
        from titans_pytorch import MemoryAsContextTransformer

        peer = MemoryAsContextTransformer(
            num_tokens=args.vocab, dim=args.dim, depth=args.layers, segment_len=args.window, dim_head=64,
            heads=args.dim // 64, num_persist_mem_tokens=4, num_longterm_mem_tokens=16,
            neural_memory_layers=(2, 4), neural_memory_kwargs=dict(dim_head=64, heads=args.dim // 64),
        ).to(args.device)
        peer_rate = tokens / time_step(lambda x: peer(x), ids, args.warmup, args.reps)
        n_peer = sum(p.numel() for p in peer.parameters())
        print(f"lucidrains MemoryAsContextTransformer {n_peer / 1e6:6.2f}M params {peer_rate:10,.0f} tokens/s")
        if "mac" in rates:
            print(f"ratio titans-parallel MAC / lucidrains MAC: {rates['mac'] / peer_rate:.1f}x")


if __name__ == "__main__":
    main()
