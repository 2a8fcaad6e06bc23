"""Variable-length bags: ``embedding_bag(table, values, offsets, weights=None, combiner="mean")``.

Bags in CSR form, as ``tf.nn.embedding_lookup_sparse`` and
``torch.nn.functional.embedding_bag`` take them: bag b is
``values[offsets[b]:offsets[b + 1]]``, with one weight per id when ``weights`` is given.
Every backend runs it: "cpu" (kernels/cpu_bags.py), "numpy" (the float64 reference),
"numba-cuda" (kernels/cuda_bags.py) and "cupy" (``gather_bags`` in kernels/gather_mean.cu).
Dense ``(B, L)`` ids stay ``embedding_mean``'s, with its contract.
"""
from __future__ import annotations

import numpy as np

from . import backends, launch
from .api import MEMORY_CHECK_MIN_BYTES, choose_backend
from .backends import bag_out_of_range_error, device_of
from .checks import check_table_shape, table_dtype_error
from .memory import output_too_large_error
from .quantized import QuantizedTable
from .semantics import TABLE_FORMATS, table_format
from .spec import BoundsCheck, Pooling


_ID_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
_WEIGHT_DTYPE = np.dtype(np.float32)
_NO_WEIGHTS = np.empty(0, dtype=np.float32)  # what the kernels get when no weights are passed

def embedding_bag(table, values, offsets, *, weights=None, combiner="mean", backend=None,
                  bounds_check="raise"):
    """Fused ``combiner(table[values] * weights)`` per bag, for bags of any length (CSR).

    Args:
      table: (V, D) float32, float16 or bfloat16 (``ml_dtypes.bfloat16``) array: on the
        host (NumPy, or anything ``np.asarray`` takes without copying), or a GPU array
        (CUDA array interface / DLPack) for the GPU backends. Or a ``QuantizedTable``
        (``quantize_table``; "cpu" and "numpy" backends only), whose results are float32.
      values: (N,) int32 or int64, the ids of every bag one after another, each in [0, V).
      offsets: (B + 1,) int32 or int64, non-decreasing, ``offsets[0] == 0`` and
        ``offsets[-1] == N``: bag b is ``values[offsets[b]:offsets[b + 1]]``, and may be empty.
        On a GPU table's call, values, offsets and weights may be on the host or the
        GPU (offsets on the GPU are copied back once to be checked: B + 1 integers).
      weights: None, or (N,) float32, one weight per id (any sign, zero included).
      combiner: as ``tf.nn.embedding_lookup_sparse``'s, with w = 1 when unweighted:
        "mean": sum(w * row) / sum(w); "sum": sum(w * row);
        "sqrtn": sum(w * row) / sqrt(sum(w^2)).
        A zero denominator gives zeros (TF's ``div_no_nan``): an empty bag gives zeros
        under every combiner (TF's unsafe op assumes there are none), and so does a
        mean whose weights sum to 0.
      backend: None (the fastest available for the table's device, or the
        ``FUSED_EMBEDDING_BACKEND`` environment variable), or one of
        ``available_backends()``, as for ``embedding_mean``.
      bounds_check: "raise" or "deferred", as for ``embedding_mean`` (deferred: GPU
        backends only; a bad id then raises from a later call or ``synchronize()``).

    Returns:
      (B, D) array of the table's dtype, accumulated in float32 ("numpy": float64,
      rounded once to the table's dtype), on the table's device (NumPy for host
      tables, also under a GPU backend).

    Raises:
      TypeError: a dtype other than the above.
      ValueError: a rank, length or offsets other than the above, an unknown combiner
        or backend, a GPU table under a host backend, or GPU ids with a host table.
      IndexError: an id outside [0, V), the first in ``values`` order; the message gives
        the id, its position in ``values``, its bag and V. No partial result is returned.
      MemoryError: the output would not fit in the host's memory.
    """
    return _embedding_bag(table, values, offsets, weights, combiner, backend,
                          bounds_check=BoundsCheck.of(bounds_check))


def _embedding_bag(table, values, offsets, weights, combiner, backend, out=None, n_chunks=None,
                   bounds_check=BoundsCheck.RAISE):
    """``embedding_bag``; ``out`` (B, D) of the table's dtype receives the result (tests pass
    a poisoned one; on an error it may be partly written), ``n_chunks`` forces the cpu
    kernel's split (tests: bags cut across many chunks)."""
    if type(table) is QuantizedTable:
        from . import quantized
        return quantized.embedding_bag(table, values, offsets, weights, combiner, backend, out,
                                       check_bag_ids=check_bag_ids)
    table, values, offsets, weights = (None if a is None else _as_array(a) for a in
                                       (table, values, offsets, weights))
    combiner = Pooling.of(combiner)
    ids_device = "cuda" if any(device_of(a) == "cuda" for a in (values, offsets, weights) if a is not None) \
        else "cpu"
    name = choose_backend(backend, device_of(table), ids_device)
    host_offsets = _to_host(offsets)
    check_bag_inputs(table, values, host_offsets, weights)
    shape = (offsets.shape[0] - 1, table.shape[1])
    out_bytes = shape[0] * shape[1] * table.dtype.itemsize
    if out_bytes >= MEMORY_CHECK_MIN_BYTES:
        limit = backends.get(name).memory_limit_bytes()
        if out_bytes > limit:
            raise output_too_large_error(shape, table.dtype, out_bytes, limit, name)
    if backends.device_of_backend(name) == "cuda":
        offsets = offsets if device_of(offsets) == "cuda" else np.asarray(offsets, np.int64)
        return backends.get(name).embedding_bag(table, values, offsets, weights, combiner, out=out,
                                                bounds_check=bounds_check)
    if out is None:
        out = np.empty(shape, dtype=table.dtype)
    values = np.ascontiguousarray(values)  # the kernels walk ids flat: copies ids only, never the table
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)  # B + 1 entries; one offsets type to compile
    weights = None if weights is None else np.ascontiguousarray(weights)
    launcher = _launch_cpu if name == "cpu" else _launch_numpy
    launcher(table, values, offsets, weights, combiner, out, n_chunks)
    return out


