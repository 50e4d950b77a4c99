"""`TitansConfig`: a transformers config that carries a `ModelConfig` mapping (`titans`), the single source of
truth; the standard fields transformers' tooling reads (vocab_size, hidden_size, ...) are derived from it."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ..config import ModelConfig
from ..typed_config import to_mapping


class TitansConfig(PretrainedConfig):
    model_type = "titans"

    titans: dict[str, Any] | None = None  # ModelConfig as a mapping; None: ModelConfig's defaults
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        model = self.model_config()
        self.titans = to_mapping(model)
        self.vocab_size, self.hidden_size = model.vocab_size, model.dim
        self.num_hidden_layers, self.num_attention_heads = model.n_layers, model.n_heads
        self.tie_word_embeddings = model.tie_embeddings
        super().__post_init__(**kwargs)

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_saved(self.titans or {})
