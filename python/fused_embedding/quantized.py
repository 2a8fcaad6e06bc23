"""Row-wise quantized tables: the record, ``quantize_table``, and the op's host side for them.

Layout of a ``QuantizedTable`` (V rows of D values; every array C-contiguous, in host memory):

| format | ``data`` | ``params`` | value of column d of row r |
| --- | --- | --- | --- |
| ``"int8"`` (``TableFormat.INT8_ROWWISE``) | uint8 (V, D) | float32 (V, 2): scale, bias | ``data[r, d] * scale[r] + bias[r]`` |
| ``"int4"`` (``TableFormat.INT4_ROWWISE``) | uint8 (V, D / 2), D even | float32 (V, 2): scale, bias | ``q * scale[r] + bias[r]``, q = ``data[r, d // 2] & 15`` for even d (low nibble first), ``>> 4`` for odd d |
| ``"keras_int8"`` (``TableFormat.KERAS_INT8``) | int8 (V, D): Keras' ``embeddings`` | float32 (V, 1): Keras' ``embeddings_scale`` | ``data[r, d] / scale[r]`` |

The asymmetric formats are torch's ``embedding_bag_byte_prepack`` and FBGEMM's fused
8-bit row-wise quantization (scale = (max - min) / 255, bias = min, q = round((x - min) /
scale)), and its 4-bit form with 15 levels. As there, a row's parameters sit right after
its data, in one buffer of rows (``quantize_table``, ``rowwise`` and ``from_arrays`` make
it): row r is its C data bytes, up to 3 bytes of padding (so the floats are 4-byte
aligned), then float32 scale and bias. ``data`` (V, C) and ``params`` (V, 2) are views
into that buffer (rows contiguous, row stride the buffer's), so a row read is one memory
access, not one for the data and another for parameters kept elsewhere (benchmarks/NOTES.md).
``scales`` and ``biases`` are ``params``' columns. torch's 4-bit prepack stores float16
scale and bias; here they are float32. Keras' layout is read as Keras keeps it: two
arrays of their own.

Bytes: ``TableFormat.bytes_per_row(D)`` a row, parameters included (D + 8 for int8,
D / 2 + 8 for int4, D + 4 for Keras' int8); ``QuantizedTable.nbytes`` for the table.

The op (``embedding_mean``, ``embedding_bag``) takes a ``QuantizedTable`` wherever it
takes a table, on the "cpu" backend (kernels/cpu_quant.py: rows dequantised as they are
read, accumulated and returned in float32) and the "numpy" reference backend (float64
dequantize-then-pool, rounded once to float32).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .memory import empty_aligned
from .spec import ACCUMULATE_DTYPE, Pooling, TableFormat

_MODES = {"int8": TableFormat.INT8_ROWWISE, "int4": TableFormat.INT4_ROWWISE,
          "keras_int8": TableFormat.KERAS_INT8}
_MODE_NAMES = {fmt: name for name, fmt in _MODES.items()}
_LEVELS = {TableFormat.INT8_ROWWISE: 255, TableFormat.INT4_ROWWISE: 15}
QUANTIZED_BACKENDS = ("cpu", "numpy")
_QUANTIZE_ROWS_PER_BLOCK = 1 << 16  # rows quantised at a time: bounds the float64 scratch (64 MB at D=128)


def _mode_of(mode) -> TableFormat:
    if isinstance(mode, TableFormat) and mode.quantized:
        return mode
    if mode in _MODES:
        return _MODES[mode]
    raise ValueError(f"quantization mode must be one of {sorted(_MODES)}, got {mode!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedTable:
    """A row-wise quantized (V, D) table: ``data`` and per-row float32 ``params`` (module docstring).

    Build one with ``quantize_table(table, "int8" | "int4")``, ``QuantizedTable.rowwise``
    (your own data, scales and biases) or ``QuantizedTable.from_keras_int8`` (Keras'
    variables, read as they are). Serialise with ``to_arrays()`` (a dict for
    ``np.savez``) and ``QuantizedTable.from_arrays``, or pickle.
    """

    format: TableFormat
    data: np.ndarray    # [V][D] uint8 | [V][D/2] uint8 (int4) | [V][D] int8 (Keras)
    params: np.ndarray  # [V][2] float32 (scale, bias) | [V][1] float32 (Keras' scale)

    def __post_init__(self):
        fmt = _mode_of(self.format)
        object.__setattr__(self, "format", fmt)
        name = _MODE_NAMES[fmt]
        data, params = self.data, self.params
        if not isinstance(data, np.ndarray) or not isinstance(params, np.ndarray):
            raise TypeError(f"a {name} table's data and params must be NumPy arrays, got "
                            f"{type(data).__name__} and {type(params).__name__}")
        if data.dtype != fmt.storage_dtype or data.ndim != 2:
            columns = "D / 2" if fmt is TableFormat.INT4_ROWWISE else "D"
            raise TypeError(f"a {name} table's data must be a 2-D {fmt.storage_dtype} array (V, {columns}), "
                            f"got {data.ndim}-D {data.dtype} with shape {data.shape}")
        if data.shape[1] < 1:
            raise ValueError(f"a {name} table must have at least one column, got data of shape {data.shape}")
        expected = (data.shape[0], fmt.row_parameters)
        if params.dtype != ACCUMULATE_DTYPE or params.shape != expected:
            what = "scale and bias" if fmt.row_parameters == 2 else "scale"
            raise ValueError(f"a {name} table's params must be float32 {expected} (the {what} of each "
                             f"of its {data.shape[0]} rows), got {params.dtype} {params.shape}")
        for array, label in ((data, "data"), (params, "params")):
            # The kernels walk each row's bytes in order and step between rows by the stride.
            if array.shape[0] > 1 and array.strides[0] < array.shape[1] * array.itemsize \
                    or array.shape[1] > 1 and array.strides[1] != array.itemsize:
                raise ValueError(f"a {name} table's {label} must have contiguous, non-overlapping rows (the "
                                 f"kernels walk its rows), got strides {array.strides}; "
                                 f"np.ascontiguousarray makes a contiguous copy")

    # --- constructors ------------------------------------------------------------------
    @classmethod
    def rowwise(cls, data, scales, biases, mode="int8") -> "QuantizedTable":
        """An asymmetric table from its parts: ``data`` uint8 (V, D) ("int8") or (V, D / 2)
        ("int4", low nibble first), ``scales`` and ``biases`` float32 (V,). All three are
        copied into the table's buffer of rows (module docstring)."""
        fmt = _mode_of(mode)
        if fmt is TableFormat.KERAS_INT8:
            raise ValueError("Keras' int8 layout has no biases: use QuantizedTable.from_keras_int8(q, scale)")
        data = np.asarray(data)
        vocab = data.shape[0] if data.ndim >= 1 else 0
        for array, label in ((scales, "scales"), (biases, "biases")):
            array = np.asarray(array)
            if array.dtype != ACCUMULATE_DTYPE or array.shape != (vocab,):
                raise ValueError(f"{label} must be float32 ({vocab},), one per row of data {data.shape}, "
                                 f"got {array.dtype} {array.shape}")
        cls(fmt, data, np.empty((vocab, 2), ACCUMULATE_DTYPE))  # the data's own checks, before any copy
        rows, params = _row_buffer(vocab, data.shape[1])
        rows[...] = data
        params[:, 0], params[:, 1] = scales, biases
        return cls(fmt, rows, params)

    @classmethod
    def from_keras_int8(cls, embeddings, embeddings_scale) -> "QuantizedTable":
        """Keras' int8 layout (``Embedding.quantize("int8")``): ``embeddings`` int8 (V, D) and
        ``embeddings_scale`` float32 (V,), value = q / scale. Read as they are: NumPy arrays
        (or anything ``np.asarray`` takes without copying) are not copied."""
        data = np.asarray(embeddings)
        scale = np.asarray(embeddings_scale)
        vocab = data.shape[0] if data.ndim >= 1 else 0
        if scale.dtype != ACCUMULATE_DTYPE or scale.shape not in ((vocab,), (vocab, 1)):
            raise ValueError(f"embeddings_scale must be float32 ({vocab},), one per row of embeddings "
                             f"{data.shape}, got {scale.dtype} {scale.shape}")
        return cls(TableFormat.KERAS_INT8, data, scale.reshape(vocab, 1))

    @classmethod
    def from_arrays(cls, arrays) -> "QuantizedTable":
        """The table ``to_arrays()`` gave (also what ``np.load`` returns for its ``np.savez``)."""
        fmt, data, params = _mode_of(str(arrays["format"][()])), np.asarray(arrays["data"]), arrays["params"]
        if fmt is TableFormat.KERAS_INT8:
            return cls(fmt, np.ascontiguousarray(data), np.ascontiguousarray(params))
        params = np.asarray(params)
        cls(fmt, np.ascontiguousarray(data), np.ascontiguousarray(params))  # checks, before the copy
        return cls.rowwise(data, np.ascontiguousarray(params[:, 0]), np.ascontiguousarray(params[:, 1]), fmt)

    def to_arrays(self) -> dict:
        """{"format": the mode name, "data": ..., "params": ...}: ``np.savez(path, **table.to_arrays())``."""
        return {"format": np.array(_MODE_NAMES[self.format]), "data": self.data, "params": self.params}

    # --- what it is ----------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """"int8", "int4" or "keras_int8"."""
        return _MODE_NAMES[self.format]

    @property
    def shape(self) -> tuple[int, int]:
        """(V, D) of the table it stands for (int4 data has D / 2 columns)."""
        columns = self.data.shape[1]
        return (self.data.shape[0], 2 * columns if self.format is TableFormat.INT4_ROWWISE else columns)

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the op's results (float32)."""
        return self.format.output_dtype

    @property
    def scales(self) -> np.ndarray:
        """float32 (V,), a view: the scale of each row (Keras: the divisor)."""
        return self.params[:, 0]

    @property
    def biases(self) -> np.ndarray | None:
        """float32 (V,), a view: the bias of each row; None for Keras' layout (no bias)."""
        return self.params[:, 1] if self.format.row_parameters == 2 else None

    @property
    def nbytes(self) -> int:
        """Bytes of data and parameters: V * ``format.bytes_per_row(D)``."""
        return self.data.nbytes + self.params.nbytes

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        """The (V, D) table of values this one stands for, computed in float64, rounded once to ``dtype``."""
        q = unpack_int4(self.data) if self.format is TableFormat.INT4_ROWWISE else self.data
        scale = self.params[:, :1].astype(np.float64)
        if self.format is TableFormat.KERAS_INT8:
            return (q / scale).astype(dtype)
        return (q * scale + self.params[:, 1:].astype(np.float64)).astype(dtype)

    def __repr__(self):
        return f"QuantizedTable({self.mode}, shape={self.shape}, nbytes={self.nbytes})"


