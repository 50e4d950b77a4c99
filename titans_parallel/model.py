"""TitansLM: embeddings, a stack of blocks (Titans variants or baselines), final norm, LM head; loss; generation.

Tensor / sequence parallel is chosen when the model is built: `dims = init_parallel(tp, sequence_parallel=...)`,
then `TitansLM(config, parallel=dims)`, which hands `dims` to every layer it builds; nothing reads a global. A
plain `TitansLM(config)` (or tp = 1) is plain torch on one rank.

What each parameter is under TP (DeepSpeed reads the marks; `register_sequence_parallel_grad_hooks(model)` acts on
`sequence_parallel`):

- sharded (`tensor_model_parallel`, this rank's heads / vocabulary / FFN columns): tok_embeddings (vocabulary rows),
  output (vocabulary rows; the same tensor as tok_embeddings when tied), attention wq/wk/wv (rows) and wo
  (columns), memory in_proj, gate_proj weight and bias (rows), out_proj (columns), conv_weight, initial_weights,
  out_norm_weight (heads, dim 0), SwiGLU w1/w3 (rows) and w2 (columns). Their gradients are complete per shard.
- replicated, gradient complete on every rank: persistent tokens (their gradient is summed over TP where they
  enter a projection); MAC's context_norm / gate_norm (they act on the full sequence every TP rank holds).
- replicated, marked `sequence_parallel` (every other RMSNorm weight: the blocks' mixer_norm / ffn_norm,
  MAG's attn_norm / memory_norm, the final norm): complete with TP alone; under sequence parallel each rank's gradient
  covers its tokens only, and the hooks (`register_sequence_parallel_grad_hooks(model, model.parallel)`) sum it
  over TP.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import Block, RMSNorm
from .config import ModelConfig
from .parallel import (
    SINGLE_RANK,
    ParallelDims,
    column_parallel_linear,
    gather_from_tensor_parallel_region,
    normal_init,
    tensor_parallel_share,
    vocab_parallel_cross_entropy,
    vocab_parallel_embedding,
)
from .parallel.context import (
    check_sequence_length,
    context_parallel_heads,
    context_parallel_mean,
    gather_sequence,
    sequence_shard,
)


class TitansLM(nn.Module):
    """Decoder-only language model. `model(input_ids [B, T])` -> logits [B, T, vocab] (the full vocabulary, also
    under TP); `model(input_ids, labels)` = `model.loss(input_ids, labels)` -> mean loss, without full-vocabulary
    logits under TP (use it for training). `model.decode(ids, cache)` continues a sequence from a cache; `generate`
    samples, `stream` yields the sampled tokens as they come.

    Initialisation happens once, at construction, layer by layer through the factories (normal with init_std; the
    projections into the residual stream init_std / sqrt(2 n_layers); the memory's own rules; norms 1), so a TP
    rank's shard is exactly the slice of the TP = 1 model built from the same seed. Under sequence parallel T must
    be divisible by tp.

    Under context parallel (cp > 1) every CP rank takes the same input_ids / labels [B, T] (T divisible by cp) and
    runs its contiguous T / cp tokens outside the mixers (`parallel.context`); logits are gathered over CP, the
    loss is the CP=1 mean on every CP rank, and each rank's parameter gradients are its part of the CP=1 gradient:
    sum them over CP (DeepSpeed does, see pretrain/engine.py; else `sum_context_parallel_grads`). No decoding from a
    cache.

    `parallel`: this rank's place in the TP x DP layout (`init_parallel`'s result), kept as `self.parallel`; the
    default is a single rank, which needs no process group.

    `activation_checkpointing` (False; the training job sets it): with grad enabled and no cache coming in, each
    block keeps only its input and is recomputed in backward (non-reentrant `torch.utils.checkpoint`), so module
    hooks such as ZeRO-3's gather run again; same values and gradients, parameters and names unchanged.

    `config.document_reset`: every `config.eos_id` token opens a new document, and each document's logits are
    those of the model run on it alone (from that EOS on), in `forward`, `loss`, `decode` and `stream`
    (docs/long_context.md).
    """

    def __init__(self, config: ModelConfig, parallel: ParallelDims = SINGLE_RANK):
        super().__init__()
        if config.document_reset and config.eos_id is None:
            raise ValueError("model.document_reset needs model.eos_id (the tokenizer's EOS id)")
        self.config, self.parallel = config, parallel
        context_parallel_heads(config.n_heads, parallel)
        for name in ("n_heads", "vocab_size", "ffn_hidden"):
            tensor_parallel_share(getattr(config, name), name, parallel)
        init = normal_init(config.init_std)
        self.tok_embeddings = vocab_parallel_embedding(config.vocab_size, config.dim, parallel=parallel,
                                                       init_method=init)
        self.layers = nn.ModuleList(Block(config, kind, parallel) for kind in config.layer_pattern)
        self.norm = RMSNorm(config.dim, config.norm_eps, parallel)
        self.output = column_parallel_linear(config.dim, config.vocab_size, bias=False, parallel=parallel,
                                             init_method=init)
        self.activation_checkpointing = False
        if config.tie_embeddings:  # both are [vocab / tp, dim], split alike over TP
            self.output.weight = self.tok_embeddings.weight

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters on this rank (this rank's shards under TP)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_embeddings.weight.numel() if exclude_embeddings else n

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, ignore_index: int = -100
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab]; with labels [B, T], `loss(input_ids, labels)` instead (so a
        training engine that calls the module gets the loss: `engine(input_ids, labels)`)."""
        if labels is not None:
            return self.loss(input_ids, labels, ignore_index)
        if self.config.document_reset:  # no cache wanted: one pass, whatever the documents
            return self._gathered(self._logits(input_ids, None, self._resets(input_ids))[0])
        return self.decode(input_ids, None)[0]

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy (fp32 scalar) of input_ids [B, T] against labels [B, T], skipping labels
        equal to ignore_index. Under TP the vocabulary-parallel cross-entropy of the head's shards: the
        full-vocabulary logits are never formed. The same on every TP rank."""
        logits, _ = self._logits(input_ids, None, self._resets(input_ids))
        if not (self.parallel.tp_enabled or self.parallel.cp_enabled):
            return lm_loss(logits, labels, ignore_index)
        labels = sequence_shard(labels, self.parallel)
        keep = labels != ignore_index
        losses = vocab_parallel_cross_entropy(logits, labels.masked_fill(~keep, 0), self.parallel)
        return context_parallel_mean((losses * keep).sum(), keep.sum(), self.parallel)

    def decode(self, input_ids: torch.Tensor, cache: list | None) -> tuple[torch.Tensor, list]:
        """Run tokens [B, T] after the tokens summarised by `cache` (None: start of sequence).
        Returns (logits [B, T, vocab], new cache); any split of a sequence gives the same logits as one pass.
        Under sequence parallel only from the start of a sequence (cache None)."""
        if cache is not None and self.parallel.sequence_parallel:
            raise NotImplementedError("decoding from a cache under sequence parallel; build the model without it")
        if cache is not None and self.parallel.cp_enabled:
            raise NotImplementedError("decoding from a cache under context parallel; build the model with cp=1")
        resets = self._resets(input_ids)
        if resets is None:
            logits, cache = self._logits(input_ids, cache)
        else:
            logits, cache = self._decode_documents(input_ids, cache, resets)
        return self._gathered(logits), cache

    def _gathered(self, logits: torch.Tensor) -> torch.Tensor:
        """This rank's logits shard [B, T / cp, vocab / tp] -> the full [B, T, vocab]."""
        return gather_sequence(gather_from_tensor_parallel_region(logits, self.parallel), self.parallel)

    def _resets(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """[B, T] bool, True at every EOS (each opens a document), or None without `config.document_reset`."""
        return input_ids == self.config.eos_id if self.config.document_reset else None

    def _decode_documents(self, input_ids: torch.Tensor, cache: list | None, resets: torch.Tensor
                          ) -> tuple[torch.Tensor, list]:
        """`decode` over packed documents. A cache holds one position for the whole batch, so the call is cut where
        every row starts a document: each piece after a cut starts from no cache. A piece in which rows start
        documents at different places runs in one pass without a cache; the last piece must not be one (the
        cache after it would differ in shape between rows)."""
        T = input_ids.shape[1]
        common = resets.all(dim=0)
        if cache is None:
            common[0] = False
        cuts = [0, *(c for c in common.nonzero().flatten().tolist() if c > 0), T]
        logits = []
        for start, end in zip(cuts[:-1], cuts[1:]):
            piece_cache = cache if start == 0 and not bool(common[0]) else None
            inner = resets[:, start + 1 : end]
            if not bool(inner.any()):
                piece_logits, cache = self._logits(input_ids[:, start:end], piece_cache)
            elif end < T and piece_cache is None:
                piece_logits, _ = self._logits(input_ids[:, start:end], None, resets[:, start:end])
            else:
                raise ValueError(
                    f"decode: the rows start documents (eos_id {self.config.eos_id}) at different positions in "
                    f"tokens {start}..{end - 1} of this call, so no one cache can follow them; decode the rows "
                    "separately, or call the model (no cache) for logits only"
                )
            logits.append(piece_logits)
        return torch.cat(logits, dim=1), cache

    def _logits(self, input_ids: torch.Tensor, cache: list | None, resets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, list]:
        """(logits [B, T / cp, vocab / tp] of this rank's sequence and vocabulary shard, new cache). With resets
        [B, T] (the full sequence's; cache None) every document runs as if the sequence began at it, and the caches
        are None."""
        tp, seq_len = self.parallel.tp_size, input_ids.shape[1]
        if self.parallel.sequence_parallel and seq_len % tp:
            raise ValueError(f"sequence parallel needs T={seq_len} divisible by the tensor-parallel size {tp}")
        check_sequence_length(seq_len, self.parallel)
        caches = cache if cache is not None else [None] * len(self.layers)
        x = self.tok_embeddings(sequence_shard(input_ids, self.parallel))  # [B, T / (cp tp), dim] under CP / SP
        new_caches = []
        for layer, layer_cache in zip(self.layers, caches):
            if self.activation_checkpointing and layer_cache is None and torch.is_grad_enabled():
                x, layer_cache = checkpoint(layer, x, None, resets, use_reentrant=False)
            else:
                x, layer_cache = layer(x, layer_cache, resets)
            new_caches.append(layer_cache)
        return self.output(self.norm(x)), new_caches

    @torch.no_grad()
    def stream(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token ids [B] of the prompt [B, T0], max_new_tokens times: the prompt is prefilled once,
        then each token is decoded from the caches (O(1) per token in the context length: attention keeps a window,
        the memory a fixed-size state), only when the next one is asked for. temperature 0 = greedy; top_k, top_p
        as in `next_token_probs`. TP off only.
        With `config.document_reset` a cache holds one position for all its rows, so rows whose current document
        starts at different positions (an EOS in the prompt, or sampled) decode in groups of their own, one decode
        call per group and step; every row's tokens are those of the row alone."""
        if self.parallel.tp_enabled:
            raise NotImplementedError(
                "generate under tensor parallel (every rank would have to draw the same samples); build the model "
                "on a single rank (TitansLM(config)) or with tp=1"
            )
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(f"prompt token ids must lie in [0, {self.config.vocab_size}); got "
                             f"[{input_ids.min().item()}, {input_ids.max().item()}]")
        groups = [self._decode_group(rows, input_ids[rows], None) for rows in self._document_groups(input_ids)]
        for step in range(max_new_tokens):
            last = torch.cat([logits for _, _, logits in groups])[torch.cat([rows for rows, _, _ in groups]).argsort()]
            nxt = sample_next_token(last, temperature, top_k, generator, top_p)
            yield nxt
            if step + 1 < max_new_tokens:
                groups = [group for rows, cache, _ in groups for group in self._decode_next(rows, nxt[rows], cache)]

    def _document_groups(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Row indices [n] of input_ids [B, T] grouped by where their last document starts (all rows together
        without `config.document_reset`)."""
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        if not self.config.document_reset:
            return [rows]
        t = torch.arange(input_ids.shape[1], device=input_ids.device)
        last_start = torch.where(input_ids == self.config.eos_id, t, -1).amax(dim=1)
        return [rows[last_start == start] for start in last_start.unique()]

    def _decode_next(self, rows: torch.Tensor, tokens: torch.Tensor, cache: list) -> list[tuple]:
        """A group's next tokens [n] decoded: the group split where some of its rows start a document."""
        parts = self._document_groups(tokens[:, None])
        if len(parts) == 1:
            return [self._decode_group(rows, tokens[:, None], cache)]
        return [self._decode_group(rows[part], tokens[part, None], select_rows(cache, part)) for part in parts]

    def _decode_group(self, rows: torch.Tensor, input_ids: torch.Tensor, cache: list | None) -> tuple:
        """(rows, the cache after input_ids, the logits [n, vocab] of its last token)."""
        logits, cache = self.decode(input_ids, cache)
        return rows, cache, logits[:, -1]

    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        top_p: float | None = None,
    ) -> torch.Tensor:
        """The prompt [B, T0] and its continuation from `stream`: [B, T0 + n]; stops early when every row has
        produced eos_id (a finished row is filled with eos_id)."""
        tokens, done = [input_ids], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for nxt in self.stream(input_ids, max_new_tokens, temperature, top_k, top_p, generator):
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            tokens.append(nxt[:, None])
            if eos_id is not None and bool(done.all()):
                break
        return torch.cat(tokens, dim=1)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """ValueError naming the first setting out of range: max_new_tokens >= 0, temperature >= 0, top_k >= 1,
    top_p in (0, 1]."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or unset), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")


def next_token_probs(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """logits [B, V] -> the sampling distribution [B, V] (fp32): softmax(logits / temperature) (temperature > 0)
    restricted to the top_k largest logits, then to the nucleus (the most probable tokens, in order, until their
    mass reaches top_p; the token that reaches it included), renormalised."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1:
        ranked, order = probs.sort(dim=-1, descending=True)
        ranked = ranked.masked_fill(ranked.cumsum(-1) - ranked >= top_p, 0)  # mass before a token already >= top_p
        probs = torch.zeros_like(probs).scatter(-1, order, ranked)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: the argmax at temperature 0, else a draw from `next_token_probs`."""
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(next_token_probs(logits, temperature, top_k, top_p), 1, generator=generator).squeeze(-1)


def select_rows(cache: Any, rows: torch.Tensor) -> Any:
    """The cache (from `TitansLM.decode`) of batch rows `rows` [n] (indices, repeats allowed) of the batch it
    summarises: every tensor in a cache has the batch first, so continuing from the result equals continuing those
    rows alone."""
    if isinstance(cache, torch.Tensor):
        return cache.index_select(0, rows)
    if dataclasses.is_dataclass(cache):
        return dataclasses.replace(cache, **{f.name: select_rows(getattr(cache, f.name), rows)
                                             for f in dataclasses.fields(cache)})
    if isinstance(cache, tuple):
        items = [select_rows(c, rows) for c in cache]
        return type(cache)(*items) if hasattr(cache, "_fields") else tuple(items)
    if isinstance(cache, list):
        return [select_rows(c, rows) for c in cache]
    return cache  # positions and offsets (ints), None


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32; logits [B, T, V], labels [B, T]."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index)
