"""The core op: validate once, normalise axis and dtypes, pick a backend, launch."""
from __future__ import annotations

import logging
import os

import numpy as np

from . import backends
from .memory import ALIGNED_OUTPUT_MIN_BYTES, empty_aligned
from .semantics import ID_DTYPES, TABLE_FORMATS, Axis, output_shape

log = logging.getLogger("fused_embedding")

BACKEND_ENV_VAR = "FUSED_EMBEDDING_BACKEND"
MEMORY_CHECK_MIN_BYTES = 64 << 20

# DLPack device types that live on an NVIDIA GPU (kDLCUDA, kDLCUDAHost is host).
_DLPACK_CUDA = 2
_DLPACK_CUDA_MANAGED = 13


def device_of(array) -> str:
    """"cuda" for GPU arrays (CUDA array interface or a CUDA DLPack device), else "cpu"."""
    if type(array) is np.ndarray:  # the common case, answered without attribute probes
        return "cpu"
    if hasattr(array, "__cuda_array_interface__"):
        return "cuda"
    dlpack_device = getattr(array, "__dlpack_device__", None)
    if dlpack_device is not None:
        try:
            kind = int(dlpack_device()[0])
        except Exception:
            return "cpu"
        if kind in (_DLPACK_CUDA, _DLPACK_CUDA_MANAGED):
            return "cuda"
    return "cpu"


_AXES = {1: Axis.SEQUENCE, 2: Axis.EMBEDDING, -1: Axis.EMBEDDING}


def normalize_axis(axis) -> Axis:
    if type(axis) is int and axis in _AXES:  # the common case, before the type checks below
        return _AXES[axis]
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int (1, 2 or -1), got {type(axis).__name__} {axis!r}")
    if axis in _AXES:
        return _AXES[int(axis)]
    raise ValueError(f"axis must be 1 (mean over the sequence -> (B, D)) or 2 / -1 "
                     f"(mean over the embedding -> (B, L)), got {axis}")


def _check_inputs(table, ids, mask_zero) -> None:
    if not isinstance(mask_zero, (bool, np.bool_)):
        raise TypeError(f"mask_zero must be a bool, got {type(mask_zero).__name__} {mask_zero!r}")
    # A NumPy dtype is looked up as is (the common case); anything else that names one
    # (a scalar type, a string) goes through np.dtype first.
    if table.dtype not in TABLE_FORMATS and np.dtype(table.dtype) not in TABLE_FORMATS:
        raise TypeError(f"table must be float32, float16 or bfloat16, got {np.dtype(table.dtype)}")
    if table.ndim != 2:
        raise ValueError(f"table must be 2-D (V, D), got {table.ndim}-D with shape {tuple(table.shape)}")
    if table.shape[1] < 1:
        raise ValueError(f"table must have at least one column (D >= 1), got shape {tuple(table.shape)}")
    if ids.dtype not in ID_DTYPES and np.dtype(ids.dtype) not in ID_DTYPES:
        ids_dtype = np.dtype(ids.dtype)
        hint = " (float ids are not truncated as Keras does)" if ids_dtype.kind in "fc" else ""
        raise TypeError(f"ids must be int32 or int64, got {ids_dtype}{hint}")
    if ids.ndim != 2:
        raise ValueError(f"ids must be 2-D (B, L), got {ids.ndim}-D with shape {tuple(ids.shape)}")


def check_backend_name(name) -> None:
    """Raise ValueError unless ``name`` is one of the registered backends' names."""
    if name not in backends.REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected one of {sorted(backends.REGISTRY)}")


def choose_backend(requested, table_device: str, ids_device: str) -> str:
    """The backend to run: the requested one (argument, then env var) or the fastest for the device."""
    if table_device == "cpu" and ids_device == "cuda":
        raise ValueError("ids are on a GPU but the table is in host memory: put the table on the "
                         "GPU (the ids, being small, may stay on the host), or both on the host")
    name = requested if requested is not None else os.environ.get(BACKEND_ENV_VAR) or None
    if name is not None:
        check_backend_name(name)
        reason = backends.unavailable_reason(name)
        if reason is not None:
            raise RuntimeError(f"backend {name!r} was requested but is not available here: {reason}")
        if table_device == "cuda" and backends.device_of_backend(name) == "cpu":
            raise ValueError(f"backend {name!r} runs on host arrays but the table is on a GPU; "
                             f"use a GPU backend or move the table to the host yourself")
        return name
    for name in backends.REGISTRY:
        if backends.device_of_backend(name) == table_device and backends.unavailable_reason(name) is None:
            return name
    tried = "; ".join(f"{n}: {backends.unavailable_reason(n)}" for n in backends.REGISTRY
                      if backends.device_of_backend(n) == table_device)
    raise RuntimeError(f"no backend can run on {table_device} arrays here ({tried})")


