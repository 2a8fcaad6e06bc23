"""fused-embedding: fused embedding lookup + mean pooling kernels.

``embedding_mean(table, ids, axis=1)`` computes ``mean(table[ids], axis)``
without materialising the (B, L, D) intermediate.
"""
from .api import available_backends, embedding_mean, synchronize
from .row_mean_cache import frozen_table
from .bags import embedding_bag
from .quantized import QuantizedTable, quantize_table
from .semantics import Axis

__version__ = "0.1.0"
__all__ = ["embedding_mean", "frozen_table", "quantize_table", "QuantizedTable", "synchronize", "available_backends", "Axis", "__version__"]
