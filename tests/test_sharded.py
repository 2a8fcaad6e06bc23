"""Row-sharded tables (tf_sharded) on local variables: a list of row shards and a
ShardedVariable built from them give the unsharded op's results (float64 reference) and
tf.nn.embedding_lookup's per-shard gradients, and are never concatenated.
(On an in-process ParameterServerStrategy cluster: test_sharded_cluster.py.)"""
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import fused_embedding.tf as fused_tf  # noqa: E402
from fused_embedding.reference import embedding_mean_reference  # noqa: E402
from fused_embedding.validation import assert_close  # noqa: E402


def _shards(table, sizes):
    bounds = np.cumsum([0, *sizes])
    return [tf.Variable(table[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _sharded_variable(shards):
    from tensorflow.python.distribute.sharded_variable import ShardedVariable
    return ShardedVariable(shards)


@pytest.mark.parametrize("kind", ["list", "sharded_variable"])
@pytest.mark.parametrize("axis", [1, 2])
@pytest.mark.parametrize("mask_zero", [False, True])
@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
def test_dense_matches_reference(rng, kind, axis, mask_zero, id_dtype):
    vocab, dim = 23, 5                                     # 23 over 3 shards: uneven (8, 8, 7)
    table = rng.standard_normal((vocab, dim)).astype(np.float32)
    shards = _shards(table, [8, 8, 7])
    sharded = shards if kind == "list" else _sharded_variable(shards)
    ids = rng.integers(0, vocab, (6, 9)).astype(id_dtype)
    ids[0] = 0                                             # an all-padding bag under mask_zero
    out = fused_tf.embedding_mean(sharded, ids, axis=axis, mask_zero=mask_zero).numpy()
    assert_close(out, embedding_mean_reference(table, ids, axis=axis, mask_zero=mask_zero), np.float32)


def test_bad_id_names_global_id_and_vocab(rng):
    table = rng.standard_normal((11, 4)).astype(np.float32)
    ids = rng.integers(0, 11, (3, 4)).astype(np.int32)
    ids[1, 2] = 11
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"id 11 at ids\[1, 2\].*11 rows"):
        fused_tf.embedding_mean(_shards(table, [6, 5]), ids, axis=1)


def test_gradients_equal_embedding_lookup(rng):
    table = rng.standard_normal((11, 4)).astype(np.float32)
    sharded = _sharded_variable(_shards(table, [6, 5]))
    ids = rng.integers(0, 11, (5, 7)).astype(np.int32)
    upstream = rng.standard_normal((5, 4)).astype(np.float32)

    def shard_grads(pool):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(pool() * upstream)
        return tape.gradient(loss, sharded.variables)

    ours = shard_grads(lambda: fused_tf.embedding_mean(sharded, ids, axis=1))
    theirs = shard_grads(lambda: tf.reduce_mean(tf.nn.embedding_lookup(sharded, ids), axis=1))
    for mine, tf_grad in zip(ours, theirs):
        assert isinstance(mine, tf.IndexedSlices)
        assert_close(tf.convert_to_tensor(mine).numpy(), tf.convert_to_tensor(tf_grad).numpy(), np.float32)


@pytest.mark.parametrize("combiner", ["mean", "sum", "sqrtn"])
def test_bags_match_unsharded(rng, combiner):
    table = rng.standard_normal((11, 4)).astype(np.float32)
    sharded = _sharded_variable(_shards(table, [6, 5]))
    ids = tf.ragged.constant([[1, 2, 9], [], [10, 10, 3, 0]], dtype=tf.int64)
    weights = tf.ragged.constant([[1.0, 0.5, 2.0], [], [1.0, -1.0, 2.0, 0.25]])
    for lookup, args in ((fused_tf.embedding_lookup_sparse, (ids, weights)),
                         (fused_tf.safe_embedding_lookup_sparse, (ids.to_sparse(), weights.to_sparse()))):
        ours = lookup(sharded, *args, combiner=combiner).numpy()
        unsharded = lookup(tf.constant(table), *args, combiner=combiner).numpy()
        assert_close(ours, unsharded, np.float32)


def test_shards_are_pooled_apart_never_concatenated(rng):
    """The graph of a call on a sharded table holds no ConcatV2 of the shards' rows: each
    shard's partial is computed on its own (what lets them stay on their servers)."""
    table = rng.standard_normal((11, 4)).astype(np.float32)
    sharded = _sharded_variable(_shards(table, [6, 5]))
    graph = tf.function(lambda i: fused_tf.embedding_mean(sharded, i, axis=1)).get_concrete_function(
        tf.TensorSpec([None, 4], tf.int32)).graph
    concats = [op for op in graph.get_operations() if op.type == "ConcatV2"
               and any(inp.shape.rank == 2 and inp.shape[-1] == 4 for inp in op.inputs)]
    assert not concats, [op.name for op in concats]


def test_shards_are_read_without_copy_on_read(rng):
    """A shard a sparse op has touched (tf.gather, a scatter update) is in TF's copy-on-read
    mode, where a dense read copies all of it every call: each shard is read through
    DisableCopyOnRead (read_value_no_copy), and the op still gives the right result there."""
    table = rng.standard_normal((11, 4)).astype(np.float32)
    sharded = _sharded_variable(_shards(table, [6, 5]))
    for shard in sharded.variables:
        tf.gather(shard, [0, 1])  # copy-on-read mode from here on
    fn = tf.function(lambda i: fused_tf.embedding_mean(sharded, i, axis=1))
    graph = fn.get_concrete_function(tf.TensorSpec([None, 4], tf.int32)).graph
    assert [op.type for op in graph.get_operations()].count("DisableCopyOnRead") == 2
    ids = rng.integers(0, 11, (3, 4)).astype(np.int32)
    assert_close(fn(ids).numpy(), embedding_mean_reference(table, ids), np.float32)
