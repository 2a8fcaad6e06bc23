"""The "cupy" backend: CUDA C kernels (``kernels/gather_mean.cu``) compiled by CuPy's RawModule.

The fallback when numba-cuda can't run. Same contract as "numba-cuda": device
inputs stay on the device and give a CuPy result there; host (NumPy) inputs are
copied over and the result copied back; a GPU table with host ids copies the ids
only. Kernels are compiled once per device, table format, id dtype and launch
shape (NVRTC, memoised here and cached on disk by CuPy).
"""
from __future__ import annotations

import functools
from importlib import resources

import numpy as np

from .. import launch
from ..semantics import BFLOAT16, Axis, output_shape, table_format
from ..spec import BoundsCheck
from . import NO_BAD_POSITION_BYTE, PreparedCall, bag_out_of_range_error, device_of, gpu_staging

DEVICE = "cuda"

# Widest load the CUDA C kernels issue: a uint4 (four float32, eight 16-bit floats).
MAX_WORD_BYTES = 16
SOURCE_FILE = "gather_mean.cu"
ID_TYPE_NAMES = {np.dtype(np.int32): "int", np.dtype(np.int64): "long long"}
MIN_COMPUTE_CAPABILITY = 75  # CUDA 13 supports 7.5 (Turing) and newer


def unavailable_reason() -> str | None:
    try:
        import cupy
    except ImportError as exc:
        return f"CuPy is not installed ({exc}); pip install cupy-cuda13x (or -cuda12x)"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no CUDA GPU"
        capability = int(cupy.cuda.Device().compute_capability)
    except Exception as exc:  # no driver, or a driver older than CuPy's CUDA
        return f"CuPy cannot use a GPU here: {type(exc).__name__}: {exc}"
    if capability < MIN_COMPUTE_CAPABILITY:
        return f"the GPU has compute capability {capability / 10:.1f}, below the 7.5 CUDA 13 supports"
    return None


def memory_limit_bytes() -> int:
    import cupy
    free, _ = cupy.cuda.runtime.memGetInfo()
    return int(free) + int(cupy.get_default_memory_pool().free_bytes())  # the pool's spare blocks are reusable


def kernel_source() -> str:
    """The CUDA C source of the kernels (installed as package data of fused_embedding.kernels)."""
    return resources.files("fused_embedding.kernels").joinpath(SOURCE_FILE).read_text()


def kernel_name(axis: Axis, fmt: int, config: launch.GpuLaunch, id_dtype) -> str:
    """The template instantiation a launch uses, e.g. ``gather_mean_sequence<0, 16, 32, 2, 4, int>``."""
    id_type = ID_TYPE_NAMES[np.dtype(id_dtype)]
    if Axis(axis) is Axis.SEQUENCE:
        return (f"gather_mean_sequence<{fmt}, {config.word_bytes}, {config.lanes}, "
                f"{config.words_per_lane}, {config.rows_in_flight}, {id_type}>")
    return f"gather_mean_embedding<{fmt}, {config.word_bytes}, {config.lanes}, {id_type}>"


def bag_kernel_name(fmt: int, config: launch.GpuLaunch, pooling, weighted: bool, id_dtype) -> str:
    """The CSR bags instantiation, e.g. ``gather_bags<0, 16, 32, 1, 4, 0, 1, long long>``."""
    return (f"gather_bags<{fmt}, {config.word_bytes}, {config.lanes}, {config.words_per_lane}, "
            f"{config.rows_in_flight}, {pooling.kernel_code}, {int(bool(weighted))}, "
            f"{ID_TYPE_NAMES[np.dtype(id_dtype)]}>")


@functools.lru_cache(maxsize=None)
def _kernel(device_id: int, fmt: int, id_dtype: str, name: str):
    """The compiled kernel ``name`` on one device, compiled once (NVRTC) and memoised."""
    import cupy
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=kernel_source(), options=("-std=c++17",), name_expressions=[name])
        return module.get_function(name)


