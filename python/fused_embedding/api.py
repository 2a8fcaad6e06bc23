"""The core op: validate once, normalise axis and dtypes, pick a backend, launch."""
from __future__ import annotations

import logging
import os

import numpy as np

from . import backends
from .backends import device_of
from .checks import check_backend_name, check_host_inputs, normalize_axis
from .memory import ALIGNED_OUTPUT_MIN_BYTES, empty_aligned, output_too_large_error
from .quantized import QuantizedTable
from .semantics import output_shape
from .spec import BoundsCheck

log = logging.getLogger("fused_embedding")

BACKEND_ENV_VAR = "FUSED_EMBEDDING_BACKEND"
MEMORY_CHECK_MIN_BYTES = 64 << 20

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


def embedding_mean(table, ids, *, axis=1, mask_zero=False, backend=None, bounds_check="raise"):
    """Fused ``mean(table[ids], axis)``: gather rows and average, without the (B, L, D) intermediate.

    Args:
      table: (V, D) float32, float16 or bfloat16 (``ml_dtypes.bfloat16`` for NumPy)
        array; NumPy (or anything ``np.asarray`` takes without copying) on the host,
        or a GPU array (CUDA array interface / DLPack) for the GPU backends. Or a
        ``QuantizedTable`` (``quantize_table``; "cpu" and "numpy" backends only), whose
        results are float32.
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
      bounds_check: "raise" (default): a bad id raises from this call, which on a
        GPU waits for the kernel to read its error flag. "deferred": a GPU call
        returns as soon as its kernel is queued; a bad id raises IndexError from the
        first later call once that kernel has finished, or from
        ``fused_embedding.synchronize()`` (the bad call's result must not be used).
        Host backends check every call as it runs either way.

    Returns:
      (B, D) or (B, L) array of the table's dtype (accumulated in float32), on the
      table's device; NumPy for host inputs, and for a GPU backend forced on host inputs.

    Raises:
      TypeError / ValueError: a dtype, rank, axis or backend other than the above.
      IndexError: an id outside [0, V) (negative included); the message gives the
        id, its (row, column) and V. No partial result is returned.
      MemoryError: the output would not fit in the device's memory.
    """
    return _embedding_mean(table, ids, axis, mask_zero, backend, aligned_output=False,
                           bounds_check=BoundsCheck.of(bounds_check))


def _embedding_mean(table, ids, axis, mask_zero, backend, aligned_output: bool,
                    bounds_check: BoundsCheck = BoundsCheck.RAISE):
    """``embedding_mean``; with ``aligned_output`` a host backend's result of
    ``memory.ALIGNED_OUTPUT_MIN_BYTES`` or more starts on a 64-byte line.

    For the TF op, which then hands the result to TF without a copy. Other callers
    don't ask: the alignment costs 3 us, and 40-70 us when the caches are cold
    (benchmarks/NOTES.md).
    """
    if type(table) is QuantizedTable:
        from . import quantized
        return quantized.embedding_mean(table, ids, axis, mask_zero, backend)
    axis = normalize_axis(axis)
    table_device, ids_device = device_of(table), device_of(ids)
    if table_device == "cpu" and type(table) is not np.ndarray:
        table = np.asarray(table)  # zero-copy for TF eager tensors and CPU torch tensors
    if ids_device == "cpu" and type(ids) is not np.ndarray:
        ids = np.asarray(ids)
    check_host_inputs(table, ids, mask_zero)
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
        raise output_too_large_error(shape, table.dtype, out_bytes, limit, name)
    if log.isEnabledFor(logging.DEBUG):  # the arguments below cost more than the check
        log.debug("embedding_mean: backend=%s table=%s%s ids=%s%s axis=%d mask_zero=%s", name,
                  np.dtype(table.dtype), tuple(table.shape), np.dtype(ids.dtype), tuple(ids.shape),
                  int(axis), mask_zero)
    # Smaller results, and every result of a plain call, come from the backend's np.empty.
    out = (empty_aligned(shape, table.dtype)
           if aligned_output and out_bytes >= ALIGNED_OUTPUT_MIN_BYTES
           and backends.device_of_backend(name) == "cpu" else None)
    if bounds_check is BoundsCheck.DEFERRED and backends.device_of_backend(name) == "cuda":
        return module.embedding_mean(table, ids, axis, bool(mask_zero), out=out, bounds_check=bounds_check)
    return module.embedding_mean(table, ids, axis, bool(mask_zero), out=out)


def synchronize() -> None:
    """Wait for every GPU call made with ``bounds_check="deferred"`` and raise the
    IndexError of the first bad id any of them met (then forget it). A no-op on the host."""
    backends.synchronize_deferred()


def available_backends() -> list[str]:
    """The backend names usable here, fastest first (GPU backends first where a GPU works)."""
    return backends.available_backends()
