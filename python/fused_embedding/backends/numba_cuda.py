"""The "numba-cuda" backend: Numba CUDA kernels (``kernels/cuda.py``) on GPU arrays.

Device inputs (anything with ``__cuda_array_interface__``, or a CUDA DLPack
array CuPy can import) are used in place and the result stays on the device.
Host (NumPy) inputs are copied to the device and the result copied back: the way
to validate the kernels, and the way they run under the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``). A table on the GPU with ids on the host copies the
ids only, never the table.
"""
from __future__ import annotations

import numpy as np

from .. import launch
from ..semantics import BFLOAT16, FORMAT_BFLOAT16, FORMAT_FLOAT16, FORMAT_FLOAT32, Axis, output_shape, table_format
from . import PreparedCall, out_of_range_error

DEVICE = "cuda"

# Widest load the Numba kernels issue: a uint64 (two float32, four float16 or
# bfloat16; each float16 then widened by one hardware conversion, kernels/cuda.py).
MAX_WORD_BYTES = {FORMAT_FLOAT32: 8, FORMAT_FLOAT16: 8, FORMAT_BFLOAT16: 8}
# CUDA 13 supports compute capability 7.5 (Turing) and newer.
MIN_COMPUTE_CAPABILITY = (7, 5)


def _simulated() -> bool:
    from numba.core import config
    return bool(config.ENABLE_CUDASIM)


def unavailable_reason() -> str | None:
    from .. import kernels  # noqa: F401  (its NumPy 2.5 shim must precede numba-cuda's first compile)
    try:
        import numba_cuda  # noqa: F401  (the maintained CUDA target, not numba's built-in one)
        from numba import cuda
    except ImportError as exc:
        return f"numba-cuda is not installed ({exc}); pip install numba-cuda"
    if _simulated():
        return None
    if not cuda.is_available():
        return "no usable CUDA GPU or driver (numba.cuda.is_available() is False)"
    capability = cuda.get_current_device().compute_capability
    if tuple(capability) < MIN_COMPUTE_CAPABILITY:
        return (f"the GPU has compute capability {capability[0]}.{capability[1]}, "
                f"below the {MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]} CUDA 13 supports")
    return None


def memory_limit_bytes() -> int:
    if _simulated():
        from .numpy import host_memory_available
        return host_memory_available()
    from numba import cuda
    free, _ = cuda.current_context().get_memory_info()
    return int(free)


def _on_device(array) -> bool:
    from ..api import device_of
    return device_of(array) == "cuda"


def device_view(array):
    """A Numba device array over a GPU array's memory (no copy).

    Takes ``__cuda_array_interface__`` objects, or CUDA DLPack arrays through CuPy.
    """
    from numba import cuda
    if hasattr(array, "__cuda_array_interface__"):
        return cuda.as_cuda_array(array)
    try:
        import cupy
    except ImportError as exc:
        raise TypeError(f"a {type(array).__name__} on the GPU without __cuda_array_interface__ "
                        f"needs CuPy to be imported through DLPack ({exc})") from exc
    return cuda.as_cuda_array(cupy.from_dlpack(array))


def element_dtype(dtype) -> np.dtype:
    """The dtype the kernels see for a table/output element: float32, float16, or bfloat16's bits."""
    dtype = np.dtype(dtype)
    return np.dtype(np.uint16) if dtype == BFLOAT16 else dtype


def word_dtype(fmt: int, word_bytes: int, item_bytes: int) -> np.dtype:
    """The dtype of one load: single float32s and float16s as themselves, else unsigned bits."""
    if word_bytes == item_bytes:
        return np.dtype({FORMAT_FLOAT32: np.float32, FORMAT_FLOAT16: np.float16, FORMAT_BFLOAT16: np.uint16}[fmt])
    return np.dtype({4: np.uint32, 8: np.uint64}[word_bytes])


