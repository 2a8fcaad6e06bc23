"""TF's sparse embedding lookups, fused: ``embedding_lookup_sparse`` and ``safe_embedding_lookup_sparse``.

Drop-ins for ``tf.nn.embedding_lookup_sparse`` / ``tf.nn.safe_embedding_lookup_sparse``
(what ``feature_column.embedding_column`` and Keras' sparse inputs call) on a single
table: the ids of each row of a 2-D ``tf.SparseTensor`` or ``tf.RaggedTensor`` become one
CSR bag (``values`` + ``offsets [B + 1]``, optional per-id ``weights``) and go through
the core op ``fused_embedding.embedding_bag``, which reads each gathered row once and
writes only the (B, D) result. TF's own ops gather the N rows into an (N, D) tensor first.

Same results as TF's ops, combiner by combiner, where TF's assumptions hold; where
they don't, ours are defined: a row with no ids gives zeros (TF's unsafe op assumes
there is none and drops trailing empty rows from its result; ours always has B rows),
and an id outside [0, V) is an InvalidArgumentError naming the id, its position in
the values and V (TF's CPU gather also raises; its GPU gather gives zeros). The
sparse ids must be in canonical row-major order, as TF's ops assume: ours check it.

Forms, as for the dense op (tf.py): eagerly the core op runs in place; in a graph on
the host the compiled ``FusedEmbeddingBag`` (tf_compiled.py) runs it, where that can't
be built a ``tf.numpy_function`` on TF's buffers (which refuses to be saved). A graph
traced for export (``tf.saved_model.save``, Keras' ``model.export``) holds
``FusedEmbeddingBag`` (served after ``fused_embedding.tf.load_ops()``); inside
``native_ops()``, or where the compiled op can't be built (with a warning), a native
twin of TF segment ops with the same rules is written instead. Gradients (``tf.GradientTape``):
the table gets IndexedSlices, one row per id (``weight * upstream / normaliser``), as
TF's ops give; per-id weights get theirs too.

Not fused (TF's own op runs instead, with a debug log): a list of tables or a
``PartitionedVariable`` (sharded tables), or ``max_norm``.
"""
from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf

from . import checks as checks_module
from . import tf as fused_tf
from . import tf_compiled, tf_sharded
from .backends import BAG_OUT_OF_RANGE_MESSAGE, CANONICAL_ORDER_MESSAGE, ROW_OUTSIDE_MESSAGE
from .spec import Pooling
from .tf_variables import read_without_copy

log = logging.getLogger("fused_embedding")


def _is_single_table(params) -> bool:
    from tensorflow.python.ops.variables import PartitionedVariable  # not in TF 2's public API
    return not isinstance(params, (list, tuple, PartitionedVariable))


def _csr(sp_ids, sp_weights, offsets_needed=True):
    """(values [N], offsets [B + 1] int64, weights [N] float32 or None) of a 2-D SparseTensor
    or RaggedTensor of ids, and checks that make the conversion exact. ``offsets_needed=False``:
    a SparseTensor's offsets (and their order check) are left out (None): the fused body
    makes and checks them."""
    checks = []
    if isinstance(sp_ids, tf.RaggedTensor):
        if sp_ids.ragged_rank != 1 or sp_ids.flat_values.shape.rank != 1:
            raise ValueError(f"sp_ids must be a 2-D RaggedTensor (B, None), got ragged rank "
                             f"{sp_ids.ragged_rank} with shape {sp_ids.shape}")
        values, offsets = sp_ids.values, tf.cast(sp_ids.row_splits, tf.int64)
        weights = None
        if sp_weights is not None:
            if not isinstance(sp_weights, tf.RaggedTensor):
                raise TypeError(f"sp_weights must be a RaggedTensor like sp_ids, or None; got "
                                f"{type(sp_weights).__name__}")
            checks.append(tf.debugging.assert_equal(
                tf.cast(sp_weights.row_splits, tf.int64), offsets,
                message="sp_weights must have the same row lengths as sp_ids"))
            weights = sp_weights.values
    elif isinstance(sp_ids, tf.SparseTensor):
        if sp_ids.shape.rank is not None and sp_ids.shape.rank != 2:
            raise ValueError(f"sp_ids must be a 2-D SparseTensor (B, L), got shape {sp_ids.shape}")
        offsets = None
        if offsets_needed:
            rows = sp_ids.indices[:, 0]
            batch = sp_ids.dense_shape[0]
            # CSR needs each row's ids together, in row order: TF's canonical order, which its
            # own ops assume without checking (out of order, they give wrong sums).
            checks.append(tf.debugging.assert_non_negative(rows[1:] - rows[:-1], message=CANONICAL_ORDER_MESSAGE))
            counts = tf.math.bincount(rows, minlength=batch, maxlength=batch, dtype=tf.int64)
            offsets = tf.concat([tf.zeros([1], tf.int64), tf.cumsum(counts)], 0)
        values = sp_ids.values
        weights = None
        if sp_weights is not None:
            if not isinstance(sp_weights, tf.SparseTensor):
                raise TypeError(f"sp_weights must be a SparseTensor like sp_ids, or None; got "
                                f"{type(sp_weights).__name__}")
            checks.append(tf.debugging.assert_equal(
                sp_weights.indices, sp_ids.indices, message="sp_weights must have the indices of sp_ids"))
            weights = sp_weights.values
    else:
        raise TypeError(f"sp_ids must be a tf.SparseTensor or tf.RaggedTensor, got {type(sp_ids).__name__}")
    if not values.dtype.is_integer or values.dtype not in (tf.int32, tf.int64):
        raise TypeError(f"sp_ids must hold int32 or int64 ids, got {values.dtype.name}")
    if weights is not None:
        if not weights.dtype.is_floating:
            raise TypeError(f"sp_weights must be floating point, got {weights.dtype.name}")
        weights = tf.cast(weights, tf.float32)
    return values, offsets, weights, checks




