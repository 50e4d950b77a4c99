"""`TitansForCausalLM`: TitansLM behind transformers' `PreTrainedModel` / `GenerationMixin`, so an export loads with
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` and `generate()` decodes from TitansLM's own
caches (attention windows and memory states, O(1) per token), with the logits of TitansLM itself.

Left padding (batched `generate` over prompts of different lengths): TitansLM has no attention mask, and its
caches hold one position for the whole batch (RoPE position, the memory's chunk phase, MAC's segment offset), so
rows at different positions cannot share a decode call. The first call groups the rows by their number of
left-padding tokens (`attention_mask` zeros); each group is a batch of equal-length unpadded rows with its own
caches, so every row's logits are those of the row alone, unpadded. A batch without padding is one group, as
fast as before; k distinct prompt lengths cost k decode calls per step. Logits at padded positions are 0 and their
labels are ignored. Only left padding, and only in the first call (tokens after a cache are unpadded); anything
else is refused. Beam search reorders each group's rows (`TitansCache.reorder_cache`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..model import TitansLM, lm_loss, select_rows
from ..parallel.metadata import tied_parameters
from .configuration_titans import TitansConfig


@dataclass
class RowGroup:
    """Batch rows `rows` [n] (ascending) with `pad` left-padding tokens each, and TitansLM's per-layer caches of
    their unpadded tokens (None before the first call)."""

    rows: torch.Tensor
    pad: int
    layers: list | None = None


@dataclass
class TitansCache:
    """The decoding caches of a batch, per group of equally padded rows, and how many tokens per row they
    summarise, padding included (what `generate` asks a cache)."""

    groups: list[RowGroup]
    seq_length: int
    is_compileable = False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: row i continues from row beam_idx[i] ([B]); beams of one prompt share its group."""
        beam_idx = beam_idx.long()
        owner, position = torch.empty_like(beam_idx), torch.empty_like(beam_idx)
        for g, group in enumerate(self.groups):
            owner[group.rows], position[group.rows] = g, torch.arange(len(group.rows), device=beam_idx.device)
        for g, group in enumerate(self.groups):
            source = beam_idx[group.rows]
            if bool((owner[source] != g).any()):
                raise ValueError("beam_idx moves a row between prompts of different padding")
            group.layers = select_rows(group.layers, position[source])


def left_padding_groups(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> list[RowGroup]:
    """Rows of input_ids [B, T] grouped by their leading zeros in attention_mask [B, T] (None: no padding).
    ValueError unless each row is zeros then at least one one."""
    batch, length = input_ids.shape
    if attention_mask is None:
        return [RowGroup(torch.arange(batch, device=input_ids.device), 0)]
    mask = attention_mask.bool()
    pads = (~mask).sum(1)
    if not torch.equal(mask, torch.arange(length, device=mask.device)[None] >= pads[:, None]):
        raise ValueError("TitansForCausalLM supports left padding only: each attention_mask row must be 0s, then 1s")
    if bool((pads == length).any()):
        raise ValueError("a row of the batch is all padding: every row needs at least one token")
    pads = pads.to(input_ids.device)
    return [RowGroup(torch.nonzero(pads == pad).flatten(), pad) for pad in sorted(set(pads.tolist()))]


class TitansForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TitansConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: TitansConfig):
        super().__init__(config)
        self.model = TitansLM(config.model_config())
        # TitansLM ties its own parameters; telling transformers keeps them tied when loading a checkpoint that
        # stores them once.
        self._tied_weights_keys = {f"model.{a}": f"model.{s}" for a, s in tied_parameters(self.model).items()}
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # TitansLM keeps its own caches (TitansCache)

    def _init_weights(self, module: torch.nn.Module) -> None:
        """TitansLM initialises itself when built; an export's weights come from its checkpoint."""

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.tok_embeddings

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.output

    def forward(
        self,
        input_ids: torch.LongTensor,
        cache: TitansCache | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids [B, T] after the tokens `cache` summarises, attention_mask [B, seen + T] or [B, T] (left
        padding, first call only; module doc) -> logits [B, T, vocab] (fp32 unless the model is cast), the mean
        next-token loss against `labels` [B, T] (shifted here; -100 and padded positions ignored), the new cache."""
        batch, length = input_ids.shape
        if cache is None:
            groups, seen = left_padding_groups(attention_mask, input_ids), 0
        elif attention_mask is not None and not bool(attention_mask[:, -length:].all()):
            raise ValueError("TitansForCausalLM supports left padding in the first call only (the prompt)")
        else:
            groups, seen = cache.groups, cache.seq_length
        if len(groups) == 1 and groups[0].pad == 0:
            logits, layers = self.model.decode(input_ids, groups[0].layers)
            new_groups = [RowGroup(groups[0].rows, 0, layers)]
        else:
            logits, new_groups = None, []
            for group in groups:
                skip = group.pad if seen == 0 else 0
                part, layers = self.model.decode(input_ids[group.rows, skip:], group.layers)
                if logits is None:
                    logits = part.new_zeros(batch, length, part.shape[-1])
                logits[group.rows, skip:] = part
                new_groups.append(RowGroup(group.rows, group.pad, layers))
        loss = None
        if labels is not None:
            if attention_mask is not None:
                labels = labels.masked_fill(~attention_mask[:, -length:].bool(), -100)
            loss = lm_loss(logits[:, :-1], labels[:, 1:])
        use_cache = self.config.use_cache if use_cache is None else use_cache
        new_cache = TitansCache(new_groups, seen + length) if use_cache else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=new_cache)
