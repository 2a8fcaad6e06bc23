"""The benchmark providers: every way of computing ``mean(table[ids], axis)`` that we time.

One place for them: the ``fused-embedding bench`` command and the pytest-benchmark
files in ``benchmarks/`` both take their competitors from here, so the two always
time the same code.

A provider turns host inputs (a NumPy table [V][D] and id sets [B][L]) into its
own framework's tensors once, outside the timed region, and returns a runner:
``runner(k)`` computes the op on id set ``k`` and returns only when the result
exists (GPU work is synchronised). Optional frameworks (TensorFlow, PyTorch,
CuPy, the TF op) are imported lazily; a provider that can't run here says why
(``unavailable_reason``) and is skipped, never a crash.

Timing rotates among several id sets, fresh per measurement, so the gathered
rows come from DRAM as in real batches: the same ids over and over would time
the last-level cache (B=1024, L=64, D=128 fp32 touches 32 MB of rows).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os
import time
from typing import Any, Callable

import numpy as np

from . import backends
from .bytes_model import bag_bytes, copy_bytes, fused_bytes, gb_per_s
from .memory import empty_aligned
from .reference import embedding_mean_reference
from .semantics import BFLOAT16, Axis
from .validation import compare, tolerance

# Rows gathered per measurement, over all its id sets, well above the last-level
# caches (32 MB L3 here, 50-60 MB L2 on an H100/H200), so rows come from DRAM.
ROTATION_TARGET_BYTES = 256 * 2**20
MIN_ID_SETS, MAX_ID_SETS = 8, 64

# The copy baseline's buffer: far larger than any cache.
COPY_BYTES = 256 * 2**20

DTYPE_NAMES = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16), "bf16": BFLOAT16}


def dtype_name(dtype) -> str:
    return {v: k for k, v in DTYPE_NAMES.items()}[np.dtype(dtype)]


# ---------------------------------------------------------------------------
# Inputs


@dataclasses.dataclass
class Inputs:
    """One benchmark case on the host: the table, the id sets, the axis.

    table: (V, D) float32 / float16 / bfloat16. id_sets: list of (B, L) int32.
    cache: conversions of ``table`` made by providers (a TF constant, a Keras layer,
    a GPU copy), shared by every Inputs built on the same table so a 512 MB table
    is converted once per provider, not once per case.
    """

    table: np.ndarray
    id_sets: list
    axis: Axis
    cache: dict = dataclasses.field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.id_sets[0].shape[0]

    @property
    def length(self) -> int:
        return self.id_sets[0].shape[1]


def id_set_count(batch: int, length: int, dim: int, table_dtype) -> int:
    """How many id sets to rotate among so the rows gathered exceed ROTATION_TARGET_BYTES."""
    gathered = max(1, batch * length * dim * np.dtype(table_dtype).itemsize)
    return int(min(MAX_ID_SETS, max(MIN_ID_SETS, math.ceil(ROTATION_TARGET_BYTES / gathered))))


def random_id_sets(rng, vocab: int, batch: int, length: int, count: int) -> list:
    """``count`` fresh (B, L) int32 arrays of uniform ids in [0, V)."""
    return [rng.integers(0, vocab, size=(batch, length), dtype=np.int32) for _ in range(count)]


def random_table(rng, vocab: int, dim: int, dtype) -> np.ndarray:
    """A (V, D) table of uniform values in [-1, 1) in ``dtype``; every page written, none shared.

    Its rows start on a 64-byte boundary, as TensorFlow's tables do (NumPy's own
    start 16 bytes into a line, which costs every row-gathering provider alike
    an extra line per row; fused_embedding.memory).
    """
    values = rng.random((vocab, dim), dtype=np.float32)
    values -= 0.5
    values *= 2.0
    table = empty_aligned((vocab, dim), dtype)
    np.copyto(table, values, casting="unsafe")
    return table


# ---------------------------------------------------------------------------
# Providers


@dataclasses.dataclass(frozen=True)
class Provider:
    """One way of computing the op.

    name: short id used in tables, JSON and pytest-benchmark ids.
    device: "cpu" or "gpu": where its table lives.
    description: what it runs, for the terminal and RESULTS.md.
    exact: True for this package's kernels (validated with the reference
      tolerances); False for other frameworks' ops, which may pool float16 and
      bfloat16 in that dtype (validated with the Keras tolerances).
    probe: () -> None when it can run here, else why not.
    supports: (axis, table dtype) -> None, or why this case has no such op.
    prepare: (Inputs) -> runner; runner(k) -> result for id set k, finished.
    """

    name: str
    device: str
    description: str
    exact: bool
    probe: Callable[[], str | None]
    supports: Callable[[Axis, np.dtype], str | None]
    prepare: Callable[[Inputs], Callable[[int], Any]]

    def unavailable_reason(self) -> str | None:
        return _probe_once(self.name, self.probe)


_probes: dict[str, str | None] = {}


def _probe_once(name, probe) -> str | None:
    if name not in _probes:
        try:
            _probes[name] = probe()
        except Exception as exc:  # an optional framework that is there but broken
            _probes[name] = f"{type(exc).__name__}: {exc}"
    return _probes[name]


def _any_case(axis, dtype):
    return None


def _import_reason(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return f"{module} is not installed ({exc})"
    return None


# --- framework helpers (lazy imports) ---------------------------------------

def _tf():
    import tensorflow as tf
    return tf


def _tf_probe() -> str | None:
    return _import_reason("tensorflow")


def _tf_gpu_probe() -> str | None:
    reason = _tf_probe()
    if reason:
        return reason
    return None if _tf().config.list_physical_devices("GPU") else "TensorFlow sees no GPU"


def _tf_device(device: str) -> str:
    return "/GPU:0" if device == "gpu" else "/CPU:0"


def _tf_table(inputs: Inputs, device: str):
    """The table as a TF tensor on ``device`` (made once per table)."""
    key = ("tf-table", device)
    if key not in inputs.cache:
        tf = _tf()
        with tf.device(_tf_device(device)):
            inputs.cache[key] = tf.identity(tf.constant(inputs.table))
    return inputs.cache[key]


def _tf_ids(inputs: Inputs, device: str):
    tf = _tf()
    with tf.device(_tf_device(device)):
        return [tf.identity(tf.constant(ids)) for ids in inputs.id_sets]


def _tf_finish(result, device: str):
    """Wait for a TF result: eager CPU ops have run on return; a GPU result is read back (small)."""
    if device == "gpu":
        tf = _tf()
        with tf.device("/CPU:0"):
            np.asarray(tf.identity(result))  # the (small) result read back waits for the GPU
        return result
    np.asarray(result)  # zero-copy on the host; forces any pending work
    return result


def _torch():
    import torch
    return torch


def _torch_probe() -> str | None:
    return _import_reason("torch")


def _torch_gpu_probe() -> str | None:
    reason = _torch_probe()
    if reason:
        return reason
    return None if _torch().cuda.is_available() else "PyTorch sees no CUDA device"


def _torch_table(inputs: Inputs, device: str):
    """The table as a torch tensor (zero-copy on the host; bfloat16 through its bits)."""
    key = ("torch-table", device)
    if key not in inputs.cache:
        torch = _torch()
        table = inputs.table
        if table.dtype == BFLOAT16:
            tensor = torch.from_numpy(table.view(np.int16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(table)
        inputs.cache[key] = tensor.to("cuda") if device == "gpu" else tensor
    return inputs.cache[key]


def _torch_to_numpy(tensor) -> np.ndarray:
    torch = _torch()
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(BFLOAT16)
    return tensor.numpy()


def _torch_gpu_sync():
    _torch().cuda.synchronize()


# --- GPU arrays for the fused GPU backends ----------------------------------

def real_gpu_reason() -> str | None:
    """None when a real CUDA GPU is usable for timing; the CUDA simulator does not count."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "only the CUDA simulator is active (NUMBA_ENABLE_CUDASIM=1): nothing to time"
    try:
        from numba import cuda
    except ImportError as exc:
        return f"numba's CUDA target is not importable ({exc})"
    try:
        if not cuda.is_available():
            return "no CUDA GPU or driver found"
    except Exception as exc:
        return f"CUDA probe failed: {type(exc).__name__}: {exc}"
    return None


