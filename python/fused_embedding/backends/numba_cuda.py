"""The "numba-cuda" backend: Numba CUDA kernels (``kernels/cuda.py``) on GPU arrays.

Device inputs (anything with ``__cuda_array_interface__``, or a CUDA DLPack
array CuPy can import) are used in place and the result stays on the device.
Host (NumPy) inputs are copied to the device and the result copied back: the way
to validate the kernels, and the way they run under the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``). A table on the GPU with ids on the host copies the
ids only, never the table.

On a GPU the kernels are compiled by Numba and launched directly (``_direct_launch``:
arguments read from the CUDA array interface, packed as Numba packs them, launched
through cuda.core as Numba does); under the simulator, by Numba's dispatcher.
"""
from __future__ import annotations

import functools

import numpy as np

from .. import launch
from ..semantics import BFLOAT16, FORMAT_BFLOAT16, FORMAT_FLOAT16, FORMAT_FLOAT32, Axis, output_shape, table_format
from ..spec import BoundsCheck
from . import (NO_BAD_POSITION, NO_BAD_POSITION_BYTE, PreparedCall, bag_out_of_range_error, cuda_simulated,
               device_of, gpu_staging)

DEVICE = "cuda"

# Widest load the Numba kernels issue: a uint64 (two float32, four float16 or
# bfloat16; each float16 then widened by one hardware conversion, kernels/cuda.py).
MAX_WORD_BYTES = {FORMAT_FLOAT32: 8, FORMAT_FLOAT16: 8, FORMAT_BFLOAT16: 8}
# CUDA 13 supports compute capability 7.5 (Turing) and newer.
MIN_COMPUTE_CAPABILITY = (7, 5)


def unavailable_reason() -> str | None:
    from .. import kernels  # noqa: F401  (its NumPy 2.5 shim must precede numba-cuda's first compile)
    try:
        import numba_cuda  # noqa: F401  (the maintained CUDA target, not numba's built-in one)
        from numba import cuda
    except ImportError as exc:
        return f"numba-cuda is not installed ({exc}); pip install numba-cuda"
    if cuda_simulated():
        return None
    if not cuda.is_available():
        return "no usable CUDA GPU or driver (numba.cuda.is_available() is False)"
    capability = cuda.get_current_device().compute_capability
    if tuple(capability) < MIN_COMPUTE_CAPABILITY:
        return (f"the GPU has compute capability {capability[0]}.{capability[1]}, "
                f"below the {MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]} CUDA 13 supports")
    return None


def memory_limit_bytes() -> int:
    if cuda_simulated():
        from ..memory import host_memory_limit_bytes
        return host_memory_limit_bytes()
    from numba import cuda
    free, _ = cuda.current_context().get_memory_info()
    return int(free)


def _on_device(array) -> bool:
    return device_of(array) == "cuda"


def _c_strides(shape, itemsize) -> tuple:
    strides, step = [], itemsize
    for extent in reversed(shape):
        strides.append(step)
        step *= extent
    return tuple(reversed(strides))