def _as_cupy(array):
    """A CuPy array over a GPU array's memory (CUDA array interface or DLPack), no copy."""
    import cupy
    if isinstance(array, cupy.ndarray):
        return array
    if hasattr(array, "__cuda_array_interface__"):
        return cupy.asarray(array)
    return cupy.from_dlpack(array)


def _element_dtype(dtype) -> np.dtype:
    """The dtype CuPy holds an element in: float32, float16, or bfloat16's bits."""
    return np.dtype(np.uint16) if np.dtype(dtype) == BFLOAT16 else np.dtype(dtype)


def prepare(table, ids, axis, mask_zero, out=None, bounds_check=BoundsCheck.RAISE) -> PreparedCall:
    """Device views/copies of the inputs and output, the compiled kernel and its launch shape.

    table [V][D] float32/float16/bfloat16, ids [B][L] int32/int64 (host or device);
    out: None, or a host/device array of the output's shape and the table's dtype.
    bounds_check: RAISE reads the error flag in ``finish()``; DEFERRED queues its
    asynchronous copy (backends/gpu_staging.py).
    """
    import cupy

    table_on_device = device_of(table) == "cuda"
    ids_on_device = device_of(ids) == "cuda"
    batch, length = ids.shape
    vocab, dim = table.shape
    dtype = np.dtype(table.dtype)
    elements = _element_dtype(dtype)
    fmt = table_format(dtype)
    shape = output_shape(axis, batch, length, dim)
    if gpu_staging.nothing_to_write(axis, batch, length):
        if out is None:
            out = cupy.empty(shape, elements) if table_on_device else np.empty(shape, dtype)
        return PreparedCall(None, lambda: out)

    if table_on_device:
        d_table = _as_cupy(table)
        if d_table.dtype != elements:
            d_table = d_table.view(elements)
        if not d_table.flags.c_contiguous:
            raise ValueError("the cupy backend needs a C-contiguous table on the GPU "
                             "(the table is never copied); use numba-cuda or make it contiguous")
    else:
        d_table = cupy.asarray(np.ascontiguousarray(table).view(elements))
    word_bytes = launch.gpu_word_bytes(dim, dtype.itemsize, d_table.data.ptr, MAX_WORD_BYTES)
    d_ids = cupy.ascontiguousarray(_as_cupy(ids)) if ids_on_device else cupy.asarray(np.ascontiguousarray(ids))
    host_out = None
    if out is None:
        d_out = cupy.empty(shape, elements)
        if not table_on_device:
            host_out = np.empty(shape, dtype)
    elif device_of(out) == "cuda":
        d_out = _as_cupy(out)
        if d_out.dtype != elements:
            d_out = d_out.view(elements)
    else:
        host_out = out
        d_out = cupy.asarray(out.view(elements))  # keeps what the caller put there (poison)
    bad_position = cupy.empty(1, dtype=cupy.int64)
    bad_position.data.memset_async(NO_BAD_POSITION_BYTE, 8)  # NO_BAD_POSITION: the kernel atomically lowers it

    config = launch.gpu_launch(axis, batch, length, dim, dtype.itemsize, word_bytes)
    name = kernel_name(axis, fmt, config, d_ids.dtype)
    kernel = _kernel(cupy.cuda.Device().id, fmt, d_ids.dtype.str, name)
    args = (d_table, d_ids, np.int64(batch), np.int64(length), np.int64(vocab),
            np.int64(config.words_per_row), np.int32(bool(mask_zero)), d_out, bad_position)

    def id_at(row, col):  # only on the error path: a device id costs a copy back
        return int(d_ids[row, col].get()) if ids_on_device else int(ids[row, col])

    def finish():
        error_at = gpu_staging.dense_error_at(id_at, length, vocab)
        if bounds_check is BoundsCheck.DEFERRED:
            gpu_staging.defer(_pending_check(bad_position, batch * length, error_at))
        else:  # the one value read back; waits for the kernel
            gpu_staging.raise_if_bad(int(bad_position.get()[0]), batch * length, error_at)
        if host_out is not None:
            d_out.get(out=host_out.view(elements))
            return host_out
        return out if out is not None else d_out

    return PreparedCall(lambda: kernel(config.grid, (config.block,), args), finish)


