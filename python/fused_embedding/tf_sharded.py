"""Row-sharded tables: each shard pools its own rows where they live; only pooled partials cross.

A table too large for one host is a ``ShardedVariable`` (``ParameterServerStrategy``
with a ``variable_partitioner``) or a plain list of row-sharded variables (TF's
"div" partitioning, as ``tf.nn.embedding_lookup`` takes them). Shard ``s`` holds the
contiguous global rows ``[offsets[s], offsets[s + 1])``; the offsets are read from the
shards' own static row counts, so the uneven shards every partitioner makes (the
first ``V % S`` shards one row longer, TF's "div" layout) and any other contiguous
split route correctly. (TF's own lookup on a plain list assumes "div" sizes; for
lists that have them, as TF's partitioners make them, both agree.)

Per call, for S shards (B bags, N ids, D columns):

- routing, on the caller (the worker): every id is checked against the global V
  (the unsharded op's ``InvalidArgumentError``, naming the global id, its position
  and V); the ids each shard holds are picked out, made local (``id - offsets[s]``),
  and given CSR row splits over the same B bags (``[B + 1]``: a bag's ids on that
  shard);
- on each shard's device (``with tf.device(shard.device)``): the weighted SUM of
  its rows per bag, ``[B][D]`` (the compiled ``FusedEmbeddingBag`` kernel,
  ``combiner="sum"``, where it is built; else TF's gather and segment sum there,
  which still leaves the ``[N_s][D]`` rows on the shard). Axis 2 (per-position row
  means): each shard sends the mean of each of its ids' rows, ``[N_s]`` scalars;
- combine, on the caller: the partial sums added, then normalised by what the
  caller already knows from the ids and weights (the count of counted ids, the sum
  of weights or the square root of the sum of their squares), so counts never
  cross; an empty bag gives zeros, as the unsharded op.

What crosses from the parameter servers per call: ``S * B * D`` partial sums (axis 1,
bags) or ``N`` row means (axis 2), against ``N * D`` gathered rows for
``tf.nn.embedding_lookup`` on the same ShardedVariable. What goes to them: each
shard's local ids and its ``B + 1`` row splits (and weights).

Gradients: per shard, ``IndexedSlices`` of the shard's shape (one row per routed id,
``weight * upstream / normaliser``), as ``tf.nn.embedding_lookup`` gives each shard;
per-id weights get theirs (each shard sends ``r_i . upstream_b``, one scalar an id).

The shards' partial sums are in the table's dtype (the compiled kernel's output):
float32 tables get the unsharded op's float32 accumulation; float16 / bfloat16 add one
rounding per shard. When a graph is traced for export (``tf.saved_model.save``,
``native_ops()``), the same routing is written with TF's gather and segment sum only,
and without device scopes: TF saves a ShardedVariable as one full-shape variable.
"""
from __future__ import annotations

import contextlib

import tensorflow as tf

from .backends import BAG_OUT_OF_RANGE_MESSAGE, OUT_OF_RANGE_MESSAGE
from .semantics import EMPTY_BAG_VALUE, PADDING_ID, Axis
from .spec import Pooling
from .tf_variables import read_without_copy


def _sharded_variable_class():
    from tensorflow.python.distribute.sharded_variable import ShardedVariable  # not in TF's public API
    return ShardedVariable


def is_sharded(table) -> bool:
    """A ShardedVariable, or a non-empty list / tuple of tf.Variables (row shards)."""
    if isinstance(table, _sharded_variable_class()):
        return True
    return (isinstance(table, (list, tuple)) and len(table) > 0
            and all(isinstance(shard, tf.Variable) for shard in table))


class _Shards:
    """The row shards of a table: ``variables`` (S), ``offsets`` (S + 1 Python ints, the
    first global row of each shard, then V), ``vocab`` (V), ``dim`` (D), ``dtype``."""

    def __init__(self, table):
        from . import tf as fused_tf
        variables = list(table.variables if isinstance(table, _sharded_variable_class()) else table)
        shapes = [shard.shape for shard in variables]
        for i, (shard, shape) in enumerate(zip(variables, shapes)):
            if shape.rank != 2 or shape[0] is None or shape[1] is None:
                raise ValueError(f"row shards must be (rows, D) variables of known shape, got shard {i} "
                                 f"of shape {shape}")
            if shard.dtype not in fused_tf.TABLE_DTYPES:
                raise TypeError(f"shard {i}: table must be float32, float16 or bfloat16, got "
                                f"{shard.dtype.name}")
        dims = {int(shape[1]) for shape in shapes}
        dtypes = {shard.dtype for shard in variables}
        if len(dims) != 1 or len(dtypes) != 1:
            raise ValueError(f"row shards must share D and dtype, got shapes {[tuple(s) for s in shapes]} "
                             f"and dtypes {sorted(d.name for d in dtypes)}")
        (self.dim,), (self.dtype,) = dims, dtypes
        if self.dim == 0:
            raise ValueError("table must have at least one column (D >= 1), got D = 0")
        self.variables = variables
        self.offsets = [0]
        for shape in shapes:
            self.offsets.append(self.offsets[-1] + int(shape[0]))
        self.vocab = self.offsets[-1]

    def route(self, flat_ids, counted=None):
        """Per shard: (in-shard mask [N] bool, local ids [N_s] of the ids' dtype) for flat ids
        [N] already bounds-checked; ``counted`` [N] bool leaves positions out (padding)."""
        routes = []
        for s in range(len(self.variables)):
            lo, hi = self.offsets[s], self.offsets[s + 1]
            inside = tf.logical_and(flat_ids >= tf.cast(lo, flat_ids.dtype),
                                    flat_ids < tf.cast(hi, flat_ids.dtype))
            if counted is not None:
                inside = tf.logical_and(inside, counted)
            routes.append((inside, tf.boolean_mask(flat_ids, inside) - tf.cast(lo, flat_ids.dtype)))
        return routes


