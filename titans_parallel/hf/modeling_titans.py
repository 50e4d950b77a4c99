"""`TitansForCausalLM`: TitansLM behind transformers' `PreTrainedModel` / `GenerationMixin`, so an export loads with
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` and `generate()` decodes from TitansLM's own
caches (attention windows and memory states, O(1) per token), with the logits of TitansLM itself.

Unpadded batches only: TitansLM has no attention mask (every row is one sequence from its first token), so an
`attention_mask` with zeros is refused rather than silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..model import TitansLM, lm_loss
from ..parallel.metadata import tied_parameters
from .configuration_titans import TitansConfig


@dataclass
class TitansCache:
    """TitansLM's per-layer decoding caches and how many tokens they summarise (what `generate` asks a cache)."""

    layers: list
    seq_length: int
    is_compileable = False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length


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
        """input_ids [B, T] after the tokens `cache` summarises -> logits [B, T, vocab] (fp32 unless the model is cast),
        the mean next-token loss against `labels` [B, T] (shifted here, -100 ignored), and the new cache."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("TitansForCausalLM does not support padding: pass equal-length, unpadded rows")
        logits, layers = self.model.decode(input_ids, cache.layers if cache is not None else None)
        loss = lm_loss(logits[:, :-1], labels[:, 1:]) if labels is not None else None
        use_cache = self.config.use_cache if use_cache is None else use_cache
        seen = (cache.seq_length if cache is not None else 0) + input_ids.shape[1]
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=TitansCache(layers, seen) if use_cache else None)