def _new_host_slot():
    import cupyx
    return cupyx.empty_pinned(1, dtype=np.int64)  # an asynchronous copy needs page-locked memory


_host_slots = gpu_staging.HostSlots(_new_host_slot)


def _pending_check(flag, positions, error_at) -> gpu_staging.PendingCheck:
    """The error flag's copy to a pinned host slot, queued after the kernel on the current
    stream, with an event after it: nothing waits here."""
    import cupy
    slot = _host_slots.take()
    stream = cupy.cuda.get_current_stream()
    flag.get(stream=stream, out=slot, blocking=False)
    event = cupy.cuda.Event(block=False, disable_timing=True)
    event.record(stream)
    return gpu_staging.PendingCheck(slot, lambda: event.done, event.synchronize, positions, error_at,
                                    release=lambda: _host_slots.give_back(slot))


def embedding_mean(table, ids, axis, mask_zero, out=None, bounds_check=BoundsCheck.RAISE):
    """table [V][D] float32/float16/bfloat16, ids [B][L] int32/int64 -> out [B][D] or [B][L].

    A CuPy array on the table's device when the table is on a GPU (bfloat16 results
    as uint16 bits: CuPy has no bfloat16), NumPy when it is on the host. ``out``:
    an optional output (host or device) of the table's dtype, written in place.
    """
    gpu_staging.raise_finished()
    call = prepare(table, ids, axis, mask_zero, out, bounds_check)
    call.launch()
    return call.finish()


def prepare_bags(table, values, offsets, weights, pooling, out=None,
                 bounds_check=BoundsCheck.RAISE) -> PreparedCall:
    """The CSR bags kernel staged like ``prepare``: table [V][D], values [N] int32/int64,
    offsets [B + 1], weights None or [N] float32 (host or device); out None or [B][D]."""
    import cupy

    table_on_device = device_of(table) == "cuda"
    batch = offsets.shape[0] - 1
    vocab, dim = table.shape
    dtype = np.dtype(table.dtype)
    elements = _element_dtype(dtype)
    if batch == 0:
        if out is None:
            out = cupy.empty((0, dim), elements) if table_on_device else np.empty((0, dim), dtype)
        return PreparedCall(None, lambda: out)
    if table_on_device:
        d_table = _as_cupy(table)
        if d_table.dtype != elements:
            d_table = d_table.view(elements)
        if not d_table.flags.c_contiguous:
            raise ValueError("the cupy backend needs a C-contiguous table on the GPU "
                             "(the table is never copied); use numba-cuda or make it contiguous")
    else:
        d_table = cupy.asarray(np.ascontiguousarray(table).view(elements))

    def on_device(array, dtype=None):  # host arrays are copied over (small: ids, offsets, weights)
        if device_of(array) == "cuda":
            array = cupy.ascontiguousarray(_as_cupy(array))
            return array if dtype is None or array.dtype == dtype else array.astype(dtype)
        return cupy.asarray(np.ascontiguousarray(array, dtype=dtype))
    d_values = on_device(values)
    d_offsets = on_device(offsets, np.int64)
    weighted = weights is not None
    d_weights = on_device(weights, np.float32) if weighted else cupy.empty(1, np.float32)
    host_out = None
    if out is None:
        d_out = cupy.empty((batch, dim), elements)
        if not table_on_device:
            host_out = np.empty((batch, dim), dtype)
    elif device_of(out) == "cuda":
        d_out = _as_cupy(out)
        if d_out.dtype != elements:
            d_out = d_out.view(elements)
    else:
        host_out = out
        d_out = cupy.asarray(out.view(elements))  # keeps what the caller put there (poison)
    bad_position = cupy.empty(1, dtype=cupy.int64)
    bad_position.data.memset_async(NO_BAD_POSITION_BYTE, 8)
    word_bytes = launch.gpu_word_bytes(dim, dtype.itemsize, d_table.data.ptr, MAX_WORD_BYTES)
    config = launch.gpu_launch(Axis.SEQUENCE, batch, 1, dim, dtype.itemsize, word_bytes)
    name = bag_kernel_name(table_format(dtype), config, pooling, weighted, d_values.dtype)
    kernel = _kernel(cupy.cuda.Device().id, table_format(dtype), d_values.dtype.str, name)
    args = (d_table, d_values, d_offsets, d_weights, np.int64(batch), np.int64(vocab),
            np.int64(config.words_per_row), d_out, bad_position)
    positions = int(values.shape[0])

    def error_at(position):  # only on the error path
        return bag_out_of_range_error(d_values.get(), d_offsets.get(), position, vocab)

    def finish():
        if bounds_check is BoundsCheck.DEFERRED:
            gpu_staging.defer(_pending_check(bad_position, positions, error_at))
        else:
            gpu_staging.raise_if_bad(int(bad_position.get()[0]), positions, error_at)
        if host_out is not None:
            d_out.get(out=host_out.view(elements))
            return host_out
        return out if out is not None else d_out

    return PreparedCall(lambda: kernel(config.grid, (config.block,), args), finish)