def _local_splits(inside, splits):
    """Row splits [B + 1] int64 of the ids of each bag that ``inside`` [N] keeps, for bags
    whose ids are ``splits`` [B + 1] int64 over all N."""
    kept_before = tf.concat([tf.zeros([1], tf.int64), tf.cumsum(tf.cast(inside, tf.int64))], 0)  # [N + 1]
    return tf.gather(kept_before, splits)


def _tracing_for_export() -> bool:
    from . import tf as fused_tf
    return not tf.executing_eagerly() and fused_tf._tracing_for_export()


def _placed_on(shard):
    """The shard's device scope, where its partial is computed; none when a graph is traced
    for export (the SavedModel holds the table as one variable and the served graph runs
    on whichever host loads it)."""
    return contextlib.nullcontext() if _tracing_for_export() else tf.device(shard.device)


def _uses_compiled_kernel() -> bool:
    """The compiled bags kernel (tf_compiled.py) runs on the shards when it is built and the
    graph is not traced for export. In a multi-process cluster every parameter server
    must have loaded the same library (``import fused_embedding.tf`` and build it there)."""
    from . import tf_compiled
    return not _tracing_for_export() and tf_compiled.op_module() is not None


def _shard_sum(shard_value, local, local_splits, weights, compiled: bool):
    """[B][D] of the shard's dtype: per bag, the (weighted) sum of the shard's rows ``local``
    [N_s] (bags given by ``local_splits`` [B + 1] int64; ``weights`` [N_s] float32 or None).
    Runs in the caller's device scope (the shard's)."""
    if compiled:
        from . import tf_compiled
        return tf_compiled.embedding_bag(
            shard_value, local, local_splits, tf.zeros([], tf.int64),
            tf.zeros([0], tf.float32) if weights is None else weights, Pooling.SUM.kernel_code,
            weights is not None, False, False, False)
    batch = tf.shape(local_splits, out_type=tf.int64)[0] - 1
    bag_of = tf.repeat(tf.range(batch), local_splits[1:] - local_splits[:-1])      # [N_s]
    rows = tf.cast(tf.gather(shard_value, local), tf.float32)                       # [N_s][D], stays here
    if weights is not None:
        rows = rows * weights[:, None]
    return tf.cast(tf.math.unsorted_segment_sum(rows, bag_of, batch), shard_value.dtype)


def _shard_partial(shard, local, local_splits, local_weights, compiled):
    """One shard's [B][D] partial sum, computed on its device, with its gradient: the shard
    gets IndexedSlices (one row per routed id: weight * upstream of its bag), the weights
    r_i . upstream_b (one scalar per id, computed on the shard)."""
    with _placed_on(shard):
        shard_value = read_without_copy(shard)  # read where it lives (aliases the buffer)
    shard_shape = tf.shape(shard_value, out_type=local.dtype)

    def bag_of():
        batch = tf.shape(local_splits, out_type=tf.int64)[0] - 1
        return tf.repeat(tf.range(batch), local_splits[1:] - local_splits[:-1])   # [N_s]

    if local_weights is None:
        @tf.custom_gradient
        def partial(table):
            with _placed_on(shard):
                out = _shard_sum(table, local, local_splits, None, compiled)

            def grad(upstream):                                                   # [B][D]
                return tf.IndexedSlices(tf.gather(tf.cast(upstream, table.dtype), bag_of()), local,
                                        shard_shape)
            return out, grad
        return partial(shard_value)

    @tf.custom_gradient
    def weighted_partial(table, weights):
        with _placed_on(shard):
            out = _shard_sum(table, local, local_splits, weights, compiled)

        def grad(upstream):
            up = tf.gather(tf.cast(upstream, tf.float32), bag_of())              # [N_s][D]
            table_rows = tf.cast(weights[:, None] * up, table.dtype)
            with _placed_on(shard):  # r_i . up_b: the rows stay on the shard, N_s scalars cross
                weight_grad = tf.reduce_sum(tf.cast(tf.gather(table, local), tf.float32) * up, axis=1)
            return tf.IndexedSlices(table_rows, local, shard_shape), weight_grad
        return out, grad
    return weighted_partial(shard_value, local_weights)