class DeviceBuffer:
    """A GPU array as a kernel argument: address, shape, strides (bytes), element dtype.

    Read straight from ``__cuda_array_interface__`` (or a CUDA DLPack array through
    CuPy). Making Numba's own device array for every input, and letting Numba's
    dispatcher type and unpack each argument again at the launch, cost 0.26 ms of
    host time per call on an H200: about as much as the kernel at the main shape
    (benchmarks/NOTES.md, GPU run 5). ``owner`` keeps the memory alive.
    """

    __slots__ = ("pointer", "shape", "strides", "dtype", "owner", "c_contiguous")

    def __init__(self, pointer, shape, strides, dtype, owner, c_contiguous):
        self.pointer, self.shape, self.strides, self.dtype, self.owner = pointer, shape, strides, dtype, owner
        self.c_contiguous = c_contiguous

    @classmethod
    def of(cls, array) -> "DeviceBuffer":
        interface = getattr(array, "__cuda_array_interface__", None)
        if interface is None:
            try:
                import cupy
            except ImportError as exc:
                raise TypeError(f"a {type(array).__name__} on the GPU without __cuda_array_interface__ "
                                f"needs CuPy to be imported through DLPack ({exc})") from exc
            array = cupy.from_dlpack(array)
            interface = array.__cuda_array_interface__
        dtype = np.dtype(interface["typestr"])
        shape = tuple(interface["shape"])
        c_strides = _c_strides(shape, dtype.itemsize)
        strides = interface.get("strides")
        strides = c_strides if strides is None else tuple(strides)
        return cls(interface["data"][0], shape, strides, dtype, array, strides == c_strides)

    def view(self, dtype) -> "DeviceBuffer":
        """The same bytes as elements of ``dtype``; the last axis (contiguous) is rescaled."""
        dtype = np.dtype(dtype)
        if dtype == self.dtype:
            return self
        if self.strides[-1] != self.dtype.itemsize:
            raise ValueError(f"a view as {dtype} needs a contiguous last axis, got strides {self.strides}")
        last = self.shape[-1] * self.dtype.itemsize // dtype.itemsize
        # Rows keep their strides and the last axis stays contiguous: so does C-contiguity.
        return DeviceBuffer(self.pointer, self.shape[:-1] + (last,), self.strides[:-1] + (dtype.itemsize,),
                            dtype, self.owner, self.c_contiguous)

    @property
    def __cuda_array_interface__(self):
        # No strides for a C-contiguous array: Numba then types it with layout "C" (its
        # strides compiled in), as it types its own contiguous arrays.
        return {"shape": self.shape, "strides": None if self.c_contiguous else self.strides,
                "typestr": self.dtype.str, "data": (self.pointer, False), "version": 3}

    def kernel_arguments(self) -> tuple:
        """The array as Numba passes it to a kernel: its array model's fields in order
        (meminfo, parent, nitems, itemsize, data, shape..., strides...), the same
        values Numba's dispatcher passes; tests/test_gpu_simulator.py checks the model."""
        size = 1
        for extent in self.shape:
            size *= extent
        return (0, 0, size, self.dtype.itemsize, self.pointer, *self.shape, *self.strides)


def element_dtype(dtype) -> np.dtype:
    """The dtype the kernels see for a table/output element: float32, float16, or bfloat16's bits."""
    dtype = np.dtype(dtype)
    return np.dtype(np.uint16) if dtype == BFLOAT16 else dtype


def word_dtype(fmt: int, word_bytes: int, item_bytes: int) -> np.dtype:
    """The dtype of one load: single float32s and float16s as themselves, else unsigned bits."""
    if word_bytes == item_bytes:
        return np.dtype({FORMAT_FLOAT32: np.float32, FORMAT_FLOAT16: np.float16, FORMAT_BFLOAT16: np.uint16}[fmt])
    return np.dtype({4: np.uint32, 8: np.uint64}[word_bytes])


# True: kernels are launched by _direct_launch. False: by Numba's dispatcher
# (``kernel[grid, block](...)``), which types and unpacks every argument again on
# each call; kept to compare against (benchmarks/gpu_check.py) and to fall back on.
DIRECT_LAUNCH = True

# (kernel dispatcher, argument type keys) -> the kernel compiled for those types.
_compiled = {}


def _type_key(argument):
    if isinstance(argument, DeviceBuffer):
        return argument.dtype.str, len(argument.shape), "C" if argument.c_contiguous else "A"
    return type(argument)


def _numba_type(key):
    """The Numba type of an argument with this _type_key: an array typed with layout "C"
    (strides compiled in) when C-contiguous, else "A" (strides read at run time)."""
    from numba.cuda import types
    from numba.cuda.np import numpy_support
    if key is bool:
        return types.boolean
    dtype, ndim, layout = key
    return types.Array(numpy_support.from_dtype(np.dtype(dtype)), ndim, layout)


@functools.lru_cache(maxsize=256)  # grids vary with B: bounded
def _launch_config(grid, block):
    from cuda.core import LaunchConfig
    return LaunchConfig(grid=grid, block=block)


@functools.lru_cache(maxsize=None)
def _default_stream():
    """The stream Numba's own launch uses for stream 0: the legacy default stream."""
    from cuda.core import Stream
    return Stream.from_handle(0)


def _direct_launch(dispatcher, config, arguments):
    """A callable that launches ``dispatcher``'s kernel on Numba's default stream
    (the legacy stream, as ``kernel[grid, block](...)`` does), with the arguments
    flattened here. The kernel is compiled once per distinct set of argument types."""
    from cuda.core import launch as cuda_launch  # not to be confused with our launch heuristics
    key = (dispatcher, tuple(_type_key(a) for a in arguments))
    kernel = _compiled.get(key)
    if kernel is None:
        kernel = _compiled[key] = dispatcher.compile(tuple(_numba_type(k) for k in key[1]))
    flat = []
    for argument in arguments:
        if isinstance(argument, DeviceBuffer):
            flat.extend(argument.kernel_arguments())
        else:
            flat.append(argument)
    launch_config = _launch_config(config.grid, config.block)
    stream = _default_stream()

    def run():
        # get_cufunc() also makes Numba's context current on the calling thread.
        cuda_launch(stream, launch_config, kernel.library.get_cufunc().kernel, *flat)
    # ``flat`` holds bare addresses: the buffers must live as long as the call can run,
    # or memory only they own (a host table's device copy) is freed under the kernel.
    run.arguments = arguments
    return run