def _row_buffer(vocab: int, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8 (V, C), params float32 (V, 2)): views into one new buffer of V rows, each
    C data bytes, padding to a multiple of 4, then scale and bias (module docstring). The
    buffer starts on a cache line."""
    params_at = -(-columns // 4) * 4
    buffer = empty_aligned((vocab, params_at + 8), np.uint8)            # [V][C + pad + 8]
    return buffer[:, :columns], buffer[:, params_at:].view(ACCUMULATE_DTYPE)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """uint8 (V, D / 2) from 4-bit values q (V, D) in [0, 15]: column 2j in the low nibble of byte j."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """uint8 (V, 2 C) 4-bit values from packed (V, C): the inverse of ``pack_int4``."""
    q = np.empty((packed.shape[0], 2 * packed.shape[1]), dtype=np.uint8)
    q[:, 0::2] = packed & 15
    q[:, 1::2] = packed >> 4
    return q


def quantize_table(table, mode="int8") -> QuantizedTable:
    """Row-wise asymmetric quantization of a float (V, D) table, as torch's
    ``embedding_bag_byte_prepack`` (module docstring for the layout).

    Per row: bias = min, scale = (max - min) / levels (255 for "int8", 15 for "int4"),
    both float32; q = round((x - bias) / scale) in [0, levels] (0 for a constant row).
    Every element then dequantises within scale / 2 of x (computed in float64).

    Args:
      table: (V, D) float32, float16 or bfloat16 array of finite values; "int4" needs D even.
      mode: "int8" or "int4".
    Returns:
      A ``QuantizedTable``.
    Raises:
      TypeError: a table that is not a float array. ValueError: another rank, D odd for
      "int4", a NaN or inf in the table, or an unknown mode.
    """
    fmt = _mode_of(mode)
    if fmt is TableFormat.KERAS_INT8:
        raise ValueError("quantize_table makes the asymmetric formats ('int8', 'int4'); Keras' int8 "
                         "layout comes from Keras (QuantizedTable.from_keras_int8)")
    table = np.asarray(table)
    if TableFormat.of_dtype(table.dtype) is None:
        raise TypeError(f"quantize_table needs a float32, float16 or bfloat16 table, got {table.dtype}")
    if table.ndim != 2 or table.shape[1] < 1:
        raise ValueError(f"quantize_table needs a 2-D (V, D) table with D >= 1, got shape {table.shape}")
    vocab, dim = table.shape
    if fmt is TableFormat.INT4_ROWWISE and dim % 2:
        raise ValueError(f"int4 packs two values a byte: D must be even, got D = {dim} (table shape {table.shape})")
    levels = _LEVELS[fmt]
    data, params = _row_buffer(vocab, fmt.storage_columns(dim))
    for start in range(0, vocab, _QUANTIZE_ROWS_PER_BLOCK):
        block = table[start:start + _QUANTIZE_ROWS_PER_BLOCK].astype(np.float64)  # [rows][D]
        rows = slice(start, start + block.shape[0])
        if not np.isfinite(block).all():
            row = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise ValueError(f"quantize_table needs finite values; row {row} has a NaN or inf")
        low = block.min(axis=1).astype(np.float32)                  # [rows], exact: a table value
        scale = ((block.max(axis=1) - low) / levels).astype(np.float32)
        safe = np.where(scale > 0, scale, 1.0)[:, None].astype(np.float64)
        nearest = np.rint((block - low[:, None]) / safe)            # the nearest level for the stored scale
        q = np.clip(np.where(scale[:, None] > 0, nearest, 0), 0, levels).astype(np.uint8)
        data[rows] = pack_int4(q) if fmt is TableFormat.INT4_ROWWISE else q
        params[rows, 0] = scale
        params[rows, 1] = low
    return QuantizedTable(fmt, data, params)


# --- the op on a quantized table (called by api.embedding_mean and bags.embedding_bag) ----------

def _backend_for(backend, ids_device: str) -> str:
    """The backend for a quantized table: refused before any availability probe unless it is
    one of QUANTIZED_BACKENDS (the table is in host memory, so no backend is picked for a GPU)."""
    import os

    from .api import BACKEND_ENV_VAR, choose_backend
    requested = backend if backend is not None else os.environ.get(BACKEND_ENV_VAR) or None
    if requested is not None and requested not in QUANTIZED_BACKENDS:
        from .checks import check_backend_name
        check_backend_name(requested)
        raise ValueError(f"a QuantizedTable runs on the {' and '.join(map(repr, QUANTIZED_BACKENDS))} "
                         f"backends so far (GPU kernels for quantized tables are not written yet), "
                         f"got backend {requested!r}")
    return choose_backend(requested, "cpu", ids_device)


def _ids_device(*arrays) -> str:
    from .backends import device_of
    return "cuda" if any(a is not None and device_of(a) == "cuda" for a in arrays) else "cpu"


def embedding_mean(qtable: QuantizedTable, ids, axis, mask_zero, backend, out=None) -> np.ndarray:
    """``api.embedding_mean`` for a quantized table: (B, D) or (B, L) float32. ``out``: a
    float32 array of that shape to write into (tests pass a poisoned one)."""
    from .backends import raise_bad_id_at
    from .checks import ID_DTYPES, check_ids_shape, check_mask_zero, ids_dtype_error, normalize_axis
    from .semantics import Axis
    axis = normalize_axis(axis)
    name = _backend_for(backend, _ids_device(ids))
    ids = np.asarray(ids)
    check_mask_zero(mask_zero)
    if np.dtype(ids.dtype) not in ID_DTYPES:
        raise ids_dtype_error(str(np.dtype(ids.dtype)), np.dtype(ids.dtype).kind in "fc")
    check_ids_shape(ids.shape)
    ids = np.ascontiguousarray(ids)  # the kernels walk ids flat: copies ids only, never the table
    batch, length = ids.shape
    vocab, dim = qtable.shape
    shape = (batch, dim) if axis is Axis.SEQUENCE else (batch, length)  # [B][D] or [B][L]
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    if name == "numpy":
        out[...] = _numpy_mean(qtable, ids, axis, bool(mask_zero))
        return out
    padding_id = 0 if mask_zero else -1
    if axis is Axis.SEQUENCE:
        offsets = np.arange(batch + 1, dtype=np.int64) * length            # the dense bags as CSR
        first_bad = _launch_pool(qtable, ids.reshape(-1), offsets, None, Pooling.MEAN, padding_id, out)
    else:
        first_bad = _launch_row_means(qtable, ids, padding_id, out)
    if first_bad < batch * length:
        raise_bad_id_at(first_bad, ids, vocab)
    return out


def embedding_bag(qtable: QuantizedTable, values, offsets, weights, combiner, backend, out=None,
                  check_bag_ids=None) -> np.ndarray:
    """``bags.embedding_bag`` for a quantized table: (B, D) float32. ``out`` as there;
    ``check_bag_ids``: bags' checks of values, offsets and weights (bags.py passes its own)."""
    from .backends import bag_out_of_range_error
    if check_bag_ids is None:
        from .bags import check_bag_ids
    combiner = Pooling.of(combiner)
    name = _backend_for(backend, _ids_device(values, offsets, weights))
    values, offsets = np.asarray(values), np.asarray(offsets)
    weights = None if weights is None else np.asarray(weights)
    check_bag_ids(values, offsets, weights)
    vocab, dim = qtable.shape
    if out is None:
        out = np.empty((offsets.shape[0] - 1, dim), dtype=np.float32)      # [B][D]
    values = np.ascontiguousarray(values)
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    weights = None if weights is None else np.ascontiguousarray(weights)
    if name == "numpy":
        from .reference import embedding_bag_reference
        bad = np.flatnonzero((values < 0) | (values >= vocab))
        if bad.size:
            raise bag_out_of_range_error(values, offsets, bad[0], vocab)
        out[...] = embedding_bag_reference(qtable, values, offsets, weights, combiner)
        return out
    first_bad = _launch_pool(qtable, values, offsets, weights, combiner, -1, out)
    if first_bad < values.shape[0]:
        raise bag_out_of_range_error(values, offsets, first_bad, vocab)
    return out