def _gpu_array(array: np.ndarray):
    """A copy of a host array on the GPU: CuPy if installed, else a Numba device array."""
    bits = array.view(np.uint16) if array.dtype == BFLOAT16 else array
    if _import_reason("cupy") is None:
        import cupy
        device = cupy.asarray(bits)
    else:
        from numba import cuda
        device = cuda.to_device(bits)
    # Neither CuPy nor Numba has bfloat16: carry the bits, labelled as bfloat16.
    return backends.Bfloat16OnDevice(device) if array.dtype == BFLOAT16 else device


def _gpu_to_numpy(result, dtype) -> np.ndarray:
    result = getattr(result, "bits", result)
    if hasattr(result, "get"):
        host = result.get()
    elif hasattr(result, "copy_to_host"):
        host = result.copy_to_host()
    else:
        host = np.asarray(result)
    # bfloat16 comes back as its bits (or a raw 2-byte type): reinterpret, never convert.
    return host.view(dtype) if host.dtype != dtype and host.dtype.itemsize == dtype.itemsize else host


def _gpu_sync():
    from numba import cuda
    cuda.synchronize()


# --- the providers -----------------------------------------------------------

def _fused_backend_provider(name: str) -> Provider:
    device = "gpu" if backends.device_of_backend(name) == "cuda" else "cpu"

    def probe():
        if device == "gpu":
            reason = real_gpu_reason()
            if reason:
                return reason
        return backends.unavailable_reason(name)

    def prepare(inputs: Inputs):
        from .api import embedding_mean
        axis = int(inputs.axis)
        if device == "cpu":
            id_sets, table = inputs.id_sets, inputs.table

            def run(k):
                return embedding_mean(table, id_sets[k], axis=axis, backend=name)
            return run
        key = ("gpu-table",)
        if key not in inputs.cache:
            inputs.cache[key] = _gpu_array(inputs.table)
        table = inputs.cache[key]
        id_sets = [_gpu_array(ids) for ids in inputs.id_sets]

        def run_gpu(k):
            out = embedding_mean(table, id_sets[k], axis=axis, backend=name)
            _gpu_sync()
            return out
        return run_gpu

    return Provider(
        name=f"fused[{name}]", device=device, exact=True,
        description=f"fused_embedding.embedding_mean(backend={name!r})",
        probe=probe, supports=_any_case, prepare=prepare)


