"""Tables TF holds are read in place even after a sparse op has touched them (tf_variables.py):
TF's copy-on-read mode would copy the whole variable on every dense read."""
import numpy as np
import pytest

from fused_embedding.reference import embedding_mean_reference
from fused_embedding.validation import assert_close

tf = pytest.importorskip("tensorflow")
import fused_embedding.tf as fused_tf  # noqa: E402


def _ops(fn, *specs):
    return [op.type for op in fn.get_concrete_function(*specs).graph.get_operations()]


def _touched_variable(rng, shape=(13, 4)):
    """A tf.Variable of random float32 rows that a tf.gather and a scatter update have put in
    copy-on-read mode; (variable, its values now)."""
    table = rng.standard_normal(shape).astype(np.float32)
    variable = tf.Variable(table)
    tf.gather(variable, [0, 1])
    variable.scatter_add(tf.IndexedSlices(tf.ones((1, shape[1])), tf.constant([2])))
    table[2] += 1.0
    return variable, table


@pytest.mark.parametrize("axis", [1, 2])
def test_dense_op_reads_without_copy_and_sees_updates(rng, axis):
    variable, table = _touched_variable(rng)
    fn = tf.function(lambda i: fused_tf.embedding_mean(variable, i, axis=axis))
    assert "DisableCopyOnRead" in _ops(fn, tf.TensorSpec([None, 5], tf.int32))
    ids = rng.integers(0, 13, (3, 5)).astype(np.int32)
    assert_close(fn(ids).numpy(), embedding_mean_reference(table, ids, axis), np.float32)
    assert_close(fused_tf.embedding_mean(variable, ids, axis=axis).numpy(),
                 embedding_mean_reference(table, ids, axis), np.float32)


def test_sparse_drop_in_reads_without_copy(rng):
    variable, table = _touched_variable(rng)
    fn = tf.function(lambda values, splits: fused_tf.embedding_lookup_sparse(
        variable, tf.RaggedTensor.from_row_splits(values, splits), None, combiner="sum"))
    assert "DisableCopyOnRead" in _ops(fn, tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int64))
    out = fn(tf.constant([0, 2, 2, 5], tf.int64), tf.constant([0, 3, 3, 4], tf.int64)).numpy()
    expected = np.stack([table[[0, 2, 2]].sum(0), np.zeros(4, np.float32), table[5]])
    assert_close(out, expected, np.float32)


def test_quantized_variables_read_without_copy(rng):
    data = tf.Variable(rng.integers(-127, 128, (13, 6)).astype(np.int8))
    scale = tf.Variable(rng.uniform(20, 200, 13).astype(np.float32))
    tf.gather(data, [0])
    tf.gather(scale, [0])
    table = fused_tf.TFQuantizedTable.from_keras_int8(data, scale)
    fn = tf.function(lambda i: fused_tf.embedding_mean(table, i))
    assert _ops(fn, tf.TensorSpec([None, 3], tf.int32)).count("DisableCopyOnRead") == 2


@pytest.mark.parametrize("form", ["eager", "graph"])
def test_axis2_row_means_follow_sparse_updates_after_an_in_place_read(rng, form):
    """Axis 2 caches the row means of the buffer it read; read in place, that buffer is the
    variable's own. A scatter update after it must not leave stale means (TF copies a buffer
    the cache still shares before writing it), for each kind of update."""
    variable, table = _touched_variable(rng)
    op = lambda i: fused_tf.embedding_mean(variable, i, axis=2)  # noqa: E731
    op = op if form == "eager" else tf.function(op)
    ids = rng.integers(0, 13, (3, 5)).astype(np.int32)
    for step in range(4):
        assert_close(np.asarray(op(tf.constant(ids))), embedding_mean_reference(table, ids, 2), np.float32)
        row = int(ids[0, step])
        if step % 2:
            variable.scatter_update(tf.IndexedSlices(tf.fill((1, 4), 3.0), tf.constant([row])))
            table[row] = 3.0
        else:
            variable.scatter_add(tf.IndexedSlices(tf.ones((1, 4)), tf.constant([row])))
            table[row] += 1.0