def _partial_sums(shards: _Shards, flat_ids, splits, weights, counted=None):
    """[B][D] float32: the sum over shards of each shard's weighted per-bag sums, each shard's
    computed on its device. flat_ids [N] (checked in range), splits [B + 1] int64, weights
    [N] float32 or None, counted [N] bool or None (positions left out)."""
    compiled = _uses_compiled_kernel()
    total = None
    for shard, (inside, local) in zip(shards.variables, shards.route(flat_ids, counted)):
        local_weights = None if weights is None else tf.boolean_mask(weights, inside)
        partial = tf.cast(_shard_partial(shard, local, _local_splits(inside, splits), local_weights,
                                         compiled), tf.float32)
        total = partial if total is None else total + partial
    return total


def _row_means(shards: _Shards, flat_ids, counted):
    """[N] float32: the mean over D of each id's row, computed on the shard that holds it
    (N_s scalars cross per shard); 0 where ``counted`` [N] is False."""
    total = tf.zeros(tf.shape(flat_ids), tf.float32)
    positions_of = tf.range(tf.shape(flat_ids, out_type=tf.int64)[0])
    for shard, (inside, local) in zip(shards.variables, shards.route(flat_ids, counted)):
        with _placed_on(shard):
            means = tf.reduce_mean(tf.cast(tf.gather(shard, local), tf.float32), axis=1)   # [N_s]
        positions = tf.boolean_mask(positions_of, inside)
        total = total + tf.scatter_nd(positions[:, None], means, tf.shape(flat_ids, out_type=tf.int64))
    return total


def _check_ids(ids):
    ids = tf.convert_to_tensor(ids)
    if ids.dtype not in (tf.int32, tf.int64):
        kind = "floating point" if ids.dtype.is_floating else ids.dtype.name
        raise TypeError(f"ids must be int32 or int64, got {kind} ({ids.dtype.name})")
    return ids