def _fused_constant_table_provider() -> Provider:
    """The cpu backend on a frozen table (``fused_embedding.frozen_table``): axis 2 from
    cached row means, as the TF op gets on a constant or a variable it reads in place."""

    def prepare(inputs: Inputs):
        from .api import embedding_mean
        from .row_mean_cache import frozen_table
        key = ("frozen-table",)
        if key not in inputs.cache:
            inputs.cache[key] = frozen_table(inputs.table)
        table, id_sets, axis = inputs.cache[key], inputs.id_sets, int(inputs.axis)

        def run(k):
            return embedding_mean(table, id_sets[k], axis=axis, backend="cpu")
        return run

    def axis_2_only(axis, dtype):
        return None if axis is Axis.EMBEDDING else "on axis 1 the same kernel as fused[cpu]"

    return Provider(
        name="fused[cpu]-const", device="cpu", exact=True,
        description="fused_embedding.embedding_mean(backend='cpu') on fused_embedding.frozen_table(table)",
        probe=lambda: backends.unavailable_reason("cpu"), supports=axis_2_only, prepare=prepare)


def _tf_function(function, *bound):
    """``tf.function(functools.partial(function, *bound))``: each prepared case gets its own,
    traced once (its id sets share a shape and dtype).

    A partial, not a closure, because TF's retracing warning counts traces per Python code
    object, which every closure of one ``def`` or ``lambda`` shares: the bench's one function
    per case, axis and dtype, each traced once, read as one function retraced at every call
    ("5 out of the last 5 calls to <lambda> triggered tf.function retracing"). A partial has
    no code object, so each function is counted alone, and one that did retrace would still
    be reported.
    """
    return _tf().function(functools.partial(function, *bound))


def _fused_tf_op(fe_tf, axis, table, ids):
    return fe_tf.embedding_mean(table, ids, axis=axis)


def _unfused_tf(axis, table, ids):
    tf = _tf()
    return tf.reduce_mean(tf.gather(table, ids), axis=axis)  # writes [B][L][D], reads it back


def _keras_pooled(embedding, pooling, ids):
    return pooling(embedding(ids))


def _tf_sparse_mean(table, sparse_ids):
    return _tf().nn.embedding_lookup_sparse(table, sparse_ids, None, combiner="mean")


def _tf_op_provider() -> Provider:
    """The package's TF op end to end inside tf.function (on the host, its compiled kernel
    for axis 1 and its numpy_function body for axis 2)."""

    def prepare(inputs: Inputs):
        fe_tf = importlib.import_module("fused_embedding.tf")
        axis = int(inputs.axis)
        table = _tf_table(inputs, "cpu")
        id_sets = _tf_ids(inputs, "cpu")
        op = _tf_function(_fused_tf_op, fe_tf, axis)

        def run(k):
            return _tf_finish(op(table, id_sets[k]), "cpu")
        return run

    return Provider(
        name="tf-op", device="cpu", exact=True,
        description="fused_embedding.tf.embedding_mean inside tf.function",
        probe=_fused_tf_probe, supports=_any_case, prepare=prepare)


def _tf_unfused_provider(device: str) -> Provider:
    def prepare(inputs: Inputs):
        tf = _tf()
        axis = int(inputs.axis)
        table = _tf_table(inputs, device)
        id_sets = _tf_ids(inputs, device)
        unfused = _tf_function(_unfused_tf, axis)

        def run(k):
            with tf.device(_tf_device(device)):
                return _tf_finish(unfused(table, id_sets[k]), device)
        return run

    return Provider(
        name="tf-unfused" + ("-gpu" if device == "gpu" else ""), device=device, exact=False,
        description="tf.reduce_mean(tf.gather(table, ids), axis) in tf.function",
        probe=_tf_gpu_probe if device == "gpu" else _tf_probe, supports=_any_case, prepare=prepare)


def _keras_provider() -> Provider:
    def prepare(inputs: Inputs):
        _tf()  # TensorFlow before Keras picks its backend
        import keras
        key = ("keras-embedding",)
        if key not in inputs.cache:
            vocab, dim = inputs.table.shape
            embedding = keras.layers.Embedding(vocab, dim, embeddings_initializer="zeros",
                                               dtype=np.dtype(inputs.table.dtype).name)
            embedding.build((None, None))
            embedding.embeddings.assign(inputs.table)
            inputs.cache[key] = embedding
        embedding = inputs.cache[key]
        data_format = "channels_last" if inputs.axis is Axis.SEQUENCE else "channels_first"
        pooling = keras.layers.GlobalAveragePooling1D(data_format=data_format,
                                                      dtype=np.dtype(inputs.table.dtype).name)
        model = _tf_function(_keras_pooled, embedding, pooling)
        id_sets = _tf_ids(inputs, "cpu")

        def run(k):
            return _tf_finish(model(id_sets[k]), "cpu")
        return run

    def probe():
        return _tf_probe() or _import_reason("keras")

    return Provider(
        name="keras", device="cpu", exact=False,
        description="keras Embedding -> GlobalAveragePooling1D in tf.function",
        probe=probe, supports=_any_case, prepare=prepare)


def _sequence_only(axis, dtype):
    return None if axis is Axis.SEQUENCE else "pools bags (axis 1) only"


