"""Neural long-term memory: the reference recurrence, the chunked dual form, and the module."""

from .chunked import memory_scan
from .reference import memory_scan_reference
from .state import MemoryState, memory_mlp
from .module import NeuralMemory, NeuralMemoryCache

__all__ = ["MemoryState", "NeuralMemory", "NeuralMemoryCache", "memory_mlp", "memory_scan", "memory_scan_reference"]