@tf.autograph.experimental.do_not_convert  # graph building in plain Python
def embedding_mean(table, ids, axis, mask_zero, backend, name):
    """``fused_embedding.tf.embedding_mean`` on a row-sharded table (module docstring).

    Args:
      table: a ShardedVariable or a list of (V_s, D) variables (float32, float16,
        bfloat16), rows split contiguously in order.
      ids: (B, L) int32 or int64 global ids in [0, V), V = sum of V_s.
      axis: ``Axis.SEQUENCE`` -> (B, D), ``Axis.EMBEDDING`` -> (B, L).
      mask_zero: global id 0 is padding (left out of means; 0 at its positions on axis 2).
      backend: checked for a valid name; the shards run the compiled kernel or TF ops.
      name: an optional name scope.

    Returns:
      (B, D) or (B, L) of the table's dtype. InvalidArgumentError when it runs, for an id
      outside [0, V), naming the global id, its (row, column) and the global V.
    """
    from . import api, checks
    from . import tf as fused_tf
    if backend is not None:
        api.check_backend_name(backend)
    checks.check_mask_zero(mask_zero)
    mask_zero = bool(mask_zero)
    shards = _Shards(table)
    with tf.name_scope(name or "fused_embedding_mean_sharded"):
        ids = _check_ids(ids)
        checks.check_ids_shape(None if ids.shape.rank is None else ids.shape.as_list())
        batch, length = tf.shape(ids, out_type=tf.int64)[0], tf.shape(ids, out_type=tf.int64)[1]
        flat = tf.reshape(ids, [-1])                                                   # [B*L]
        length_of_ids = tf.cast(length, ids.dtype)
        check = fused_tf._assert_ids_in_range(
            flat, tf.constant(shards.vocab, ids.dtype), OUT_OF_RANGE_MESSAGE,
            lambda first: {"row": first // length_of_ids, "col": first % length_of_ids})
        with tf.control_dependencies([check]):
            flat = tf.identity(flat)
        counted = tf.not_equal(flat, tf.constant(PADDING_ID, ids.dtype)) if mask_zero else None
        if axis is Axis.SEQUENCE:
            splits = tf.range(batch + 1, dtype=tf.int64) * length                      # [B + 1]
            sums = _partial_sums(shards, flat, splits, None, counted)                  # [B][D]
            if counted is None:
                counts = tf.fill([batch], tf.cast(length, tf.float32))
            else:
                counts = tf.reduce_sum(tf.cast(tf.reshape(counted, tf.shape(ids)), tf.float32), axis=1)
            out = tf.where(counts[:, None] > 0, sums / tf.maximum(counts, 1.0)[:, None], EMPTY_BAG_VALUE)
            out = tf.cast(out, shards.dtype)
            out.set_shape([ids.shape[0], shards.dim])
            return out
        out = tf.cast(tf.reshape(_row_means(shards, flat, counted), tf.shape(ids)), shards.dtype)
        out.set_shape(ids.shape)
        return out


def _bag_lookup(shards: _Shards, values, splits, weights, pooling: Pooling):
    """[B][D] of the table's dtype: the combiner over CSR bags (values [N] global ids,
    splits [B + 1] int64, weights [N] float32 or None), pooled shard by shard."""
    from . import tf as fused_tf
    check = fused_tf._assert_ids_in_range(
        values, tf.constant(shards.vocab, values.dtype), BAG_OUT_OF_RANGE_MESSAGE,
        lambda first: {"position": first,
                       "bag": tf.searchsorted(splits, tf.cast(first, tf.int64)[None], side="right")[0] - 1})
    with tf.control_dependencies([check]):
        values = tf.identity(values)
    sums = _partial_sums(shards, values, splits, weights)                             # [B][D]
    if pooling is Pooling.SUM:
        out = sums
    else:
        batch = tf.shape(splits, out_type=tf.int64)[0] - 1
        bag_of = tf.repeat(tf.range(batch), splits[1:] - splits[:-1])                # [N]
        w = tf.ones(tf.shape(values), tf.float32) if weights is None else weights
        norm = tf.math.unsorted_segment_sum(w if pooling is Pooling.MEAN else w * w, bag_of, batch)
        norm = norm if pooling is Pooling.MEAN else tf.sqrt(norm)
        out = tf.math.divide_no_nan(sums, norm[:, None])
    out = tf.cast(out, shards.dtype)
    out.set_shape([None, shards.dim])
    return out


@tf.autograph.experimental.do_not_convert
def embedding_lookup_sparse(params, sp_ids, sp_weights, combiner, name):
    """``fused_embedding.tf.embedding_lookup_sparse`` on a row-sharded table.

    params: a ShardedVariable or a list of (V_s, D) variables; sp_ids: a 2-D SparseTensor
    (canonical order) or RaggedTensor of int32 / int64 global ids; sp_weights: None or
    float weights of the same layout. Returns (B, D) of the table's dtype, B = sp_ids'
    rows (a bag with no ids, or a zero normaliser, gives zeros).
    """
    from .tf_bags import _csr
    pooling = Pooling.of(combiner or "mean")
    shards = _Shards(params)
    with tf.name_scope(name or "fused_embedding_lookup_sparse_sharded"):
        values, splits, weights, checks = _csr(sp_ids, sp_weights)
        with tf.control_dependencies(checks):
            splits = tf.identity(splits)
        return _bag_lookup(shards, values, splits, weights, pooling)


@tf.autograph.experimental.do_not_convert
def safe_embedding_lookup_sparse(embedding_weights, sparse_ids, sparse_weights, combiner, default_id, name):
    """``fused_embedding.tf.safe_embedding_lookup_sparse`` on a row-sharded table: ids < 0
    dropped, weights <= 0 dropped (for "mean" and "sqrtn", as the unsharded op does), an
    empty row gives ``default_id``'s row (weight 1) or zeros. Args as
    ``embedding_lookup_sparse``; ``default_id`` None or a global id in [0, V)."""
    pooling = Pooling.of(combiner or "mean")
    if not isinstance(sparse_ids, (tf.SparseTensor, tf.RaggedTensor)):
        raise TypeError(f"sparse_ids must be a tf.SparseTensor or tf.RaggedTensor, got "
                        f"{type(sparse_ids).__name__}")
    with tf.name_scope(name or "fused_safe_embedding_lookup_sparse_sharded"):
        ids = sparse_ids.to_sparse() if isinstance(sparse_ids, tf.RaggedTensor) else sparse_ids
        weights = sparse_weights.to_sparse() if isinstance(sparse_weights, tf.RaggedTensor) else sparse_weights
        keep = ids.values >= 0
        if weights is not None and pooling is not Pooling.SUM:
            keep = tf.logical_and(keep, weights.values > 0)
        ids = tf.sparse.retain(ids, keep)
        weights = None if weights is None else tf.sparse.retain(weights, keep)
        if default_id is not None:
            ids, _ = tf.sparse.fill_empty_rows(ids, tf.cast(default_id, ids.dtype))
            if weights is not None:
                weights, _ = tf.sparse.fill_empty_rows(weights, tf.cast(1.0, weights.dtype))
        return embedding_lookup_sparse(embedding_weights, ids, weights, pooling.value, None)