def prepare(table, ids, axis, mask_zero, out=None, bounds_check=BoundsCheck.RAISE) -> PreparedCall:
    """Device views/copies of the inputs and output, the kernel and its launch shape.

    table [V][D] float32/float16/bfloat16, ids [B][L] int32/int64 (host or device);
    out: None, or a host/device array of the output's shape and the table's dtype.
    On a GPU the arguments are DeviceBuffers launched directly; under the CUDA
    simulator (host inputs only) they are Numba's arrays, launched by its dispatcher.
    bounds_check: RAISE reads the error flag in ``finish()``; DEFERRED queues its
    asynchronous copy (backends/gpu_staging.py).
    """
    from ..kernels import cuda as kernels
    table_on_device = _on_device(table)
    ids_on_device = _on_device(ids)
    batch, length = ids.shape
    vocab, dim = table.shape
    dtype = np.dtype(table.dtype)
    fmt = table_format(dtype)
    shape = output_shape(axis, batch, length, dim)
    elements = element_dtype(dtype)
    if gpu_staging.nothing_to_write(axis, batch, length):
        if out is None:
            out = np.empty(shape, dtype) if not table_on_device else \
                _device_result(_device_empty(shape, elements), dtype, table)
        return PreparedCall(None, lambda: out)

    staged = _Staged(table, shape, out)
    d_ids = DeviceBuffer.of(ids) if ids_on_device else staged.to_device(ids)
    d_words, word, word_bytes, d_out = staged.d_words, staged.word, staged.word_bytes, staged.d_out
    bad_position = _error_flag()  # NO_BAD_POSITION: the kernel atomically lowers it

    config = launch.gpu_launch(axis, batch, length, dim, dtype.itemsize, word_bytes)
    if axis is Axis.SEQUENCE:
        kernel = kernels.make_gather_mean_sequence(fmt, word.str, config.lanes, config.words_per_lane,
                                                   config.rows_in_flight)
    else:
        kernel = kernels.make_gather_mean_embedding(fmt, word.str, config.lanes)

    def id_at(row, col):  # only on the error path: a device id costs a copy back
        return _to_host(d_ids)[row, col] if ids_on_device else ids[row, col]

    def finish():
        error_at = gpu_staging.dense_error_at(id_at, length, vocab)
        if bounds_check is BoundsCheck.DEFERRED:
            gpu_staging.defer(_pending_check(bad_position, batch * length, error_at))
        else:  # the one value read back; waits for the kernel
            gpu_staging.raise_if_bad(int(_to_host(bad_position)[0]), batch * length, error_at)
        return staged.result()

    args = (d_words, d_ids, bool(mask_zero), d_out, bad_position)
    return PreparedCall(_launcher(kernel, config, args), finish)


class _Staged:
    """A call's table and output on the device: the table as words (a view of a device
    table, or a copy of a host one), the output (the caller's, a device copy of a host
    one, which keeps what the caller put there, or a new one), and ``result()``, which
    copies a host output back and gives what the caller gets."""

    def __init__(self, table, shape, out):
        from numba import cuda
        self.table, self.out, self._cuda = table, out, cuda
        dtype = self.dtype = np.dtype(table.dtype)
        self.table_on_device = _on_device(table)
        fmt, dim = table_format(dtype), table.shape[1]
        self.elements = elements = element_dtype(dtype)
        # Table -> words: a view of the same bytes, loaded word_bytes at a time.
        if self.table_on_device:
            d_table = DeviceBuffer.of(table).view(elements)
            contiguous = d_table.c_contiguous
            address = d_table.pointer if contiguous else 1
        else:
            host_table = np.ascontiguousarray(table).view(elements)
            contiguous, address = True, 0  # a fresh device allocation is 256-byte aligned
        self.word_bytes = launch.gpu_word_bytes(dim, dtype.itemsize, address, MAX_WORD_BYTES[fmt]) \
            if contiguous else dtype.itemsize
        self.word = word_dtype(fmt, self.word_bytes, dtype.itemsize)
        self.d_words = d_table.view(self.word) if self.table_on_device else \
            self.to_device(host_table.view(self.word))
        self.host_out = None
        if out is None:
            self.d_out = _device_empty(shape, elements)
            if not self.table_on_device:
                self.host_out = np.empty(shape, dtype)
        elif _on_device(out):
            self.d_out = DeviceBuffer.of(out).view(elements)
        else:
            self.host_out = out
            self.d_out = self.to_device(out.view(elements))

    def to_device(self, host):
        return _as_argument(self._cuda.to_device(np.ascontiguousarray(host)))

    def result(self):
        if self.host_out is not None:
            self.host_out.view(self.elements)[...] = _to_host(self.d_out)
            return self.host_out
        return self.out if self.out is not None else _device_result(self.d_out, self.dtype, self.table)