def _numpy_mean(qtable, ids, axis, mask_zero):
    from .backends import out_of_range_error
    from .reference import embedding_mean_reference
    vocab = qtable.shape[0]
    bad = (ids < 0) | (ids >= vocab)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise out_of_range_error(int(ids[row, col]), row, col, vocab)
    return embedding_mean_reference(qtable, ids, axis, mask_zero).astype(np.float32)


_NO_WEIGHTS = np.empty(0, dtype=np.float32)


def _serial(rows: int, qtable) -> bool:
    from . import launch
    from .backends import cpu as cpu_backend
    return launch.cpu_runs_serial(rows, qtable.format.bytes_per_row(qtable.shape[1])) \
        or cpu_backend.runs_serial_only()


def _launch_pool(qtable, values, offsets, weights, combiner, padding_id, out) -> int:
    """The pooling kernel over CSR bags; returns the position of the first bad id, or N."""
    import numba

    from . import launch
    from .backends import cpu as cpu_backend
    from .kernels import cpu_quant
    batch = offsets.shape[0] - 1
    args = (qtable.data, qtable.params, values, offsets, _NO_WEIGHTS if weights is None else weights,
            weights is not None, padding_id, combiner.kernel_code, qtable.format.kernel_code,
            launch.cpu_bags_per_chunk(batch, numba.config.NUMBA_NUM_THREADS),
            launch.cpu_rows_ahead(qtable.format.bytes_per_row(qtable.shape[1])), out)
    if _serial(values.shape[0], qtable):
        return cpu_quant.pool_quantized_serial(*args)
    return cpu_backend._launch(cpu_quant.pool_quantized, *args)


def _launch_row_means(qtable, ids, padding_id, out) -> int:
    """The axis-2 kernel; returns the flat position of the first bad id, or B * L."""
    import numba

    from . import launch
    from .backends import cpu as cpu_backend
    from .kernels import cpu_quant
    args = (qtable.data, qtable.params, ids, padding_id, qtable.format.kernel_code,
            launch.cpu_bags_per_chunk(ids.shape[0], numba.config.NUMBA_NUM_THREADS),
            launch.cpu_rows_ahead(qtable.format.bytes_per_row(qtable.shape[1])), out)
    if _serial(ids.size, qtable):
        return cpu_quant.gather_quantized_means_serial(*args)
    return cpu_backend._launch(cpu_quant.gather_quantized_means, *args)
