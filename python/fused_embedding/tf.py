"""The TensorFlow op: ``fused_embedding.tf.embedding_mean``.

In a graph that certainly runs on the host, axis 1 is the package's own compiled
TF op, ``FusedEmbeddingMean`` (``tf_compiled.py``: built on first use, no Python
per call); where that can't be built, and for axis 2 (whose cached row means live
in Python), the op is a ``tf.numpy_function``. Where a GPU may hold the tensors it
is a ``tf.py_function`` (GPU tensors through DLPack); eagerly the body runs in
place. Every path hands TF's own buffers to the kernels, never a copy: the
compiled kernel gets the tensors' buffers, numpy_function the arrays it passes
in, eager tensors go through ``np.asarray(tensor)`` (``tensor.numpy()`` copies the
whole table in TF 2.21), GPU tensors through DLPack (ids may sit in host memory
there: the core copies the ids, never the table); large host results go back on
the buffer the kernel wrote. Dtypes and ranks are checked on the symbolic
tensors, so mistakes fail when the graph is built; bad ids fail when it runs, as
``tf.errors.InvalidArgumentError`` naming the id (as ``tf.gather`` does on CPU).

Export. A graph traced for export (inside ``tf.saved_model.save``, Keras'
``model.export``) holds the compiled ops in every form, so the SavedModel serves at
the fused speed: ``FusedEmbeddingMean`` (axis 1, and axis 2 read from the rows),
``FusedEmbeddingMeanOfRows`` (axis 2 on a table provably frozen in the graph: a
constant, ``fused_embedding.frozen_table``, an eager tensor; export writes its V row
means into the graph beside it, so a call reads B*L scalars; a tf.Variable can be
assigned after loading, so its rows are read), ``FusedEmbeddingBag`` (tf_bags.py). A
process serves such a SavedModel after ``load_ops()``; without it TF's load fails
with "Op type not registered 'FusedEmbedding...'". Where the compiled ops can't be
built (``tf_compiled.unavailable_reason()``), export writes the native-TF twin
(gather, masked mean, the same empty-bag and bounds rules) with a warning, never a
graph that can't load. ``native_ops()`` asks for that twin explicitly: a SavedModel
that loads with TF alone. A graph traced with a Python body (numpy_function,
py_function: axis 2 in process, a GPU graph) lives in this process only and refuses
to be saved, at save time, with a message naming the fix; one traced with the
compiled kernel saves as it is.

Conversion. ``convert_saved_model(in_dir, out_dir)`` (``fused-embedding convert``,
tf_convert.py) rewrites a SavedModel written without this package: its gather-then-mean
subgraphs become this module's op, every signature checked against the original before
anything is written.
"""
from __future__ import annotations

import contextlib
import string
import sys
import threading
import warnings

import numpy as np
import tensorflow as tf

try:
    # The cpu backend imports Numba and sets up its runtime (0.35-1.3 s here, by the
    # machine's load), the largest one-off cost of the op's first call: paid where the op
    # is imported (beside TensorFlow's seconds), before a model is built or loaded, not on
    # its first request (benchmarks/NOTES.md). Its kernels still load at their first call.
    from .backends import cpu as _cpu_backend  # noqa: F401
except Exception:  # no (working) numba: the registry says why when the cpu backend is asked for
    pass

from . import api, checks, row_mean_cache, tf_compiled, tf_quantized, tf_sharded
from .backends import OUT_OF_RANGE_MESSAGE, Bfloat16OnDevice
from .memory import ALIGNED_OUTPUT_MIN_BYTES
from .semantics import EMPTY_BAG_VALUE, PADDING_ID, Axis, output_shape
from .tf_variables import read_without_copy

TABLE_DTYPES = tuple(tf.as_dtype(name) for name in checks.TABLE_DTYPE_NAMES)  # float32, float16, bfloat16
ID_DTYPES = tuple(tf.as_dtype(name) for name in checks.ID_DTYPE_NAMES)