class _Bags:
    """Bags as TF hands them over, for the fused op.

    form "ragged": ``inputs`` = (values [N], row_splits [B + 1] int64); form "sparse":
    (indices [N][2] int64, values [N], B): the numpy_function body makes the offsets from
    the indices' rows in one pass (and checks their order), where TF ops would take
    several passes over N. weights: [N] float32 or None, as given (before any pruning).
    prune_ids / prune_weights: the safe op's rules, applied by the body (ids < 0 dropped;
    weights <= 0 dropped), only where there is something to drop. checks: TF assertions
    run before the body. csr(): (values, offsets, weights, kept positions or None) of the
    same bags as TF ops, pruned, for the export twin and the gradients; traced only
    where it is called.
    """

    def __init__(self, form, inputs, weights, checks, csr, prune_ids=False, prune_weights=False):
        self.form, self.inputs, self.weights, self.checks, self.csr = form, list(inputs), weights, checks, csr
        self.prune_ids, self.prune_weights = prune_ids, prune_weights


def _bags(sp_ids, sp_weights, csr=None, prune_ids=False, prune_weights=False) -> _Bags:
    """A 2-D SparseTensor or RaggedTensor of ids (and weights) as _Bags; ``csr`` defaults to
    ``_csr``'s TF ops on the same tensors (no pruning)."""
    values, offsets, weights, checks = _csr(sp_ids, sp_weights, offsets_needed=False)
    if csr is None:
        def csr():
            v, o, w, _ = _csr(sp_ids, sp_weights)
            return v, o, w, None
    if isinstance(sp_ids, tf.RaggedTensor):
        return _Bags("ragged", [values, offsets], weights, checks, csr, prune_ids, prune_weights)
    return _Bags("sparse", [sp_ids.indices, values, sp_ids.dense_shape[0]], weights, checks, csr,
                 prune_ids, prune_weights)


def _core_body(combiner: str, weighted: bool, form: str, prune_ids: bool = False, prune_weights: bool = False):
    """The numpy_function body: TF's buffers in (as _Bags' inputs, then the weights), the core
    op's (B, D) result out."""
    from .bags import embedding_bag
    from .kernels.cpu_bags import offsets_of_rows

    def run(table, *args):
        if form == "sparse":
            indices, values, batch = args[:3]
        else:
            values, offsets = args[:2]
        weights = args[-1] if weighted else None
        keep = None
        if prune_ids and values.size and values.min() < 0:
            keep = values >= 0
        if prune_weights and weights is not None and not (weights > 0).all():
            keep = weights > 0 if keep is None else keep & (weights > 0)
        if keep is not None:
            values = values[keep]
            weights = None if weights is None else weights[keep]
        if form == "sparse":
            rows = indices[:, 0] if keep is None else indices[keep, 0]
            offsets = np.empty(int(batch) + 1, dtype=np.int64)
            bad = offsets_of_rows(rows, offsets)
            if bad >= 0:
                row = int(rows[bad])
                raise ValueError(CANONICAL_ORDER_MESSAGE if 0 <= row < int(batch) else
                                 ROW_OUTSIDE_MESSAGE.format(row=row, position=bad, batch=int(batch)))
        elif keep is not None:
            kept_before = np.concatenate([[0], np.cumsum(keep)])  # [N + 1] ids kept before each position
            offsets = kept_before[offsets]
        try:
            return embedding_bag(table, values, offsets, weights=weights, combiner=combiner)
        except IndexError as exc:  # numpy_function maps ValueError to InvalidArgumentError
            raise ValueError(str(exc)) from exc
    return run