def _tf_sparse_provider() -> Provider:
    """TF's own fused lookup: tf.nn.embedding_lookup_sparse(combiner="mean")."""

    def prepare(inputs: Inputs):
        tf = _tf()
        table = _tf_table(inputs, "cpu")
        batch, length = inputs.batch, inputs.length
        # The sparse ids are built outside the timed region, as a model fed
        # sparse features would receive them.
        rows = np.repeat(np.arange(batch, dtype=np.int64), length)
        cols = np.tile(np.arange(length, dtype=np.int64), batch)
        indices = tf.constant(np.stack([rows, cols], axis=1))
        sparse_sets = [tf.SparseTensor(indices, tf.constant(ids.reshape(-1).astype(np.int64)),
                                       (batch, length)) for ids in inputs.id_sets]
        lookup = _tf_function(_tf_sparse_mean)

        def run(k):
            return _tf_finish(lookup(table, sparse_sets[k]), "cpu")
        return run

    return Provider(
        name="tf-lookup-sparse", device="cpu", exact=False,
        description='tf.nn.embedding_lookup_sparse(combiner="mean") in tf.function',
        probe=_tf_probe, supports=_sequence_only, prepare=prepare)


def _torch_runner(inputs: Inputs, device: str, pool):
    """run(k): ``pool(ids, table)`` on the k-th id set, in inference mode, finished on a GPU."""
    torch = _torch()
    table = _torch_table(inputs, device)
    target = "cuda" if device == "gpu" else "cpu"
    id_sets = [torch.from_numpy(ids.astype(np.int64)).to(target) for ids in inputs.id_sets]

    def run(k):
        with torch.inference_mode():
            out = pool(id_sets[k], table)
        if device == "gpu":
            _torch_gpu_sync()
        return out
    return run


def _torch_provider(device: str) -> Provider:
    def prepare(inputs: Inputs):
        embedding_bag = _torch().nn.functional.embedding_bag
        return _torch_runner(inputs, device, lambda ids, table: embedding_bag(ids, table, mode="mean"))

    return Provider(
        name="torch-embedding-bag" + ("-gpu" if device == "gpu" else ""), device=device, exact=False,
        description='torch.nn.functional.embedding_bag(mode="mean")',
        probe=_torch_gpu_probe if device == "gpu" else _torch_probe,
        supports=_sequence_only, prepare=prepare)


def _torch_unfused_provider(device: str) -> Provider:
    """The unfused path in PyTorch: gather (B, L, D), then mean. The GPU baseline where TF is absent."""

    def prepare(inputs: Inputs):
        embedding, axis = _torch().nn.functional.embedding, int(inputs.axis)
        # writes [B][L][D], reads it back
        return _torch_runner(inputs, device, lambda ids, table: embedding(ids, table).mean(dim=axis))

    return Provider(
        name="torch-unfused" + ("-gpu" if device == "gpu" else ""), device=device, exact=False,
        description="torch.nn.functional.embedding(ids, table).mean(axis): the unfused path in PyTorch",
        probe=_torch_gpu_probe if device == "gpu" else _torch_probe,
        supports=_any_case, prepare=prepare)


@functools.lru_cache(maxsize=None)
def all_providers() -> tuple[Provider, ...]:
    """Every provider we know, GPU ones first, the unfused TF path (the baseline) among them."""
    fused = [_fused_backend_provider(name) for name in backends.REGISTRY if name != "numpy"]
    return tuple(
        [p for p in fused if p.device == "gpu"]
        + [_torch_provider("gpu"), _tf_unfused_provider("gpu"), _torch_unfused_provider("gpu")]
        + [p for p in fused if p.device == "cpu"]
        + [_fused_constant_table_provider(), _tf_op_provider(), _tf_unfused_provider("cpu"), _keras_provider(),
           _tf_sparse_provider(), _torch_provider("cpu"), _torch_unfused_provider("cpu")])


def providers_for(device: str) -> list[Provider]:
    """The providers of ``device`` ("cpu", "gpu" or "all"), available or not."""
    return [p for p in all_providers() if device in ("all", p.device)]


# The unfused gather -> mean every speedup is measured against, by device, in
# order of preference: TF's where TensorFlow runs, else PyTorch's (the GPU test
# machine has no TensorFlow).
BASELINES = {"cpu": ("tf-unfused", "torch-unfused"), "gpu": ("tf-unfused-gpu", "torch-unfused-gpu")}


def to_numpy(result, dtype) -> np.ndarray:
    """A provider's result as a host NumPy array of ``dtype`` (for validation, not timing)."""
    dtype = np.dtype(dtype)
    if type(result).__module__.startswith("torch"):
        return _torch_to_numpy(result)
    if isinstance(result, np.ndarray):
        return result
    if hasattr(result, "numpy") and type(result).__module__.startswith("tensorflow"):
        return np.asarray(result)
    return _gpu_to_numpy(result, dtype)


# ---------------------------------------------------------------------------
# Validation and timing


def validate_provider(provider: Provider, rng, axis: Axis, table_dtype,
                      vocab=1000, dim=33, batch=7, length=19) -> str | None:
    """None when ``provider`` matches the float64 reference on fresh random inputs, else a report.

    Small odd shapes; the package's own ops use the reference tolerances, other
    frameworks the Keras ones (they may pool 16-bit tables in 16 bits).
    """
    from .validation import random_inputs
    table, ids = random_inputs(rng, vocab, dim, batch, length, table_dtype)
    inputs = Inputs(table, [ids], axis)
    result = to_numpy(provider.prepare(inputs)(0), table_dtype)
    expected = embedding_mean_reference(table, ids, axis)
    if np.dtype(result.dtype) != np.dtype(table_dtype):
        return f"returned {result.dtype}, expected {np.dtype(table_dtype)}"
    return compare(result, expected, **tolerance(table_dtype, "reference" if provider.exact else "keras"))