# TF's CPU kernels CHECK that a tensor's data starts on a multiple of this many bytes
# (Eigen's widest alignment) and abort the process when it does not.
TF_ALIGNMENT_BYTES = 64
# Result dtypes NumPy exports through DLPack (it has no bfloat16 there).
_DLPACK_RESULT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))

EXPORT_FIX = ("this graph runs fused_embedding's op through tf.numpy_function / tf.py_function, "
              "whose Python body is not saved in a SavedModel. Let the saver trace the function "
              "(Keras' model.export() and tf.saved_model.save() on a tf.function trace it with the "
              "compiled FusedEmbedding* ops, served after fused_embedding.tf.load_ops()), or export "
              "a native copy that loads with TF alone: fused_embedding.keras.unfuse(model).export(path), "
              "or trace the function inside `with fused_embedding.tf.native_ops():` "
              "(a ConcreteFunction traced earlier is saved as it is)")

_state = threading.local()


def load_ops():
    """Load the package's TF op library into this process and configure its kernels.

    What a process serving a SavedModel exported with the fused ops (the default
    export) calls before ``tf.saved_model.load``: builds the library first where
    none is cached for this TF (``fused-embedding build`` does it ahead of time; a
    SavedModel written under another TF version loads once it is rebuilt), then
    registers ``FusedEmbeddingMean``, ``FusedEmbeddingMeanOfRows`` and
    ``FusedEmbeddingBag`` with TF and hands the kernels their Numba launchers.
    Idempotent; graphs using the op load it themselves when traced.

    ``import fused_embedding.tf`` does not do this: it would add the library's load
    and the launchers' set-up (1-2 s here) to every import, or a 10 s+ build on a
    fresh installation, for processes that never load a SavedModel.

    Returns the op module (``tf.load_op_library``'s). Raises RuntimeError saying why
    where the library can't be built or loaded (``tf_compiled.unavailable_reason()``).
    """
    return tf_compiled.load_ops()


@contextlib.contextmanager
def native_ops():
    """Within this block the op builds native TF ops (tf.gather + masked mean), no Python body
    and no compiled op.

    The portable export: a SavedModel traced here loads and serves with TF alone
    (neither this package nor its op library). Slower than the fused ops that
    ``tf.saved_model.save`` / ``model.export`` write by default; same results
    (float32 accumulation, zeros for empty bags, bounds checked).
    """
    previous = getattr(_state, "native", False)
    _state.native = True
    try:
        yield
    finally:
        _state.native = previous


def _native_requested() -> bool:
    """True inside ``native_ops()``."""
    return getattr(_state, "native", False)


_native_fallback_warned = False


def _exports_compiled_ops(table) -> bool:
    """While tracing for export: True where the graph holds the compiled ops (the default),
    False for the native twin: inside ``native_ops()``, for a table placed on a GPU (the
    compiled ops are CPU kernels), or where they can't be built (a warning, once)."""
    global _native_fallback_warned
    if _native_requested() or _is_gpu_tensor(table):
        return False
    if tf_compiled.op_module() is not None:
        return True
    if not _native_fallback_warned:
        _native_fallback_warned = True
        warnings.warn("fused_embedding: exporting the native TF twin of the op (gather + mean, unfused "
                      f"speed): the compiled FusedEmbedding* ops can't be built here "
                      f"({tf_compiled.unavailable_reason()})", RuntimeWarning, stacklevel=3)
    return False


def _tracing_for_export() -> bool:
    """True when the graph being built will be saved rather than run here (or ``native_ops()``)."""
    if _native_requested():
        return True
    from tensorflow.python.saved_model import save_context
    if save_context.in_save_context():
        return True
    # Keras' model.export() / ExportArchive traces its endpoints before it calls
    # tf.saved_model.save, outside the save context: recognise it by its frames.
    # Only runs while tracing, never per call.
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("keras.src.export"):
            return True
        frame = frame.f_back
    return False