def _native_bounds_check(table, values, offsets):
    """The core op's message for the first bad id: the id, its position in values, its bag, V."""
    return fused_tf._assert_ids_in_range(
        values, tf.shape(table, out_type=values.dtype)[0], BAG_OUT_OF_RANGE_MESSAGE,
        lambda first: {"position": first,
                       "bag": tf.searchsorted(offsets, tf.cast(first, tf.int64)[None], side="right")[0] - 1})


def _native_bag(table, values, offsets, weights, pooling: Pooling):
    """The same op in native TF ops (for export): gather, weight, segment-sum, normalise."""
    batch = tf.shape(offsets, out_type=tf.int64)[0] - 1
    rows = tf.repeat(tf.range(batch), offsets[1:] - offsets[:-1])            # [N] bag of each id
    with tf.control_dependencies([_native_bounds_check(table, values, offsets)]):
        gathered = tf.cast(tf.gather(table, values), tf.float32)            # [N][D]
    w = tf.ones_like(values, tf.float32) if weights is None else weights    # [N]
    sums = tf.math.unsorted_segment_sum(gathered * w[:, None], rows, batch)  # [B][D]
    if pooling is Pooling.SUM:
        out = sums
    else:
        norm = tf.math.unsorted_segment_sum(w if pooling is Pooling.MEAN else w * w, rows, batch)
        norm = norm if pooling is Pooling.MEAN else tf.sqrt(norm)
        out = tf.math.divide_no_nan(sums, norm[:, None])
    return tf.cast(out, table.dtype)


def _gradients(table, values, offsets, weights, pooling: Pooling, upstream):
    """d(out)/d(table) as IndexedSlices (one row per id) and d(out)/d(weights) [N].

    out_b = S_b / N_b with S_b = sum_i w_i r_i and N_b = 1 (sum), sum_i w_i (mean) or
    sqrt(sum_i w_i^2) (sqrtn): d out_b / d r_i = w_i / N_b, and
    d out_b / d w_i = (r_i - c_i out_b) / N_b with c_i = 0, 1 or w_i / N_b. A bag whose
    N_b is 0 has out_b = 0 and passes no gradient (TF's div_no_nan)."""
    batch = tf.shape(offsets, out_type=tf.int64)[0] - 1
    rows = tf.repeat(tf.range(batch), offsets[1:] - offsets[:-1])            # [N]
    w = tf.ones_like(values, tf.float32) if weights is None else weights
    if pooling is Pooling.SUM:
        norm = tf.ones([batch], tf.float32)
    elif pooling is Pooling.MEAN:
        norm = tf.math.unsorted_segment_sum(w, rows, batch)
    else:
        norm = tf.sqrt(tf.math.unsorted_segment_sum(w * w, rows, batch))
    up = tf.cast(upstream, tf.float32)                                       # [B][D]
    scale = tf.math.divide_no_nan(w, tf.gather(norm, rows))                  # [N]
    table_rows = scale[:, None] * tf.gather(up, rows)                        # [N][D]
    table_grad = tf.IndexedSlices(tf.cast(table_rows, table.dtype), values,
                                  tf.shape(table, out_type=values.dtype))
    if weights is None:
        return table_grad, None
    gathered = tf.cast(tf.gather(table, values), tf.float32)                 # [N][D]
    out = tf.math.divide_no_nan(tf.math.unsorted_segment_sum(gathered * w[:, None], rows, batch),
                                norm[:, None])
    if pooling is Pooling.SUM:
        centred = gathered
    elif pooling is Pooling.MEAN:
        centred = gathered - tf.gather(out, rows)
    else:
        centred = gathered - tf.math.divide_no_nan(w, tf.gather(norm, rows))[:, None] * tf.gather(out, rows)
    weight_grad = tf.math.divide_no_nan(tf.reduce_sum(centred * tf.gather(up, rows), axis=1),
                                        tf.gather(norm, rows))
    return table_grad, weight_grad