def embedding_bag(table, values, offsets, weights, pooling, out=None, bounds_check=BoundsCheck.RAISE):
    """CSR bags: table [V][D], values [N], offsets [B + 1], weights None or [N] float32 -> [B][D]."""
    gpu_staging.raise_finished()
    call = prepare_bags(table, values, offsets, weights, pooling, out, bounds_check)
    call.launch()
    return call.finish()


def all_bag_kernel_names(max_dim: int = 4096, id_dtypes=(np.dtype(np.int64),), variants=None) -> list[str]:
    """Every CSR bags instantiation a launch with D <= max_dim can use: the axis-1 launch
    shapes of ``all_kernel_names`` x ``variants``, (pooling, weighted) pairs (default: all six)."""
    from ..spec import Pooling
    variants = variants or [(pooling, weighted) for pooling in Pooling for weighted in (False, True)]
    names = set()
    for dtype, fmt in ((np.dtype(np.float32), 0), (np.dtype(np.float16), 1), (BFLOAT16, 2)):
        item = dtype.itemsize
        for dim in range(1, max_dim + 1):
            word = item
            while word <= MAX_WORD_BYTES and (dim * item) % word == 0:
                config = launch.gpu_launch(Axis.SEQUENCE, 1, 1, dim, item, word)
                for pooling, weighted in variants:
                    for id_dtype in id_dtypes:
                        names.add(bag_kernel_name(fmt, config, pooling, weighted, id_dtype))
                word *= 2
    return sorted(names)


def all_kernel_names(max_dim: int = 4096, id_dtypes=tuple(ID_TYPE_NAMES)) -> list[str]:
    """Every instantiation a launch with D <= max_dim and these id dtypes can use, for compile checks.

    Covers all three formats, both axes and every word width an address
    alignment can force (from one element up to MAX_WORD_BYTES).
    """
    names = set()
    for dtype, fmt in ((np.dtype(np.float32), 0), (np.dtype(np.float16), 1), (BFLOAT16, 2)):
        item = dtype.itemsize
        for dim in range(1, max_dim + 1):
            word = item
            while word <= MAX_WORD_BYTES and (dim * item) % word == 0:
                for axis in (Axis.SEQUENCE, Axis.EMBEDDING):
                    config = launch.gpu_launch(axis, 1, 1, dim, item, word)
                    for id_dtype in id_dtypes:
                        names.add(kernel_name(axis, fmt, config, id_dtype))
                word *= 2
    return sorted(names)
