"""The op, described once: ``pool(table[bag ids] * weights)`` as one frozen ``OpSpec``.

Every variant of the op (dense bags or CSR bags, mean or sum or sqrtn, a float or
row-wise quantized table, either axis, either bounds-check mode) is one value of
``OpSpec``. The core op builds it once from the public arguments; the backends read
it (and key their compiled kernels by it) instead of re-interpreting raw arguments,
so a new pooling mode, table format or bags kind is a new enum member here plus the
kernels that read it. Modelled on FBGEMM's ``PoolingMode`` / ``SparseType`` /
``BoundsCheckMode`` and flash-attention's varlen ``cu_seqlens``.

Where a new variant goes:
- a pooling mode: a ``Pooling`` member, its combine rule in the reference
  (``reference.py``) and in each kernel's final scaling;
- a table format: a ``TableFormat`` member (storage dtype, bytes per row, kernel
  code), a reader in the kernels, the reference's dequantisation;
- a bags kind: a ``BagsKind`` member, its checks in ``checks.py``, its kernels.
"""
from __future__ import annotations

import dataclasses
import enum

import numpy as np

from .semantics import BFLOAT16, FORMAT_BFLOAT16, FORMAT_FLOAT16, FORMAT_FLOAT32, PADDING_ID, Axis

# The quantized formats' kernel codes (after the float formats' in semantics.py).
FORMAT_INT8_ROWWISE, FORMAT_INT4_ROWWISE, FORMAT_KERAS_INT8 = 3, 4, 5


class Pooling(enum.Enum):
    """How a bag's (weighted) rows combine; TF's ``combiner`` names and definitions."""

    MEAN = "mean"    # weighted sum / sum of weights (unweighted: / count)
    SUM = "sum"      # weighted sum
    SQRTN = "sqrtn"  # weighted sum / sqrt(sum of squared weights) (unweighted: / sqrt(count))

    @property
    def kernel_code(self) -> int:
        """The number the kernels (CPU, Numba CUDA, CUDA C) know this pooling by."""
        return _POOLING_CODES[self]

    @classmethod
    def of(cls, value) -> "Pooling":
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"combiner must be one of {[p.value for p in cls]}, got {value!r}") from None


_POOLING_CODES = {Pooling.MEAN: 0, Pooling.SUM: 1, Pooling.SQRTN: 2}


class TableFormat(enum.Enum):
    """How a table's rows are stored. Float formats are read as they are and pooled in
    float32; the value is (storage dtype name, the kernels' format code).

    Row-wise quantized formats (``fused_embedding.quantize_table``, quantized.py): a
    data array of ``storage_dtype`` and float32 row parameters; read by the kernels
    as they are (dequantised as rows are summed), pooled and returned in float32.
    INT8_ROWWISE: uint8 (V, D), value = q * scale + bias (torch's
    ``embedding_bag_byte_prepack``, FBGEMM's fused 8-bit row-wise: each row's parameters after
    its data).
    INT4_ROWWISE: uint8 (V, D / 2), two values a byte, column 2j in the low nibble
    of byte j, 2j + 1 in the high one; value = q * scale + bias.
    KERAS_INT8: Keras' ``Embedding.quantize("int8")``: int8 (V, D) ``embeddings`` and
    float32 (V,) ``embeddings_scale``, value = q / scale.
    """

    FP32 = ("float32", FORMAT_FLOAT32)
    FP16 = ("float16", FORMAT_FLOAT16)
    BF16 = ("bfloat16", FORMAT_BFLOAT16)
    INT8_ROWWISE = ("uint8", FORMAT_INT8_ROWWISE)
    INT4_ROWWISE = ("uint8", FORMAT_INT4_ROWWISE)
    KERAS_INT8 = ("int8", FORMAT_KERAS_INT8)

    @property
    def storage_dtype(self) -> np.dtype:
        return _STORAGE_DTYPES[self]

    @property
    def kernel_code(self) -> int:
        return self.value[1]

    @property
    def quantized(self) -> bool:
        """True for the row-wise quantized formats (data + per-row float32 parameters)."""
        return self in _ROW_PARAMETERS

    @property
    def row_parameters(self) -> int:
        """float32 parameters stored per row: 2 (scale, bias), 1 (Keras' scale), 0 (float formats)."""
        return _ROW_PARAMETERS.get(self, 0)

    def storage_columns(self, dim: int) -> int:
        """Columns of the data array of a table of ``dim`` values a row (int4: two a byte)."""
        return dim // 2 if self is TableFormat.INT4_ROWWISE else dim

    def bytes_per_row(self, dim: int) -> int:
        """Bytes one row of ``dim`` values occupies (quantized formats add their row parameters)."""
        return self.storage_columns(dim) * self.storage_dtype.itemsize + 4 * self.row_parameters

    @property
    def output_dtype(self) -> np.dtype:
        """The op's result dtype: a float table's own (accumulated in float32 regardless),
        float32 for a quantized one."""
        return ACCUMULATE_DTYPE if self.quantized else self.storage_dtype

    @classmethod
    def of_dtype(cls, dtype) -> "TableFormat | None":
        """The format of a float table of this dtype, None for any other dtype."""
        found = _FORMATS_BY_DTYPE.get(dtype)  # a NumPy dtype, the common case: no conversion
        if found is None:
            try:
                found = _FORMATS_BY_DTYPE.get(np.dtype(dtype))
            except TypeError:
                return None
        return found