def prepare(table, ids, axis, mask_zero, out=None) -> PreparedCall:
    """Device views/copies of the inputs and output, the kernel and its launch shape.

    table [V][D] float32/float16/bfloat16, ids [B][L] int32/int64 (host or device);
    out: None, or a host/device array of the output's shape and the table's dtype.
    """
    from numba import cuda

    from ..kernels import cuda as kernels
    table_on_device = _on_device(table)
    ids_on_device = _on_device(ids)
    batch, length = ids.shape
    vocab, dim = table.shape
    dtype = np.dtype(table.dtype)
    fmt = table_format(dtype)
    shape = output_shape(axis, batch, length, dim)
    elements = element_dtype(dtype)
    if batch == 0 or (axis is Axis.EMBEDDING and length == 0):  # nothing to write: no zero-size grid
        if out is None:
            out = np.empty(shape, dtype) if not table_on_device else \
                _device_result(cuda.device_array(shape, elements), dtype, table)
        return PreparedCall(None, lambda: out)

    # Table -> words: a view of the same bytes, loaded word_bytes at a time.
    if table_on_device:
        d_table = device_view(table)
        if d_table.dtype != elements:
            d_table = d_table.view(elements)
        contiguous = d_table.is_c_contiguous()
        address = d_table.device_ctypes_pointer.value if contiguous else 1
    else:
        host_table = np.ascontiguousarray(table).view(elements)
        d_table, contiguous, address = None, True, 0  # a fresh device allocation is 256-byte aligned
    word_bytes = launch.gpu_word_bytes(dim, dtype.itemsize, address, MAX_WORD_BYTES[fmt]) \
        if contiguous else dtype.itemsize
    word = word_dtype(fmt, word_bytes, dtype.itemsize)
    if table_on_device:
        d_words = d_table.view(word) if word != d_table.dtype else d_table
    else:
        d_words = cuda.to_device(host_table.view(word))

    d_ids = device_view(ids) if ids_on_device else cuda.to_device(np.ascontiguousarray(ids))
    if out is None:
        d_out = _device_empty(shape, elements)
        host_out = None if table_on_device else np.empty(shape, dtype)
    elif _on_device(out):
        d_out = device_view(out)
        if d_out.dtype != elements:
            d_out = d_out.view(elements)
        host_out = None
    else:
        host_out = out
        d_out = cuda.to_device(out.view(elements))  # keeps what the caller put there (poison)
    bad_position = _device_full(batch * length)  # "no bad id": the kernel atomically lowers it

    config = launch.gpu_launch(axis, batch, length, dim, dtype.itemsize, word_bytes)
    if axis is Axis.SEQUENCE:
        kernel = kernels.make_gather_mean_sequence(fmt, word.str, config.lanes, config.words_per_lane,
                                                   config.rows_in_flight)
    else:
        kernel = kernels.make_gather_mean_embedding(fmt, word.str, config.lanes)

    def finish():
        first_bad = int(bad_position.copy_to_host()[0])  # the one value read back; waits for the kernel
        if first_bad < batch * length:
            row, col = divmod(first_bad, length)
            bad_id = d_ids[row:row + 1, col:col + 1].copy_to_host()[0, 0] if ids_on_device else ids[row, col]
            raise out_of_range_error(int(bad_id), row, col, vocab)
        if host_out is not None:
            d_out.copy_to_host(host_out.view(elements))
            return host_out
        return out if out is not None else _device_result(d_out, dtype, table)

    args = (d_words, d_ids, bool(mask_zero), d_out, bad_position)
    return PreparedCall(lambda: kernel[config.grid, config.block](*args), finish)


def embedding_mean(table, ids, axis, mask_zero, out=None):
    """table [V][D] float32/float16/bfloat16, ids [B][L] int32/int64 -> out [B][D] or [B][L].

    On the device when the table is; NumPy when it is on the host. ``out``: an
    optional output (host or device) of the table's dtype, written in place.
    """
    call = prepare(table, ids, axis, mask_zero, out)
    call.launch()
    return call.finish()


def _device_empty(shape, dtype):
    """An uninitialised device array, from CuPy's memory pool when CuPy is there.

    Numba allocates with cudaMalloc and frees with cudaFree, which waits for the
    device: measured on an H200, the whole call took 1.43 ms around a 0.29 ms
    kernel (benchmarks/RESULTS.md). A pooled block is reused without either.
    """
    from numba import cuda
    try:
        import cupy
    except ImportError:
        return cuda.device_array(shape, dtype)
    # The view keeps the CuPy array alive; nothing was written to it, so no sync.
    return cuda.as_cuda_array(cupy.empty(shape, dtype), sync=False)


def _device_full(value):
    """A one-element int64 device array holding value.

    Numba's ``array[:] = value`` launches a Numba assignment kernel through its
    dispatcher (the largest part of the 0.44 ms the call spent preparing on an
    H200, benchmarks/RESULTS.md); CuPy fills from its pool with one small launch.
    """
    from numba import cuda
    try:
        import cupy
    except ImportError:
        return cuda.to_device(np.array([value], dtype=np.int64))
    return cuda.as_cuda_array(cupy.full((1,), value, dtype=np.int64), sync=False)


def _device_result(d_out, dtype, table):
    """The device output as the caller's kind of array: CuPy for CuPy tables, else Numba's."""
    try:
        import cupy
    except ImportError:
        cupy = None
    if cupy is not None and isinstance(table, cupy.ndarray) and np.dtype(dtype) != BFLOAT16:
        return cupy.asarray(d_out)
    if np.dtype(dtype) == BFLOAT16:
        return d_out.view(BFLOAT16)
    return d_out