def _as_array(array):
    """GPU arrays as they are; anything else as a NumPy array (zero-copy for TF and torch CPU tensors)."""
    if type(array) is np.ndarray or device_of(array) == "cuda":
        return array
    return np.asarray(array)


def _to_host(array) -> np.ndarray:
    """A host copy of a GPU array (CUDA array interface), the array itself on the host."""
    if device_of(array) != "cuda":
        return array
    if not hasattr(array, "__cuda_array_interface__"):
        raise TypeError(f"offsets on a GPU must expose __cuda_array_interface__ (CuPy, Numba, torch), "
                        f"got {type(array).__name__}")
    from numba import cuda
    return cuda.as_cuda_array(array).copy_to_host()


def _integer_check(array, name: str, shape_text: str) -> None:
    if array.dtype not in _ID_DTYPES:
        dtype = np.dtype(array.dtype)
        hint = " (float ids are not truncated as Keras does)" if dtype.kind in "fc" else ""
        raise TypeError(f"{name} must be int32 or int64, got {dtype}{hint}")
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D {shape_text}, got {array.ndim}-D with shape {array.shape}")


def check_bag_inputs(table, values, offsets, weights) -> None:
    """The bags op's checks on host arrays: dtypes, ranks, CSR offsets, weights.

    The offsets are read once here (B + 1 integers); the ids are checked against V by
    the kernels as they read them.
    """
    if np.dtype(table.dtype) not in TABLE_FORMATS:
        raise table_dtype_error(str(np.dtype(table.dtype)))
    check_table_shape(table.shape)
    check_bag_ids(values, offsets, weights)


def check_bag_ids(values, offsets, weights) -> None:
    """``check_bag_inputs`` less the table's checks (a quantized table has its own)."""
    _integer_check(values, "values", "(N,)")
    _integer_check(offsets, "offsets", "(B + 1,)")
    total = values.shape[0]
    if offsets.shape[0] < 1:
        raise ValueError("offsets must have B + 1 >= 1 entries (offsets[0] == 0, then the end of "
                         "each bag), got an empty array")
    if offsets[0] != 0:
        raise ValueError(f"offsets[0] must be 0 (the first bag starts at values[0]), got {int(offsets[0])}")
    falls = np.flatnonzero(offsets[1:] < offsets[:-1])
    if falls.size:
        i = int(falls[0]) + 1
        raise ValueError(f"offsets must be non-decreasing, got offsets[{i}] = {int(offsets[i])} "
                         f"after offsets[{i - 1}] = {int(offsets[i - 1])}")
    last = int(offsets[-1])
    if last != total:
        where = "past the end of" if last > total else "short of the end of"
        raise ValueError(f"offsets[-1] must equal len(values) = {total}, got offsets[{offsets.shape[0] - 1}] "
                         f"= {last}, {where} values")
    if weights is not None:
        if np.dtype(weights.dtype) != _WEIGHT_DTYPE:
            raise TypeError(f"weights must be float32, got {np.dtype(weights.dtype)}")
        if weights.shape != values.shape:
            raise ValueError(f"weights must have the shape of values, {values.shape}, got {weights.shape}")


def _launch_cpu(table, values, offsets, weights, combiner, out, n_chunks):
    import numba

    from .backends import cpu as cpu_backend
    from .kernels import cpu_bags
    batch, total = offsets.shape[0] - 1, values.shape[0]
    row_bytes = table.shape[1] * table.dtype.itemsize
    serial = launch.cpu_runs_serial(total, row_bytes) or cpu_backend.runs_serial_only()
    if n_chunks is None:
        n_chunks = launch.cpu_bag_chunks(total, batch, numba.config.NUMBA_NUM_THREADS, serial)
    args = (cpu_backend._bits(table), values, offsets, _NO_WEIGHTS if weights is None else weights,
            weights is not None, combiner.kernel_code, table_format(table.dtype), int(n_chunks),
            launch.cpu_rows_ahead(row_bytes), cpu_backend._bits(out))
    if serial:
        first_bad = cpu_bags.embedding_bag_serial(*args)
    else:
        first_bad = cpu_backend._launch(cpu_bags.embedding_bag, *args)
    if first_bad < total:
        raise bag_out_of_range_error(values, offsets, first_bad, table.shape[0])


def _launch_numpy(table, values, offsets, weights, combiner, out, n_chunks):
    from .reference import embedding_bag_reference
    vocab = table.shape[0]
    bad = np.flatnonzero((values < 0) | (values >= vocab))
    if bad.size:
        raise bag_out_of_range_error(values, offsets, bad[0], vocab)
    out[...] = embedding_bag_reference(table, values, offsets, weights, combiner).astype(table.dtype)