class _ExportGuard(tf.saved_model.experimental.TrackableResource):
    """A resource every graph with the op's Python body captures, so
    that saving such a graph fails while saving.

    Nothing tracks it (it belongs to no saved object), and TF's saver refuses a
    function capturing an untracked resource with an AssertionError that quotes the
    resource's repr: the repr names the fix. Should something track it anyway,
    creating it inside the save context raises the same fix.
    """

    def _create_resource(self):
        from tensorflow.python.saved_model import save_context
        if save_context.in_save_context():
            raise RuntimeError(EXPORT_FIX)
        return tf.raw_ops.VarHandleOp(dtype=tf.int32, shape=[], shared_name="", container="")

    def _initialize(self):
        pass

    def __repr__(self):
        return f"<fused_embedding graph that runs in this process only: {EXPORT_FIX}>"


_guard = None
_guard_lock = threading.Lock()  # graphs traced on two threads at once share one guard


def export_guard() -> _ExportGuard:
    global _guard
    if _guard is None:
        with _guard_lock:
            if _guard is None:
                with tf.init_scope():  # an eager resource, created once, captured by every graph
                    guard = _ExportGuard()
                    guard.resource_handle  # noqa: B018 (created lazily: create it here, eagerly)
                _guard = guard
    return _guard


def _check_symbolic(table: tf.Tensor, ids: tf.Tensor, mask_zero) -> None:
    """Graph-construction-time checks of what the symbolic tensors already tell (checks.py's)."""
    checks.check_mask_zero(mask_zero)
    if table.dtype not in TABLE_DTYPES:
        raise checks.table_dtype_error(table.dtype.name)
    if ids.dtype not in ID_DTYPES:
        raise checks.ids_dtype_error(ids.dtype.name, ids.dtype.is_floating)
    checks.check_table_shape(None if table.shape.rank is None else table.shape.as_list())
    checks.check_ids_shape(None if ids.shape.rank is None else ids.shape.as_list())


def _static_output_shape(axis: Axis, table: tf.Tensor, ids: tf.Tensor) -> tf.TensorShape:
    """(B, D) or (B, L) with whatever dims the inputs know (None where they don't)."""
    table_shape = table.shape.with_rank(2)
    ids_shape = ids.shape.with_rank(2)
    return tf.TensorShape(output_shape(axis, ids_shape[0], ids_shape[1], table_shape[1]))


def _is_gpu_tensor(tensor) -> bool:
    return "GPU" in (tensor.device or "").upper()


def _host_result(out: np.ndarray):
    """The core op's host result as the py_function returns it: a tensor on the same
    buffer (DLPack) where TF can take it as it is, else the array, which TF copies.

    TF takes a buffer only when it starts on a TF_ALIGNMENT_BYTES line; the core
    allocates results that large so when asked (``aligned_output``, the cpu and numpy
    backends). Smaller results are left to TF's copy, which costs about what the
    check would.
    """
    if (out.nbytes >= ALIGNED_OUTPUT_MIN_BYTES and out.dtype in _DLPACK_RESULT_DTYPES
            and out.flags.c_contiguous and out.__array_interface__["data"][0] % TF_ALIGNMENT_BYTES == 0):
        return tf.experimental.dlpack.from_dlpack(out.__dlpack__())  # keeps the array alive
    return out


def _runs_on_host(table: tf.Tensor) -> bool:
    """True when the graph op certainly runs on the host: the table is placed on a CPU,
    or TF has no GPU to place it on. It then takes ``tf.numpy_function``, whose
    round trip is cheaper than ``tf.py_function``'s (no eager context around the body:
    0.04 ms empty, 0.15-0.3 ms per call at B=1024, L=64, D=128; benchmarks/NOTES.md);
    TF hands the body its tensors' buffers as arrays and takes an aligned result back
    as it is. Elsewhere ``tf.py_function``, which can pass GPU tensors through DLPack.
    """
    device = (table.device or "").upper()
    if "GPU" in device:
        return False
    return "CPU" in device or not tf.config.list_logical_devices("GPU")