def _uses_compiled_kernel(table) -> bool:
    """True when the graph op runs on the host and the compiled kernel (tf_compiled.py) is
    there: then ``FusedEmbeddingBag`` runs, with no Python per call."""
    return fused_tf._runs_on_host(table) and tf_compiled.op_module() is not None


def _compiled_bag(table, bags: _Bags, bag_inputs, weight_value, pooling: Pooling):
    """The compiled kernel on the bags as _Bags hands them over (the same pruning, row
    checks and messages as the numpy_function body)."""
    if bags.form == "sparse":
        indices, values, batch = bag_inputs
    else:
        (values, indices), batch = bag_inputs, tf.zeros([], tf.int64)  # ragged: row_splits
    weighted = bool(weight_value)
    weights = weight_value[0] if weighted else tf.zeros([0], tf.float32)
    return tf_compiled.embedding_bag(table, values, indices, tf.cast(batch, tf.int64), weights,
                                     pooling.kernel_code, weighted, bags.form == "sparse",
                                     bags.prune_ids, bags.prune_weights)


def _fused_bag(table, bags: _Bags, pooling: Pooling):
    """(B, D) of the table's dtype: the core op eagerly, numpy_function in a graph, the native
    twin when traced for export; gradients for the table and the weights (through
    ``bags.csr()``'s TF ops, built only when a gradient is taken)."""
    table = read_without_copy(table)  # a variable's buffer, even after a sparse op touched it
    if table.dtype not in fused_tf.TABLE_DTYPES:
        raise checks_module.table_dtype_error(table.dtype.name)
    checks_module.check_table_shape(None if table.shape.rank is None else table.shape.as_list())
    dim = table.shape[1] if table.shape.rank == 2 else None
    exporting = not tf.executing_eagerly() and fused_tf._tracing_for_export()
    if exporting and not fused_tf._exports_compiled_ops(table):
        values, offsets, weights, _ = bags.csr()
        with tf.control_dependencies(bags.checks):
            offsets = tf.identity(offsets)
        out = _native_bag(table, values, offsets, weights, pooling)
        out.set_shape([None, dim])
        return out
    with tf.control_dependencies(bags.checks):
        bag_inputs = [tf.identity(bags.inputs[0])] + bags.inputs[1:]
    weighted = bags.weights is not None
    body = _core_body(pooling.value, weighted, bags.form, bags.prune_ids, bags.prune_weights)

    @tf.custom_gradient
    def fused(table_value, *weight_value):
        inputs = [table_value] + bag_inputs + list(weight_value)
        if tf.executing_eagerly():
            try:
                result = body(*(np.asarray(t) for t in inputs))
            except ValueError as exc:
                raise tf.errors.InvalidArgumentError(None, None, str(exc)) from exc
            out = tf.convert_to_tensor(result, dtype=table_value.dtype)
        elif exporting or _uses_compiled_kernel(table_value):
            out = _compiled_bag(table_value, bags, bag_inputs, weight_value, pooling)
        else:  # a Python body: refuses to be saved (tf.py's export guard)
            with tf.control_dependencies([tf.identity(fused_tf.export_guard().resource_handle)]):
                out = tf.numpy_function(body, inputs, table_value.dtype, stateful=False)
        out.set_shape([None, dim])

        def grad(upstream):
            values, offsets, weights, kept = bags.csr()
            table_grad, weight_grad = _gradients(table_value, values, offsets, weights, pooling, upstream)
            if not weighted:
                return table_grad
            if kept is not None:  # pruned weights get none
                weight_grad = tf.scatter_nd(kept[:, None], weight_grad,
                                            tf.shape(weight_value[0], out_type=tf.int64))
            return table_grad, weight_grad
        return out, grad

    return fused(table, bags.weights) if weighted else fused(table)


