"""TitansLM: embeddings, a stack of blocks (Titans variants or baselines), final norm, LM head; generation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Block, RMSNorm
from .config import ModelConfig
from .memory import NeuralMemory


class TitansLM(nn.Module):
    """Decoder-only language model. `model(input_ids [B, T])` -> logits [B, T, vocab] (fp32 head output in the
    parameters' dtype). `model.decode(ids, cache)` continues a sequence from a cache; `generate` samples."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, kind) for kind in config.layer_pattern)
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for embeddings and projections, the residual-output projections scaled by
        1/sqrt(2 n_layers) (GPT-2), then each memory's own initialisation (conv, W_0, gate biases)."""
        std = self.config.init_std
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.config.n_layers) if name.endswith(("wo", "w2", "out_proj")) else 1.0
                nn.init.normal_(module.weight, std=std * scale)
            elif isinstance(module, NeuralMemory):
                module.reset_parameters()
        if not self.config.tie_embeddings:
            nn.init.normal_(self.output.weight, std=std)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_embeddings.weight.numel() if exclude_embeddings else n

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decode(input_ids, None)[0]

    def decode(self, input_ids: torch.Tensor, cache: list | None) -> tuple[torch.Tensor, list]:
        """Run tokens [B, T] after the tokens summarised by `cache` (None: start of sequence).
        Returns (logits [B, T, vocab], new cache); any split of a sequence gives the same logits as one pass."""
        caches = cache if cache is not None else [None] * len(self.layers)
        x = self.tok_embeddings(input_ids)
        new_caches = []
        for layer, layer_cache in zip(self.layers, caches):
            x, layer_cache = layer(x, layer_cache)
            new_caches.append(layer_cache)
        return self.output(self.norm(x)), new_caches

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Prefill the prompt [B, T0] once, then decode token by token from the caches (O(1) per token in the
        context length: attention keeps a window, the memory a fixed-size state). temperature 0 = greedy.
        Returns [B, T0 + n] (stops early when every row has produced eos_id)."""
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(f"prompt token ids must lie in [0, {self.config.vocab_size}); got "
                             f"[{input_ids.min().item()}, {input_ids.max().item()}]")
        logits, cache = self.decode(input_ids, None)
        tokens, done = [input_ids], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            nxt = sample_next_token(logits[:, -1], temperature, top_k, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            tokens.append(nxt[:, None])
            if eos_id is not None and bool(done.all()):
                break
            logits, cache = self.decode(nxt[:, None], cache)
        return torch.cat(tokens, dim=1)


def sample_next_token(logits: torch.Tensor, temperature: float, top_k: int | None, generator=None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32; logits [B, T, V], labels [B, T]."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index)