_STORAGE_DTYPES = {TableFormat.FP32: np.dtype(np.float32), TableFormat.FP16: np.dtype(np.float16),
                   TableFormat.BF16: BFLOAT16, TableFormat.INT8_ROWWISE: np.dtype(np.uint8),
                   TableFormat.INT4_ROWWISE: np.dtype(np.uint8), TableFormat.KERAS_INT8: np.dtype(np.int8)}
_ROW_PARAMETERS = {TableFormat.INT8_ROWWISE: 2, TableFormat.INT4_ROWWISE: 2, TableFormat.KERAS_INT8: 1}
# Float tables only: an integer array is not a table by itself (quantized ones come with parameters).
_FORMATS_BY_DTYPE = {dtype: fmt for fmt, dtype in _STORAGE_DTYPES.items() if fmt not in _ROW_PARAMETERS}
FLOAT_FORMATS = tuple(fmt for fmt in _STORAGE_DTYPES if fmt not in _ROW_PARAMETERS)
QUANTIZED_FORMATS = tuple(_ROW_PARAMETERS)


class BagsKind(enum.Enum):
    """How a batch's ids arrive."""

    DENSE = "dense"  # ids [B][L], optionally with a padding id
    CSR = "csr"      # values [N], offsets [B + 1] (bag b is values[offsets[b]:offsets[b + 1]]), weights [N]


@dataclasses.dataclass(frozen=True)
class Bags:
    """The bags part of a spec. ``padding_id``: dense only, an id that is never read
    (Keras' ``mask_zero``: 0). ``weighted``: CSR only, per-id weights come with the values."""

    kind: BagsKind = BagsKind.DENSE
    padding_id: int | None = None
    weighted: bool = False

    @classmethod
    def dense(cls, mask_zero: bool = False) -> "Bags":
        return _DENSE_MASKED if mask_zero else _DENSE

    @classmethod
    def csr(cls, weighted: bool = False) -> "Bags":
        return cls(BagsKind.CSR, None, bool(weighted))

    @property
    def mask_zero(self) -> bool:
        return self.padding_id is not None


_DENSE = Bags()
_DENSE_MASKED = Bags(BagsKind.DENSE, PADDING_ID)


class BoundsCheck(enum.Enum):
    """What happens to an id outside [0, V).

    RAISE: the call raises IndexError naming the id, its position and V, and returns
    nothing (on a GPU the call waits for the kernel's error flag).
    DEFERRED (GPU backends): the call returns without waiting; the kernel's error flag
    is read back asynchronously, and the error is raised by the first later call of
    the op once that kernel has finished, or by ``fused_embedding.synchronize()``.
    The result of the bad call is not to be used; the error is never dropped.
    On the host every call is checked as it runs, so DEFERRED raises at once there.
    """

    RAISE = "raise"
    DEFERRED = "deferred"

    @classmethod
    def of(cls, value) -> "BoundsCheck":
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"bounds_check must be one of {[b.value for b in cls]}, got {value!r}") from None


ACCUMULATE_DTYPE = np.dtype(np.float32)


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One variant of the op: everything a backend needs besides the arrays' sizes.

    Hashable and cheap to compare: the key of every backend's compiled-kernel cache.
    """

    table_format: TableFormat
    dim: int
    id_dtype: np.dtype
    axis: Axis = Axis.SEQUENCE
    pooling: Pooling = Pooling.MEAN
    bags: Bags = _DENSE
    bounds_check: BoundsCheck = BoundsCheck.RAISE

    @property
    def output_dtype(self) -> np.dtype:
        return self.table_format.output_dtype

    @property
    def mask_zero(self) -> bool:
        return self.bags.mask_zero

    def output_shape(self, batch: int, length: int = 0) -> tuple[int, int]:
        """(B, D) over the sequence axis, (B, L) over the embedding axis (dense bags only)."""
        return (batch, self.dim) if self.axis is Axis.SEQUENCE else (batch, length)