def time_runner(runner: Callable[[int], Any], n_sets: int, repeats: int, warmup: int = 2) -> list[float]:
    """Seconds per call of ``repeats`` calls, id sets rotated call by call.

    The first ``warmup`` calls (compilation, tracing, first touch) are not kept.
    """
    for k in range(warmup):
        runner(k % n_sets)
    times = []
    for rep in range(repeats):
        k = (warmup + rep) % n_sets
        t0 = time.perf_counter()
        runner(k)
        times.append(time.perf_counter() - t0)
    return times


def summarize(times: list[float]) -> dict:
    """Median and p20/p80 in milliseconds."""
    ms = np.asarray(times) * 1e3
    return dict(median_ms=float(np.median(ms)), p20_ms=float(np.percentile(ms, 20)),
                p80_ms=float(np.percentile(ms, 80)))


_read_kernels = None  # the read baseline's candidate kernels, compiled at their first use


def _compile_read_kernels():
    import numba

    @numba.njit(parallel=True, fastmath=True, nogil=True)
    def sum_lines(lines, pieces):  # pieces must divide N / 4
        per = lines.shape[0] // pieces
        partial = np.zeros((pieces, 16), dtype=np.float32)
        for piece in numba.prange(pieces):
            acc = np.zeros(16, dtype=np.float32)
            for row in range(piece * per, (piece + 1) * per, 4):
                for lane in range(16):
                    acc[lane] += lines[row, lane] + lines[row + 1, lane] + lines[row + 2, lane] \
                        + lines[row + 3, lane]
            partial[piece] = acc
        return partial.sum()

    @numba.njit(parallel=True, fastmath=True, nogil=True)
    def sum_flat(values, chunk):  # chunk must divide N; a chunk of ones sums exactly in float32
        partial = np.zeros(values.shape[0] // chunk, dtype=np.float64)
        for c in numba.prange(partial.shape[0]):
            total = np.float32(0.0)
            for i in range(c * chunk, (c + 1) * chunk):
                total += values[i]
            partial[c] = total
        return partial.sum()

    return sum_lines, sum_flat


def read_baseline(nbytes: int = COPY_BYTES):
    """(run, nbytes_read): ``run()`` reads a host buffer of about ``nbytes`` once, in order,
    on every thread of Numba's team, and returns its sum (so no read can be left out).

    The fastest in-order read this machine does, as the most a gather could stream its
    rows (it only reads them): of two kernels, the one that ran faster here when this was
    called (three timed runs each). One sums the buffer as [N][16] float32, a 64-byte
    line per row, in a few pieces per thread, four lines per step; the other is a plain
    Numba ``prange`` sum of the flat buffer, which measured 20-45% faster on the 2-core
    development machine.
    """
    global _read_kernels
    import numba
    if _read_kernels is None:
        _read_kernels = _compile_read_kernels()
    sum_lines, sum_flat = _read_kernels
    rows = 1 << max(8, (nbytes // 64).bit_length() - 1)
    lines = np.ones((rows, 16), dtype=np.float32)
    flat = lines.reshape(-1)
    pieces = min(rows // 4, 1 << (16 * numba.config.NUMBA_NUM_THREADS - 1).bit_length())
    chunk = min(flat.shape[0], 1 << 20)  # powers of two: divides N
    candidates = [lambda: sum_lines(lines, pieces), lambda: sum_flat(flat, chunk)]
    timings = []
    for run in candidates:
        if run() != lines.size:  # compiles it, and checks every line was read
            raise RuntimeError("the read baseline's kernel did not read its whole buffer")
        timings.append(min(_seconds(run) for _ in range(3)))
    return candidates[int(np.argmin(timings))], lines.nbytes


def _seconds(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def measure_read(device: str, repeats: int = 10, nbytes: int = COPY_BYTES) -> dict:
    """The bandwidth a large read-only stream reaches on the host (GB/s = bytes / time);
    for a GPU device, a dict with ``error`` (not measured there)."""
    if device != "cpu":
        return dict(device=device, error="measured on the host only", gb_per_s=None)
    run, nbytes = read_baseline(nbytes)
    return _bandwidth(device, f"a parallel read of {nbytes / 2**20:.0f} MiB", nbytes,
                      time_runner(lambda _k: run(), 1, repeats))


def measure_copy(device: str, repeats: int = 10, nbytes: int = COPY_BYTES) -> dict:
    """The memory bandwidth a large copy reaches on ``device`` (GB/s = 2 * nbytes / time)."""
    if device == "cpu":
        src = np.ones(nbytes // 4, dtype=np.float32)
        dst = np.empty_like(src)

        def run(_k):
            np.copyto(dst, src)
        what = f"np.copyto of {nbytes / 2**20:.0f} MiB"
    else:
        torch_reason = _torch_gpu_probe()
        if _import_reason("cupy") is None:
            import cupy
            src = cupy.ones(nbytes // 4, dtype=cupy.float32)
            dst = cupy.empty_like(src)

            def run(_k):
                cupy.copyto(dst, src)
                cupy.cuda.runtime.deviceSynchronize()
            what = f"cupy.copyto of {nbytes / 2**20:.0f} MiB"
        elif torch_reason is None:
            torch = _torch()
            src = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")
            dst = torch.empty_like(src)

            def run(_k):
                dst.copy_(src)
                torch.cuda.synchronize()
            what = f"torch copy_ of {nbytes / 2**20:.0f} MiB"
        else:
            raise RuntimeError(f"no GPU copy baseline: CuPy is missing and {torch_reason}")
    return _bandwidth(device, what, copy_bytes(nbytes), time_runner(run, 1, repeats))


def _bandwidth(device: str, what: str, nbytes: int, times: list[float]) -> dict:
    """A bandwidth baseline's record: the timing summary, what ran, the bytes it moved, GB/s."""
    stats = summarize(times)
    stats.update(device=device, what=what, nbytes=nbytes, gb_per_s=gb_per_s(nbytes, stats["median_ms"] / 1e3),
                 times_ms=[t * 1e3 for t in times])
    return stats


def case_bytes(inputs: Inputs) -> int:
    """The bytes model's traffic for one call of this case (the same for every provider)."""
    return fused_bytes(inputs.batch, inputs.length, inputs.table.shape[1], inputs.table.dtype,
                       inputs.id_sets[0].dtype, inputs.axis)


# ---------------------------------------------------------------------------
# Variable-length bags (CSR): the workload, its inputs and its providers
#
# ``fused-embedding bench --bags`` times these; the workload is defined here once.


@dataclasses.dataclass(frozen=True)
class BagCase:
    """One bags case: B bags whose lengths are geometric with mean ``mean_length`` (at least
    1, capped at ``max_length``), ids over [0, V) Zipf-distributed (``ids="zipf"``, exponent
    ``zipf_a``) or uniform, a (V, D) table of ``dtype`` ("fp32", "fp16", "bf16")."""

    batch: int
    mean_length: float
    max_length: int
    dim: int
    vocab: int
    ids: str
    dtype: str = "fp32"
    zipf_a: float = 1.2

    @property
    def label(self) -> str:
        return (f"B={self.batch} L~geom({self.mean_length:g}, <={self.max_length}) D={self.dim} "
                f"V={self.vocab:,} {self.ids} ids {self.dtype}")


# The workload: B=4096 bags, geometric lengths of mean 32 capped at 1,000, V=2,000,000
# fp32 rows of D=16, 64 and 256 floats, ids Zipf (a=1.2) and uniform. D=64 is the
# headline; uniform ids are where the read-bandwidth target is judged (Zipf's hot rows
# sit in the caches, so its bytes come partly from there).
BAG_BATCH, BAG_MEAN_LENGTH, BAG_MAX_LENGTH, BAG_VOCAB = 4096, 32, 1000, 2_000_000
BAG_DIMS, BAG_QUICK_DIMS = (64, 16, 256), (64,)
BAG_ID_DISTRIBUTIONS = ("zipf", "uniform")
BAG_ZIPF_A = 1.2


def bag_cases(dims=BAG_DIMS, batch=BAG_BATCH, mean_length=BAG_MEAN_LENGTH, vocab=BAG_VOCAB,
              max_length=BAG_MAX_LENGTH, dtype="fp32") -> list[BagCase]:
    """The bags workload's cases: every D, Zipf then uniform ids."""
    return [BagCase(batch, mean_length, max_length, dim, vocab, ids, dtype, BAG_ZIPF_A)
            for dim in dims for ids in BAG_ID_DISTRIBUTIONS]


@dataclasses.dataclass
class BagSet:
    """One batch of CSR bags on the host: values [N] int64, offsets [B + 1] int64, weights [N]
    float32 (uniform in [0, 1): used by the weighted providers, ignored by the rest)."""

    values: np.ndarray
    offsets: np.ndarray
    weights: np.ndarray


def bag_lengths(rng, case: BagCase) -> np.ndarray:
    """[B] int64 bag lengths: geometric on 1, 2, ... with mean ``case.mean_length``, capped."""
    p = min(1.0, 1.0 / max(1.0, float(case.mean_length)))
    return np.minimum(rng.geometric(p, size=case.batch), case.max_length).astype(np.int64)


def bag_ids(rng, case: BagCase, count: int, permutation=None) -> np.ndarray:
    """[count] int64 ids in [0, V): uniform, or Zipf ranks (a = case.zipf_a, ranks past V drawn
    again) mapped through ``permutation`` (a [V] shuffle of the rows, so the hot rows lie
    scattered over the table as hashed ids do, not packed at its start)."""
    if case.ids == "uniform":
        return rng.integers(0, case.vocab, size=count, dtype=np.int64)
    if case.ids != "zipf":
        raise ValueError(f"ids must be 'zipf' or 'uniform', got {case.ids!r}")
    ranks = rng.zipf(case.zipf_a, size=count)
    outside = np.flatnonzero(ranks > case.vocab)
    while outside.size:
        ranks[outside] = rng.zipf(case.zipf_a, size=outside.size)
        outside = outside[ranks[outside] > case.vocab]
    ranks -= 1
    return ranks if permutation is None else permutation[ranks]


def random_bag_sets(rng, case: BagCase, lengths: list, permutation=None) -> list[BagSet]:
    """One fresh BagSet per entry of ``lengths`` ([B] each): fresh ids and weights, those lengths."""
    sets = []
    for length in lengths:
        offsets = np.zeros(case.batch + 1, dtype=np.int64)
        np.cumsum(length, out=offsets[1:])
        total = int(offsets[-1])
        sets.append(BagSet(bag_ids(rng, case, total, permutation), offsets,
                           rng.random(total, dtype=np.float32)))
    return sets


def bag_set_count(case: BagCase) -> int:
    """How many bag sets to rotate among so the rows gathered exceed ROTATION_TARGET_BYTES."""
    gathered = max(1, int(case.batch * min(case.mean_length, case.max_length) * case.dim
                          * DTYPE_NAMES[case.dtype].itemsize))
    return int(min(MAX_ID_SETS, max(MIN_ID_SETS, math.ceil(ROTATION_TARGET_BYTES / gathered))))


@dataclasses.dataclass
class BagInputs:
    """One bags case on the host: the (V, D) table and the bag sets a provider rotates among;
    ``cache`` as Inputs' (the table converted once per framework)."""

    table: np.ndarray
    bag_sets: list
    cache: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class BagProvider:
    """One way of pooling CSR bags.

    combiner / weighted: what it computes ("mean" unweighted, or "sum" with the set's
      weights), and so which reference it is validated against.
    baseline: the provider whose time its ratio is over (in the same run), or None.
    target: the ratio the issue asks of it over ``baseline``, or None.
    prepare: (BagInputs) -> runner; runner(k) -> the (B, D) result for bag set k, finished.
    """

    name: str
    description: str
    exact: bool
    combiner: str
    weighted: bool
    probe: Callable[[], str | None]
    prepare: Callable[[BagInputs], Callable[[int], Any]]
    baseline: str | None = None
    target: float | None = None
    device: str = "cpu"

    def unavailable_reason(self) -> str | None:
        return _probe_once(self.name, self.probe)


def _fused_bag_provider(combiner: str, weighted: bool, baseline: str) -> BagProvider:
    def prepare(inputs: BagInputs):
        from .bags import embedding_bag
        table, sets = inputs.table, inputs.bag_sets

        def run(k):
            s = sets[k]
            return embedding_bag(table, s.values, s.offsets, weights=s.weights if weighted else None,
                                 combiner=combiner, backend="cpu")
        return run

    tag = f"{combiner},w" if weighted else combiner
    return BagProvider(
        name=f"fused-bag[{tag}]", exact=True, combiner=combiner, weighted=weighted,
        description=f"fused_embedding.embedding_bag(table, values, offsets"
                    + (", weights=w" if weighted else "") + f", combiner={combiner!r})",
        probe=lambda: backends.unavailable_reason("cpu"), prepare=prepare, baseline=baseline, target=1.0)


def _fused_tf_probe() -> str | None:
    """Why the package's TF op can't run here (TensorFlow missing, or fused_embedding.tf
    not importable), or None."""
    reason = _tf_probe()
    if reason:
        return reason
    try:
        importlib.import_module("fused_embedding.tf")
    except ImportError as exc:
        return f"fused_embedding.tf is not importable ({exc})"
    return None


def _tf_ragged_sets(inputs: BagInputs):
    tf = _tf()
    return [tf.RaggedTensor.from_row_splits(tf.constant(s.values), tf.constant(s.offsets), validate=False)
            for s in inputs.bag_sets]


def _tf_sparse_sets(inputs: BagInputs):
    """Each bag set as a 2-D SparseTensor [B, W] in canonical row-major order, W the longest
    bag of all the sets: one dense shape for all, as a fixed-width feature has. (A
    SparseTensor's dense shape is part of its tf.function signature: a width per set
    would retrace the function at each new one, and time the tracing.)"""
    tf = _tf()
    width = max([int(np.diff(s.offsets).max(initial=0)) for s in inputs.bag_sets] + [0])
    sparse = []
    for s in inputs.bag_sets:
        lengths = np.diff(s.offsets)
        rows = np.repeat(np.arange(lengths.size, dtype=np.int64), lengths)
        cols = np.arange(s.values.size, dtype=np.int64) - np.repeat(s.offsets[:-1], lengths)
        sparse.append(tf.SparseTensor(tf.constant(np.stack([rows, cols], axis=1)), tf.constant(s.values),
                                      tf.constant([lengths.size, width], dtype=tf.int64)))
    return sparse


def _tf_lookup_sparse(lookup, table, sp_ids):
    return lookup(table, sp_ids, None, combiner="mean")


def _tf_bag_provider(name: str, description: str, lookup_of, form: str, baseline=None,
                     target=None, probe=_tf_probe, exact=False) -> BagProvider:
    """A TF sparse lookup (``lookup_of()`` gives the function) on ragged or sparse ids, in
    tf.function, combiner "mean", no weights; the ids converted outside the timed region."""

    def prepare(inputs: BagInputs):
        table = _tf_table(inputs, "cpu")
        ids = _tf_ragged_sets(inputs) if form == "ragged" else _tf_sparse_sets(inputs)
        lookup = _tf_function(_tf_lookup_sparse, lookup_of())

        def run(k):
            return _tf_finish(lookup(table, ids[k]), "cpu")
        return run

    return BagProvider(name=name, description=description, exact=exact, combiner="mean", weighted=False,
                       probe=probe, prepare=prepare, baseline=baseline, target=target)


def _torch_bag_provider(combiner: str, weighted: bool) -> BagProvider:
    def prepare(inputs: BagInputs):
        torch = _torch()
        embedding_bag = torch.nn.functional.embedding_bag
        table = _torch_table(inputs, "cpu")
        sets = [(torch.from_numpy(s.values), torch.from_numpy(s.offsets),
                 torch.from_numpy(s.weights) if weighted else None) for s in inputs.bag_sets]

        def run(k):
            values, offsets, weights = sets[k]
            with torch.inference_mode():
                return embedding_bag(values, table, offsets, mode=combiner, per_sample_weights=weights,
                                     include_last_offset=True)
        return run

    tag = f"{combiner},w" if weighted else combiner
    return BagProvider(
        name=f"torch-bag[{tag}]", exact=False, combiner=combiner, weighted=weighted,
        description=f'torch.nn.functional.embedding_bag(values, table, offsets, mode="{combiner}"'
                    + (", per_sample_weights=w" if weighted else "") + ", include_last_offset=True)",
        probe=_torch_probe, prepare=prepare)


def _fused_tf_module():
    return importlib.import_module("fused_embedding.tf")  # it exports the drop-ins of tf_bags


# The ratios the bags benchmark checks, each over a baseline in the same run.
BAG_TF_TARGET, BAG_CORE_TARGET, BAG_READ_TARGET_PCT = 5.0, 1.0, 50.0


@functools.lru_cache(maxsize=None)
def bag_providers() -> tuple[BagProvider, ...]:
    """Every bags provider: the core op (mean; weighted sum), the fused TF drop-ins in
    tf.function (ragged; safe on sparse), TF's own ops, torch's embedding_bag."""
    return (
        _fused_bag_provider("mean", False, baseline="torch-bag[mean]"),
        _fused_bag_provider("sum", True, baseline="torch-bag[sum,w]"),
        _tf_bag_provider("tf-op-bag[ragged]",
                         "fused_embedding.tf.embedding_lookup_sparse(table, ragged ids) in tf.function",
                         lambda: _fused_tf_module().embedding_lookup_sparse, "ragged",
                         baseline="tf-lookup-sparse[ragged]", target=BAG_TF_TARGET,
                         probe=_fused_tf_probe, exact=True),
        _tf_bag_provider("tf-op-safe[sparse]",
                         "fused_embedding.tf.safe_embedding_lookup_sparse(table, sparse ids) in tf.function",
                         lambda: _fused_tf_module().safe_embedding_lookup_sparse, "sparse",
                         baseline="tf-safe-lookup-sparse[sparse]", target=BAG_TF_TARGET,
                         probe=_fused_tf_probe, exact=True),
        _tf_bag_provider("tf-lookup-sparse[ragged]",
                         'tf.nn.embedding_lookup_sparse(table, ragged ids, combiner="mean") in tf.function',
                         lambda: _tf().nn.embedding_lookup_sparse, "ragged"),
        _tf_bag_provider("tf-safe-lookup-sparse[sparse]",
                         'tf.nn.safe_embedding_lookup_sparse(table, sparse ids, combiner="mean") in tf.function',
                         lambda: _tf().nn.safe_embedding_lookup_sparse, "sparse"),
        _torch_bag_provider("mean", False),
        _torch_bag_provider("sum", True),
    )


def bag_reference(table, bag_set: BagSet, provider: BagProvider) -> np.ndarray:
    """The float64 reference of what ``provider`` computes on ``bag_set``."""
    from .reference import embedding_bag_reference
    return embedding_bag_reference(table, bag_set.values, bag_set.offsets,
                                   bag_set.weights if provider.weighted else None, provider.combiner)


def validate_bag_provider(provider: BagProvider, rng, table_dtype=np.float32, vocab=1000, dim=33,
                          batch=23, mean_length=5, max_length=19) -> str | None:
    """None when ``provider`` matches the float64 reference on fresh random bags, else a report.

    Small odd shapes, Zipf ids (repeated ids in a bag), lengths from the workload's
    distribution; the package's ops use the reference tolerances, other frameworks the
    Keras ones.
    """
    case = BagCase(batch, mean_length, max_length, dim, vocab, "zipf", dtype_name(table_dtype))
    table = random_table(rng, vocab, dim, table_dtype)
    bag_set = random_bag_sets(rng, case, [bag_lengths(rng, case)], rng.permutation(vocab))[0]
    result = to_numpy(provider.prepare(BagInputs(table, [bag_set]))(0), table_dtype)
    if np.dtype(result.dtype) != np.dtype(table_dtype):
        return f"returned {result.dtype}, expected {np.dtype(table_dtype)}"
    return compare(result, bag_reference(table, bag_set, provider),
                   **tolerance(table_dtype, "reference" if provider.exact else "keras"))


def bag_set_bytes(bag_set: BagSet, dim: int, table_dtype, weighted: bool) -> int:
    """The bytes model's traffic for one call on ``bag_set`` (bytes_model.bag_bytes)."""
    return bag_bytes(bag_set.values.size, bag_set.offsets.size - 1, dim, table_dtype,
                     bag_set.values.dtype, weighted, bag_set.offsets.dtype.itemsize)