def _uses_compiled_kernel(axis: Axis, backend) -> bool:
    """True when a graph op that runs on the host can be the compiled kernel
    (tf_compiled.py): over the sequence axis (axis 2's cached row means live in Python),
    for the cpu backend."""
    return (axis is Axis.SEQUENCE and api.choose_backend(backend, "cpu", "cpu") == "cpu"
            and tf_compiled.op_module() is not None)


class _BadIdError(ValueError):
    """A bad id, raised from the op's Python bodies: numpy_function and py_function map a
    ValueError to InvalidArgumentError (what tf.gather raises for a bad id; an IndexError
    would surface as UnknownError), and the eager op raises InvalidArgumentError for this
    one while letting its argument errors through as they are."""


def _run_core_on_host_arrays(table, ids, axis, mask_zero, backend, site=row_mean_cache.ANONYMOUS_SITE):
    """The numpy_function body: TF's buffers in as arrays, the core's result out.

    ``site`` says where the table comes from, so that the axis-2 row-mean cache pins at
    most one of its buffers (row_mean_cache.site_of)."""
    try:
        with row_mean_cache.at_site(site):
            return api._embedding_mean(table, ids, int(axis), mask_zero, backend, aligned_output=True)
    except IndexError as exc:
        raise _BadIdError(str(exc)) from exc


def _run_core(table, ids, axis, mask_zero, backend, site=row_mean_cache.ANONYMOUS_SITE):
    """The py_function body (and the eager op's): TF eager tensors in, the core op on TF's
    buffers, a tensor out. ``site``: as for _run_core_on_host_arrays."""
    try:
        if _is_gpu_tensor(table):
            return _run_core_on_gpu(table, ids, axis, mask_zero, backend)
        # np.asarray shares the tensor's buffer; bfloat16 arrives as ml_dtypes.bfloat16.
        with row_mean_cache.at_site(site):
            return _host_result(api._embedding_mean(np.asarray(table), np.asarray(ids), int(axis),
                                                    mask_zero, backend, aligned_output=True))
    except IndexError as exc:
        raise _BadIdError(str(exc)) from exc


def _run_core_on_gpu(table, ids, axis, mask_zero, backend):
    """GPU tensors through DLPack both ways; ids may be a host tensor (TF keeps int32 there).

    Not exercised by the CPU test suite (it needs TensorFlow with a GPU and CuPy).
    """
    import cupy
    dlpack = tf.experimental.dlpack
    is_bfloat16 = table.dtype == tf.bfloat16
    # TF's streams are not exposed: wait for the work producing the inputs before
    # our kernels read them, and for our kernels before TF reads the output.
    tf.test.experimental.sync_devices()
    # tf.bitcast aliases the buffer: bfloat16 crosses DLPack as its uint16 bits.
    table_bits = cupy.from_dlpack(dlpack.to_dlpack(tf.bitcast(table, tf.uint16) if is_bfloat16 else table))
    table_device = Bfloat16OnDevice(table_bits) if is_bfloat16 else table_bits
    ids_array = cupy.from_dlpack(dlpack.to_dlpack(ids)) if _is_gpu_tensor(ids) else np.asarray(ids)
    out = api.embedding_mean(table_device, ids_array, axis=int(axis), mask_zero=mask_zero,
                             backend=backend)
    out = getattr(out, "bits", out)
    out = cupy.ascontiguousarray(cupy.asarray(out))  # Numba device arrays via the CUDA array interface
    if is_bfloat16:
        out = out.view(cupy.uint16)
    cupy.cuda.runtime.deviceSynchronize()
    result = dlpack.from_dlpack(out.toDlpack())
    return tf.bitcast(result, tf.bfloat16) if is_bfloat16 else result


