"""titans-parallel: Titans language models (neural long-term memory + sliding-window attention)."""

from .config import MemoryConfig, ModelConfig
from .model import TitansLM, lm_loss

__all__ = ["MemoryConfig", "ModelConfig", "TitansLM", "lm_loss"]