def _launcher(kernel, config, args):
    """The launch: Numba's dispatcher under the simulator (or when DIRECT_LAUNCH is off), else direct."""
    if cuda_simulated() or not DIRECT_LAUNCH:
        return lambda: kernel[config.grid, config.block](*args)
    return _direct_launch(kernel, config, args)


def prepare_bags(table, values, offsets, weights, pooling, out=None,
                 bounds_check=BoundsCheck.RAISE) -> PreparedCall:
    """The CSR bags kernel (kernels/cuda_bags.py) staged like ``prepare``: table [V][D],
    values [N] int32/int64, offsets [B + 1] int64, weights None or [N] float32 (host or
    device), pooling a spec.Pooling; out None or [B][D] of the table's dtype."""
    from ..kernels import cuda_bags
    batch = offsets.shape[0] - 1
    vocab, dim = table.shape
    dtype = np.dtype(table.dtype)
    shape = (batch, dim)
    if batch == 0:
        if out is None:
            out = np.empty(shape, dtype) if not _on_device(table) else \
                _device_result(_device_empty(shape, element_dtype(dtype)), dtype, table)
        return PreparedCall(None, lambda: out)
    staged = _Staged(table, shape, out)
    on_device = [_on_device(a) for a in (values, offsets)]
    d_values = DeviceBuffer.of(values) if on_device[0] else staged.to_device(values)
    d_offsets = DeviceBuffer.of(offsets) if on_device[1] else staged.to_device(np.asarray(offsets, np.int64))
    weighted = weights is not None
    d_weights = (DeviceBuffer.of(weights) if _on_device(weights) else staged.to_device(weights)) if weighted \
        else staged.to_device(np.zeros(1, np.float32))
    bad_position = _error_flag()
    config = launch.gpu_launch(Axis.SEQUENCE, batch, 1, dim, dtype.itemsize, staged.word_bytes)
    kernel = cuda_bags.make_gather_bags(table_format(dtype), staged.word.str, config.lanes,
                                        config.words_per_lane, config.rows_in_flight,
                                        pooling.kernel_code, weighted)
    positions = int(values.shape[0])

    def error_at(position):  # only on the error path: device ids cost a copy back
        host_values = _to_host(d_values) if on_device[0] else values
        host_offsets = _to_host(d_offsets) if on_device[1] else offsets
        return bag_out_of_range_error(host_values, host_offsets, position, vocab)

    def finish():
        if bounds_check is BoundsCheck.DEFERRED:
            gpu_staging.defer(_pending_check(bad_position, positions, error_at))
        else:
            gpu_staging.raise_if_bad(int(_to_host(bad_position)[0]), positions, error_at)
        return staged.result()

    args = (staged.d_words, d_values, d_offsets, d_weights, staged.d_out, bad_position)
    return PreparedCall(_launcher(kernel, config, args), finish)


def embedding_bag(table, values, offsets, weights, pooling, out=None, bounds_check=BoundsCheck.RAISE):
    """CSR bags: table [V][D], values [N], offsets [B + 1], weights None or [N] float32 -> [B][D]."""
    gpu_staging.raise_finished()
    call = prepare_bags(table, values, offsets, weights, pooling, out, bounds_check)
    call.launch()
    return call.finish()


def embedding_mean(table, ids, axis, mask_zero, out=None, bounds_check=BoundsCheck.RAISE):
    """table [V][D] float32/float16/bfloat16, ids [B][L] int32/int64 -> out [B][D] or [B][L].

    On the device when the table is; NumPy when it is on the host. ``out``: an
    optional output (host or device) of the table's dtype, written in place.
    First raises the bad id of any earlier deferred call that has finished.
    """
    gpu_staging.raise_finished()
    call = prepare(table, ids, axis, mask_zero, out, bounds_check)
    call.launch()
    return call.finish()