def embedding_mean(table, ids, *, axis=1, mask_zero=False, backend=None):
    """Fused ``mean(table[ids], axis)``: gather rows and average, without the (B, L, D) intermediate.

    Args:
      table: (V, D) float32, float16 or bfloat16 (``ml_dtypes.bfloat16`` for NumPy)
        array; NumPy (or anything ``np.asarray`` takes without copying) on the host,
        or a GPU array (CUDA array interface / DLPack) for the GPU backends.
      ids: (B, L) int32 or int64 array of row indices in [0, V). On the host even
        when the table is on a GPU (they are copied over; the table never is).
      axis: 1 -> (B, D), the mean over the L ids of each bag (Keras
        ``Embedding -> GlobalAveragePooling1D()``); 2 or -1 -> (B, L), the mean over
        the D features of each gathered row (``data_format="channels_first"``).
      mask_zero: id 0 is padding. Axis 1 averages the non-padding ids only, and a
        bag of nothing but padding gives zeros (Keras gives NaN); axis 2 gives 0 at
        padding positions.
      backend: None (the fastest available for the table's device, or the
        ``FUSED_EMBEDDING_BACKEND`` environment variable), or one of
        ``available_backends()``: "numba-cuda", "cupy", "cpu", "numpy".

    Returns:
      (B, D) or (B, L) array of the table's dtype (accumulated in float32), on the
      table's device; NumPy for host inputs, and for a GPU backend forced on host inputs.

    Raises:
      TypeError / ValueError: a dtype, rank, axis or backend other than the above.
      IndexError: an id outside [0, V) (negative included); the message gives the
        id, its (row, column) and V. No partial result is returned.
      MemoryError: the output would not fit in the device's memory.
    """
    return _embedding_mean(table, ids, axis, mask_zero, backend, aligned_output=False)


def _embedding_mean(table, ids, axis, mask_zero, backend, aligned_output: bool):
    """``embedding_mean``; with ``aligned_output`` a host backend's result of
    ``memory.ALIGNED_OUTPUT_MIN_BYTES`` or more starts on a 64-byte line.

    For the TF op, which then hands the result to TF without a copy. Other callers
    don't ask: the alignment costs 3 us, and 40-70 us when the caches are cold
    (benchmarks/NOTES.md).
    """
    axis = normalize_axis(axis)
    table_device, ids_device = device_of(table), device_of(ids)
    if table_device == "cpu" and type(table) is not np.ndarray:
        table = np.asarray(table)  # zero-copy for TF eager tensors and CPU torch tensors
    if ids_device == "cpu" and type(ids) is not np.ndarray:
        ids = np.asarray(ids)
    _check_inputs(table, ids, mask_zero)
    name = choose_backend(backend, table_device, ids_device)
    module = backends.get(name)
    batch, length = ids.shape
    shape = output_shape(axis, batch, length, table.shape[1])
    out_bytes = shape[0] * shape[1] * table.dtype.itemsize
    # Asking a device for its free memory costs a driver call; an output under
    # MEMORY_CHECK_MIN_BYTES that still doesn't fit fails in the allocator with
    # that library's out-of-memory error, before the kernel runs.
    limit = module.memory_limit_bytes() if out_bytes >= MEMORY_CHECK_MIN_BYTES else out_bytes
    if out_bytes > limit:
        raise MemoryError(f"the output {shape} {np.dtype(table.dtype)} needs {out_bytes / 2**30:.1f} GiB, "
                          f"more than the {limit / 2**30:.1f} GiB the {name!r} backend's device has")
    if log.isEnabledFor(logging.DEBUG):  # the arguments below cost more than the check
        log.debug("embedding_mean: backend=%s table=%s%s ids=%s%s axis=%d mask_zero=%s", name,
                  np.dtype(table.dtype), tuple(table.shape), np.dtype(ids.dtype), tuple(ids.shape),
                  int(axis), mask_zero)
    # Smaller results, and every result of a plain call, come from the backend's np.empty.
    out = (empty_aligned(shape, table.dtype)
           if aligned_output and out_bytes >= ALIGNED_OUTPUT_MIN_BYTES
           and backends.device_of_backend(name) == "cpu" else None)
    return module.embedding_mean(table, ids, axis, bool(mask_zero), out=out)


def available_backends() -> list[str]:
    """The backend names usable here, fastest first (GPU backends first where a GPU works)."""
    return backends.available_backends()