def _assert_ids_in_range(flat_ids, vocab, template: str, fields):
    """An op that fails, as the kernels do, on the first id of ``flat_ids`` outside [0, V),
    with ``template`` (a ``str.format`` message) filled from ``fields(first)``: a dict of
    tensors for the first bad flat position (``vocab`` is added). TF's own assertions would
    print the whole ids tensor instead. The message is formatted only on failure."""
    bad = tf.logical_or(flat_ids < 0, flat_ids >= vocab)

    def fail():
        first = tf.argmax(tf.cast(bad, tf.int32), output_type=flat_ids.dtype)  # the first True
        values = dict(fields(first), id=flat_ids[first], vocab=vocab)
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name]
        pattern = template
        for name in set(names):
            pattern = pattern.replace("{" + name + "}", "{}")
        message = tf.strings.format(pattern, [values[name] for name in names])
        with tf.control_dependencies([tf.debugging.Assert(False, [message])]):
            return tf.constant(False)

    return tf.cond(tf.reduce_any(bad), fail, lambda: tf.constant(True))


def _native_bounds_check(table, ids):
    """Dense ids [B][L]: the message every form of the op gives (id, its (row, column), V)."""
    length = tf.shape(ids, out_type=ids.dtype)[1]
    return _assert_ids_in_range(tf.reshape(ids, [-1]), tf.shape(table, out_type=ids.dtype)[0],
                                OUT_OF_RANGE_MESSAGE,
                                lambda first: {"row": first // length, "col": first % length})


def _native_embedding_mean(table, ids, axis: Axis, mask_zero: bool):
    """The same op in native TF ops (for export): gather, then a float32 masked mean.

    Writes the (B, L, D) intermediate (this is the slow path); same semantics as
    the kernels: bounds checked on every device, zeros for empty bags.
    """
    with tf.control_dependencies([_native_bounds_check(table, ids)]):
        rows = tf.cast(tf.gather(table, ids), tf.float32)                 # [B][L][D]
    return _native_pooling(rows, ids, axis, mask_zero, table.dtype)


def _native_pooling(rows, ids, axis: Axis, mask_zero: bool, dtype):
    """The native twin's pooling of gathered float32 rows [B][L][D] (tf_quantized's too),
    cast to ``dtype``: the mean over axis 1 or 2, padding skipped, empty bags zeros."""
    if axis is Axis.SEQUENCE:
        if not mask_zero:
            return tf.cast(tf.reduce_mean(rows, axis=1), dtype)             # [B][D]; L=0 -> NaN, fixed below
        counted = tf.not_equal(ids, tf.constant(PADDING_ID, ids.dtype))    # [B][L]
        # Select rather than multiply: a NaN stored in the padding row must not leak.
        sums = tf.reduce_sum(tf.where(counted[..., None], rows, 0.0), axis=1)
        counts = tf.reduce_sum(tf.cast(counted, tf.float32), axis=1, keepdims=True)
        means = tf.where(counts > 0, sums / tf.maximum(counts, 1.0), EMPTY_BAG_VALUE)
        return tf.cast(means, dtype)
    means = tf.reduce_mean(rows, axis=2)                                  # [B][L]
    if mask_zero:
        means = tf.where(tf.not_equal(ids, tf.constant(PADDING_ID, ids.dtype)), means, EMPTY_BAG_VALUE)
    return tf.cast(means, dtype)


def _baked_table_value(source, table: tf.Tensor):
    """The table's values where the graph being traced holds them as they are now, never to
    change (a constant baked into it, an eager tensor it captures), else None: a
    tf.Variable (assignable after loading), a graph input, any computed tensor.

    ``source``: what the op was given; ``table``: it as a tensor in the graph."""
    from tensorflow.python.framework.ops import EagerTensor
    if isinstance(source, EagerTensor):  # immutable: saved as the constant it is
        return np.asarray(source)
    if isinstance(source, tf.Variable) or table.dtype == tf.resource:
        return None
    if tf.is_symbolic_tensor(table) and table.op.type == "Const":  # a NumPy array, frozen_table
        return tf.get_static_value(table)
    return None


def _frozen_row_means(table_value: np.ndarray) -> np.ndarray:
    """[V] float32 row means of a frozen table, computed once at export (the cpu backend's
    row-means kernel, as its axis-2 cache computes them in process)."""
    from .backends import cpu
    return np.ascontiguousarray(cpu._row_means(np.ascontiguousarray(table_value)))


def _exported_form(table, ids, axis: Axis, mask_zero: bool, row_means):
    """The compiled op an exported graph holds: axis 1 over the rows; axis 2 on the frozen
    table's row means (``row_means`` [V] float32) or, without them, over the rows."""
    if axis is Axis.SEQUENCE:
        return tf_compiled.embedding_mean_sequence(table, ids, mask_zero)
    if row_means is not None:
        return tf_compiled.mean_of_rows(tf.constant(row_means), ids, table.dtype, mask_zero)
    return tf_compiled.embedding_mean_per_id(table, ids, mask_zero)


def _table_gradient(table, ids, upstream, axis: Axis, mask_zero: bool):
    """d(out)/d(table) as IndexedSlices: each gathered row gets upstream / (its bag's count).

    upstream: (B, D) for axis 1, (B, L) for axis 2, the table's dtype.
    Returns IndexedSlices with B*L rows (one per id, duplicates summed by TF).
    """
    dim = tf.shape(table)[1]
    counted = tf.ones_like(ids, dtype=tf.float32) if not mask_zero else \
        tf.cast(tf.not_equal(ids, tf.constant(PADDING_ID, ids.dtype)), tf.float32)  # [B][L]
    upstream = tf.cast(upstream, tf.float32)
    if axis is Axis.SEQUENCE:
        counts = tf.reduce_sum(counted, axis=1, keepdims=True)                      # [B][1]
        weights = counted / tf.maximum(counts, 1.0)                                 # [B][L]
        values = weights[..., None] * upstream[:, None, :]                          # [B][L][D]
    else:
        weights = counted * upstream / tf.cast(dim, tf.float32)                     # [B][L]
        values = tf.broadcast_to(weights[..., None], tf.concat([tf.shape(ids), [dim]], 0))
    values = tf.cast(tf.reshape(values, tf.stack([-1, dim])), table.dtype)          # [B*L][D]
    return tf.IndexedSlices(values, tf.reshape(ids, [-1]), tf.shape(table, out_type=ids.dtype))


@tf.autograph.experimental.do_not_convert  # graph building in plain Python, no tensor-dependent control flow
def embedding_mean(table, ids, axis=1, mask_zero=False, backend=None, name=None) -> tf.Tensor:
    """Fused ``mean(tf.gather(table, ids), axis)`` as a TF op (eager, tf.function, Keras).

    Args:
      table: (V, D) float32, float16 or bfloat16 tensor or tf.Variable (read in
        place, never copied); a row-sharded one (tf_sharded); or a quantized table,
        ``fused_embedding.QuantizedTable`` or ``TFQuantizedTable`` (tf_quantized.py:
        results float32, no gradient).
      ids: (B, L) int32 or int64 tensor of row indices in [0, V).
      axis: 1 -> (B, D), Keras ``Embedding -> GlobalAveragePooling1D()``; 2 or -1 ->
        (B, L), ``GlobalAveragePooling1D(data_format="channels_first")``.
      mask_zero: id 0 is padding (Keras' ``mask_zero=True``); an all-padding bag
        gives zeros (Keras: NaN), and on axis 2 padding positions give 0.
      backend: a backend name for the core op (see
        ``fused_embedding.available_backends()``), or None for the fastest one.
      name: an optional name scope.

    Returns:
      (B, D) or (B, L) tensor of the table's dtype (accumulated in float32), with
      the static shape the inputs give.

    Raises:
      TypeError / ValueError when the graph is built (eagerly: when called): dtype,
        rank, axis, a table with no columns, an unknown backend.
      tf.errors.InvalidArgumentError when it runs: an id outside [0, V), the
        message naming the id, its (row, column) and V.

    Gradients: a correct gradient for the table (IndexedSlices, as tf.gather's),
    none for the integer ids.
    """
    axis = api.normalize_axis(axis)
    if tf_quantized.is_quantized(table):
        with tf.name_scope(name or "fused_embedding_mean"):
            ids = tf.convert_to_tensor(ids)
            checks.check_mask_zero(mask_zero)
            if ids.dtype not in ID_DTYPES:
                raise checks.ids_dtype_error(ids.dtype.name, ids.dtype.is_floating)
            checks.check_ids_shape(None if ids.shape.rank is None else ids.shape.as_list())
            exporting = not tf.executing_eagerly() and _tracing_for_export()
            return tf_quantized.embedding_mean(table, ids, axis, bool(mask_zero), exporting, backend)
    if tf_sharded.is_sharded(table):
        return tf_sharded.embedding_mean(table, ids, axis, mask_zero, backend, name)
    if backend is not None:  # where the body runs later, a wrong name would only show then
        api.check_backend_name(backend)
    # Axis 2's row-mean cache pins at most one buffer per source of tables (the variable
    # or tensor given here), so stale copies can't pile up (row_mean_cache).
    site = row_mean_cache.site_of(table) if axis is Axis.EMBEDDING else row_mean_cache.ANONYMOUS_SITE
    with tf.name_scope(name or "fused_embedding_mean"):
        source = table
        table = read_without_copy(table)  # a variable's buffer, even after a sparse op touched it
        ids = tf.convert_to_tensor(ids)
        _check_symbolic(table, ids, mask_zero)
        mask_zero = bool(mask_zero)
        out_shape = _static_output_shape(axis, table, ids)

        exporting = not tf.executing_eagerly() and _tracing_for_export()
        if exporting and not _exports_compiled_ops(table):
            out = _native_embedding_mean(table, ids, axis, mask_zero)
            out.set_shape(out_shape)
            return out
        row_means = None
        if exporting and axis is Axis.EMBEDDING:
            baked = _baked_table_value(source, table)
            row_means = None if baked is None else _frozen_row_means(baked)

        @tf.custom_gradient
        def fused(table_value):
            if tf.executing_eagerly():
                # Eagerly the body runs in place (no round trip's fixed cost). A bad id
                # raises what the graph op raises; argument errors (a backend, a table
                # with no columns) stay ValueError / TypeError, as when a graph is built.
                try:
                    out = _run_core(table_value, ids, axis, mask_zero, backend, site)
                except _BadIdError as exc:
                    raise tf.errors.InvalidArgumentError(None, None, str(exc)) from exc
                out = tf.convert_to_tensor(out, dtype=table_value.dtype)
            else:
                # Run the op where the table is (a GPU table placed on the host would be
                # copied over on every call); ids follow it.
                placement = tf.device(table_value.device) if table_value.device else contextlib.nullcontext()
                with placement:
                    on_host = _runs_on_host(table_value)
                    if exporting:
                        out = _exported_form(table_value, ids, axis, mask_zero, row_means)
                    elif on_host and _uses_compiled_kernel(axis, backend):
                        out = tf_compiled.embedding_mean_sequence(table_value, ids, mask_zero)  # saves as is
                    else:
                        with tf.control_dependencies([tf.identity(export_guard().resource_handle)]):
                            if on_host:
                                out = tf.numpy_function(
                                    lambda t, i: _run_core_on_host_arrays(t, i, axis, mask_zero, backend, site),
                                    [table_value, ids], table_value.dtype, stateful=True)
                            else:
                                out = tf.py_function(
                                    lambda t, i: _run_core(t, i, axis, mask_zero, backend, site),
                                    [table_value, ids], table_value.dtype)
            out.set_shape(out_shape)

            def grad(upstream):
                return _table_gradient(table_value, ids, upstream, axis, mask_zero)
            return out, grad

        return fused(table)


# TF's sparse lookups, fused (tf_bags.py, which reads this module's checks and forms).
from .tf_bags import embedding_lookup_sparse, safe_embedding_lookup_sparse  # noqa: E402,F401

# SavedModels from elsewhere, their gather-then-mean subgraphs fused (tf_convert.py, which
# reads this module only inside the call).
from .tf_convert import CheckFailed, NothingToFuse, convert_saved_model  # noqa: E402,F401
from .tf_quantized import TFQuantizedTable  # noqa: E402,F401