def embedding_lookup_sparse(params, sp_ids, sp_weights=None, combiner="mean", max_norm=None, name=None,
                            allow_fast_lookup=False):
    """Fused ``tf.nn.embedding_lookup_sparse`` for one table.

    Args:
      params: (V, D) float32, float16 or bfloat16 tensor or tf.Variable. A list of tables
        or a PartitionedVariable runs TF's own op.
      sp_ids: 2-D ``tf.SparseTensor`` (canonical order) or ``tf.RaggedTensor`` of int32 /
        int64 ids in [0, V); row b's ids are bag b.
      sp_weights: None, or per-id float weights of the same kind and layout as ``sp_ids``.
      combiner: "mean" (weighted sum / sum of weights), "sum", or "sqrtn" (weighted sum /
        sqrt of the sum of squared weights), TF's definitions.
      max_norm: not fused: anything but None runs TF's own op.
      allow_fast_lookup: accepted for TF's signature; the fused op is always the fast path.

    Returns:
      (B, D) tensor of the table's dtype (accumulated in float32), B = sp_ids' rows; a row
      without ids gives zeros.
    """
    del allow_fast_lookup
    pooling = Pooling.of(combiner or "mean")
    if tf_sharded.is_sharded(params) and max_norm is None:
        return tf_sharded.embedding_lookup_sparse(params, sp_ids, sp_weights, combiner, name)
    if not _is_single_table(params) or max_norm is not None:
        log.debug("embedding_lookup_sparse: several tables or max_norm: TF's own op runs")
        return tf.nn.embedding_lookup_sparse(params, sp_ids, sp_weights, combiner=combiner,
                                             max_norm=max_norm, name=name)
    with tf.name_scope(name or "fused_embedding_lookup_sparse"):
        return _fused_bag(params, _bags(sp_ids, sp_weights), pooling)


def safe_embedding_lookup_sparse(embedding_weights, sparse_ids, sparse_weights=None, combiner="mean",
                                 default_id=None, max_norm=None, name=None, allow_fast_lookup=False):
    """Fused ``tf.nn.safe_embedding_lookup_sparse`` for one table: ids < 0 are dropped, and
    (for "mean" and "sqrtn") so are weights <= 0, as TF does; a row left without ids gives
    ``default_id``'s row (weight 1) or, with ``default_id=None``, zeros.

    Args as ``embedding_lookup_sparse`` (``embedding_weights`` the table, ``sparse_ids`` /
    ``sparse_weights`` 2-D SparseTensor or RaggedTensor); ``default_id``: None or an id in [0, V).
    Returns (B, D) of the table's dtype.
    """
    del allow_fast_lookup
    pooling = Pooling.of(combiner or "mean")
    if tf_sharded.is_sharded(embedding_weights) and max_norm is None:
        return tf_sharded.safe_embedding_lookup_sparse(embedding_weights, sparse_ids, sparse_weights,
                                                       combiner, default_id, name)
    if not _is_single_table(embedding_weights) or max_norm is not None:
        log.debug("safe_embedding_lookup_sparse: several tables or max_norm: TF's own op runs")
        return tf.nn.safe_embedding_lookup_sparse(embedding_weights, sparse_ids, sparse_weights,
                                                  combiner=combiner, default_id=default_id,
                                                  max_norm=max_norm, name=name)
    with tf.name_scope(name or "fused_safe_embedding_lookup_sparse"):
        if not isinstance(sparse_ids, (tf.SparseTensor, tf.RaggedTensor)):
            raise TypeError(f"sparse_ids must be a tf.SparseTensor or tf.RaggedTensor, got "
                            f"{type(sparse_ids).__name__}")
        prune_weights = sparse_weights is not None and pooling is not Pooling.SUM

        def pruned():
            """TF's pruning in TF ops: (ids, weights) SparseTensors, and the positions kept."""
            ids = sparse_ids.to_sparse() if isinstance(sparse_ids, tf.RaggedTensor) else sparse_ids
            weights = sparse_weights
            if isinstance(weights, tf.RaggedTensor):
                weights = weights.to_sparse()
            keep = ids.values >= 0
            if prune_weights:
                keep = tf.logical_and(keep, weights.values > 0)
            kept = tf.where(keep)[:, 0]
            ids = tf.sparse.retain(ids, keep)
            weights = None if weights is None else tf.sparse.retain(weights, keep)
            return ids, weights, kept

        if default_id is None:
            # The body drops what TF's pruning drops, in place of retain's copies of the
            # indices; an empty row gives zeros, as TF's does with no default_id.
            def csr():
                ids, weights, kept = pruned()
                values, offsets, weights, _ = _csr(ids, weights)
                return values, offsets, weights, kept
            return _fused_bag(embedding_weights, _bags(sparse_ids, sparse_weights, csr, prune_ids=True,
                                                       prune_weights=prune_weights), pooling)
        ids, weights, _ = pruned()
        ids, _ = tf.sparse.fill_empty_rows(ids, tf.cast(default_id, ids.dtype))
        if weights is not None:
            weights, _ = tf.sparse.fill_empty_rows(weights, tf.cast(1.0, weights.dtype))
        return _fused_bag(embedding_weights, _bags(ids, weights), pooling)