def _pooled_cupy():
    """CuPy, whose memory pool the GPU buffers come from; None under the simulator or without CuPy.

    Numba allocates with cudaMalloc and frees with cudaFree, which waits for the
    device: measured on an H200, the whole call took 1.43 ms around a 0.29 ms
    kernel (benchmarks/NOTES.md, GPU run 2). A pooled block is reused without either.
    """
    if cuda_simulated():
        return None
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def _as_argument(array):
    """A Numba device array as the launch takes it: itself under the simulator (Numba's
    dispatcher launches there), a DeviceBuffer on a GPU."""
    return array if cuda_simulated() else DeviceBuffer.of(array)


def _device_empty(shape, dtype):
    """An uninitialised device array, from CuPy's pool where there is one (_pooled_cupy)."""
    from numba import cuda
    cupy = _pooled_cupy()
    if cupy is None:
        return _as_argument(cuda.device_array(shape, dtype))
    return DeviceBuffer.of(cupy.empty(shape, dtype))


def _error_flag():
    """A one-element int64 device array holding NO_BAD_POSITION.

    Numba's ``array[:] = value`` launches a Numba assignment kernel through its
    dispatcher (the largest part of the 0.44 ms the call spent preparing on an
    H200, benchmarks/NOTES.md); with CuPy it is one asynchronous memset.
    """
    from numba import cuda
    cupy = _pooled_cupy()
    if cupy is None:
        return _as_argument(cuda.to_device(np.array([NO_BAD_POSITION], dtype=np.int64)))
    flag = cupy.empty(1, dtype=np.int64)
    flag.data.memset_async(NO_BAD_POSITION_BYTE, 8)
    return DeviceBuffer.of(flag)


def _new_host_slot():
    from numba import cuda
    return cuda.pinned_array(1, dtype=np.int64)  # an asynchronous copy needs page-locked memory


_host_slots = gpu_staging.HostSlots(_new_host_slot)


def _pending_check(flag, positions, error_at) -> gpu_staging.PendingCheck:
    """The error flag's copy to a pinned host slot, queued after the kernel on the same
    (legacy default) stream, with an event after it: nothing waits here."""
    from numba import cuda
    slot = _host_slots.take()
    owner = flag.owner if isinstance(flag, DeviceBuffer) else flag
    if hasattr(owner, "get") and not hasattr(owner, "copy_to_host"):  # CuPy's pool
        import cupy
        stream = cupy.cuda.Stream.null
        owner.get(stream=stream, out=slot, blocking=False)
        event = cupy.cuda.Event(block=False, disable_timing=True)
        event.record(stream)
        done = lambda: event.done  # noqa: E731
    else:
        stream = cuda.default_stream()
        owner.copy_to_host(slot, stream=stream)
        simulated = cuda_simulated()
        # The simulator runs everything synchronously; its events take no arguments and
        # have no query().
        event = cuda.event() if simulated else cuda.event(timing=False)
        event.record(stream)
        done = (lambda: True) if simulated else event.query
    return gpu_staging.PendingCheck(slot, done, event.synchronize, positions, error_at,
                                    release=lambda: _host_slots.give_back(slot))


def _to_host(array) -> np.ndarray:
    """A device array's contents as NumPy (waits for the work queued before it)."""
    if not isinstance(array, DeviceBuffer):  # a Numba (simulator) array
        return array.copy_to_host()
    owner = array.owner
    if hasattr(owner, "get"):  # CuPy
        return owner.get()
    if not hasattr(owner, "copy_to_host"):  # any other CUDA array interface object
        from numba import cuda
        owner = cuda.as_cuda_array(owner)
    return owner.copy_to_host()


def _device_result(d_out, dtype, table):
    """The device output as the caller's kind of array: CuPy for CuPy tables, else Numba's."""
    from numba import cuda
    cupy = _pooled_cupy()  # under the simulator no table is a CuPy array
    owner = d_out.owner if isinstance(d_out, DeviceBuffer) else d_out
    if cupy is not None and isinstance(table, cupy.ndarray) and np.dtype(dtype) != BFLOAT16:
        return cupy.asarray(owner)
    result = owner if hasattr(owner, "copy_to_host") else cuda.as_cuda_array(owner)
    if np.dtype(dtype) == BFLOAT16:
        return result.view(BFLOAT16)
    return result
