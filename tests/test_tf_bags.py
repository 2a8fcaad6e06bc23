"""The fused drop-ins for TF's sparse lookups against TF's own ops and the float64 reference.

Every combiner, with and without weights, on SparseTensor and RaggedTensor ids, eagerly,
in tf.function and in the export twin; gradients under tf.GradientTape (the table's and
the weights') against TF's; the safe op's pruning and default_id; bad inputs.
"""
from unittest import mock

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import fused_embedding.tf as fused_tf  # noqa: E402
from fused_embedding import tf_bags, tf_compiled  # noqa: E402
from fused_embedding.reference import embedding_bag_reference  # noqa: E402
from fused_embedding.tf import embedding_lookup_sparse, safe_embedding_lookup_sparse  # noqa: E402
from fused_embedding.validation import assert_close, assert_close_to_framework  # noqa: E402

VOCAB, DIM = 300, 24
COMBINERS = ["mean", "sum", "sqrtn"]
# tf.function: the compiled kernel (FusedEmbeddingBag) where it builds, else numpy_function;
# tf.function+numpy_function: the numpy_function body, whatever is built.
MODES = ["eager", "tf.function", "tf.function+numpy_function", "export-twin"]


def random_bags(rng, batch=9, max_length=7, empty_rows=False, id_dtype=np.int64):
    """(table [V][D] float32, lengths [B], values [N], weights [N] float32 in [0.1, 2))."""
    table = rng.standard_normal((VOCAB, DIM), dtype=np.float32)
    low = 0 if empty_rows else 1
    lengths = rng.integers(low, max_length + 1, size=batch)
    if empty_rows:
        lengths[0] = 0
    values = rng.integers(0, VOCAB, size=int(lengths.sum())).astype(id_dtype)
    weights = rng.uniform(0.1, 2.0, size=values.shape[0]).astype(np.float32)
    return table, lengths, values, weights


def as_kind(kind, lengths, flat):
    ragged = tf.RaggedTensor.from_row_lengths(flat, lengths)
    return ragged if kind == "ragged" else ragged.to_sparse()


def offsets_of(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def run(mode, fn, *args):
    if mode == "eager":
        return fn(*args)
    if mode == "tf.function":
        return tf.function(fn)(*args)
    if mode == "tf.function+numpy_function":
        with mock.patch.object(tf_bags, "_uses_compiled_kernel", lambda table: False):
            return tf.function(fn)(*args)
    with fused_tf.native_ops():
        return tf.function(fn)(*args)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["sparse", "ragged"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("combiner", COMBINERS)
def test_matches_tf_and_the_reference(rng, mode, kind, weighted, combiner):
    table, lengths, values, weights = random_bags(rng)
    ids = as_kind(kind, lengths, values)
    sp_weights = as_kind(kind, lengths, weights) if weighted else None
    ours = run(mode, lambda t, i, w: embedding_lookup_sparse(t, i, w, combiner=combiner),
               tf.constant(table), ids, sp_weights)
    theirs = tf.nn.embedding_lookup_sparse(tf.constant(table), ids, sp_weights, combiner=combiner)
    reference = embedding_bag_reference(table, values, offsets_of(lengths),
                                        weights if weighted else None, combiner)
    assert ours.shape == (len(lengths), DIM) and ours.dtype == tf.float32
    assert_close(np.asarray(ours), reference, np.float32)
    assert_close_to_framework(np.asarray(ours), np.asarray(theirs), reference, np.float32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("combiner", COMBINERS)
def test_empty_rows_give_zeros_and_every_row_is_kept(rng, mode, combiner):
    """TF's unsafe op assumes no empty rows (and drops trailing ones); ours gives zeros."""
    table, lengths, values, weights = random_bags(rng, empty_rows=True)
    lengths[-1] = 0  # a trailing empty row too
    values = values[:int(lengths.sum())]
    out = run(mode, lambda t, i: embedding_lookup_sparse(t, i, combiner=combiner), tf.constant(table),
              as_kind("sparse", lengths, values))
    assert out.shape == (len(lengths), DIM)
    np.testing.assert_array_equal(np.asarray(out)[[0, -1]], 0.0)
    assert_close(np.asarray(out), embedding_bag_reference(table, values, offsets_of(lengths), None, combiner),
                 np.float32)


@pytest.mark.parametrize("kind", ["sparse", "ragged"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("combiner", COMBINERS)
def test_gradients_equal_tfs(rng, kind, weighted, combiner):
    table, lengths, values, weights = random_bags(rng)
    ids = as_kind(kind, lengths, values)
    upstream = tf.constant(rng.standard_normal((len(lengths), DIM), dtype=np.float32))

    def gradients(lookup):
        variable = tf.Variable(table)
        w = tf.Variable(weights)
        with tf.GradientTape() as tape:
            sp_weights = None
            if weighted:
                sp_weights = (tf.RaggedTensor.from_row_lengths(w, lengths) if kind == "ragged"
                              else tf.SparseTensor(ids.indices, w, ids.dense_shape))
            loss = tf.reduce_sum(lookup(variable, ids, sp_weights, combiner=combiner) * upstream)
        table_grad, weight_grad = tape.gradient(loss, [variable, w])
        assert isinstance(table_grad, tf.IndexedSlices)
        return tf.convert_to_tensor(table_grad).numpy(), None if weight_grad is None else weight_grad.numpy()

    ours_table, ours_weights = gradients(embedding_lookup_sparse)
    theirs_table, theirs_weights = gradients(tf.nn.embedding_lookup_sparse)
    np.testing.assert_allclose(ours_table, theirs_table, rtol=1e-5, atol=1e-6)
    if weighted:
        np.testing.assert_allclose(ours_weights, theirs_weights, rtol=1e-4, atol=1e-5)
    else:
        assert ours_weights is None and theirs_weights is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["sparse", "ragged"])
@pytest.mark.parametrize("default_id", [None, 5])
@pytest.mark.parametrize("combiner", COMBINERS)
def test_safe_lookup_matches_tf(rng, mode, kind, default_id, combiner):
    """Ids < 0 dropped; weights <= 0 dropped (mean, sqrtn); empty rows: default_id's row or zeros."""
    table, lengths, values, weights = random_bags(rng, empty_rows=True)
    values[::4] = -1
    weights[1::5] = 0.0
    weights[2::7] = -0.5
    ids = as_kind(kind, lengths, values)
    sp_weights = as_kind(kind, lengths, weights)
    ours = run(mode, lambda t, i, w: safe_embedding_lookup_sparse(t, i, w, combiner=combiner,
                                                                  default_id=default_id),
               tf.constant(table), ids, sp_weights)
    sparse_ids = ids if kind == "sparse" else ids.to_sparse()
    sparse_weights = sp_weights if kind == "sparse" else sp_weights.to_sparse()
    theirs = tf.nn.safe_embedding_lookup_sparse(tf.constant(table), sparse_ids, sparse_weights,
                                                combiner=combiner, default_id=default_id)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_a_bad_id_names_the_id_its_position_its_bag_and_v(rng, mode):
    table, lengths, values, _ = random_bags(rng, batch=4, max_length=3)
    values[int(lengths[0])] = VOCAB + 2  # the first id of bag 1
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"id {VOCAB + 2} at values\[{int(lengths[0])}\] \(bag 1\) is out of range "
                             rf"for a table of {VOCAB} rows"):
        run(mode, lambda t, i: embedding_lookup_sparse(t, i), tf.constant(table),
            as_kind("ragged", lengths, values))


def test_sparse_ids_out_of_canonical_order_are_refused(rng):
    table = rng.standard_normal((VOCAB, DIM), dtype=np.float32)
    ids = tf.SparseTensor(indices=[[1, 0], [0, 0]], values=tf.constant([3, 4], tf.int64), dense_shape=[2, 1])
    with pytest.raises(tf.errors.InvalidArgumentError, match="canonical row-major order"):
        embedding_lookup_sparse(tf.constant(table), ids)


def test_bad_arguments_say_what_was_expected(rng):
    table = tf.constant(rng.standard_normal((VOCAB, DIM), dtype=np.float32))
    ragged = tf.ragged.constant([[1, 2], [3]], dtype=tf.int64)
    with pytest.raises(TypeError, match="sp_ids must be a tf.SparseTensor or tf.RaggedTensor, got EagerTensor"):
        embedding_lookup_sparse(table, tf.constant([[1, 2]]))
    with pytest.raises(ValueError, match="combiner must be one of"):
        embedding_lookup_sparse(table, ragged, combiner="max")
    with pytest.raises(TypeError, match="sp_weights must be a RaggedTensor like sp_ids"):
        embedding_lookup_sparse(table, ragged, ragged.to_sparse())
    with pytest.raises(TypeError, match="sp_ids must hold int32 or int64 ids, got float32"):
        embedding_lookup_sparse(table, tf.ragged.constant([[1.0]], dtype=tf.float32))
    with pytest.raises(TypeError, match="table must be float32, float16 or bfloat16, got float64"):
        embedding_lookup_sparse(tf.cast(table, tf.float64), ragged)


def test_several_tables_or_max_norm_run_tfs_own_op(rng):
    table, lengths, values, _ = random_bags(rng)
    ids = as_kind("sparse", lengths, values)  # TF's ragged dispatch can't take a list of tables
    halves = [tf.constant(table[:VOCAB // 2]), tf.constant(table[VOCAB // 2:])]
    np.testing.assert_allclose(np.asarray(embedding_lookup_sparse(halves, ids)),
                               np.asarray(tf.nn.embedding_lookup_sparse(halves, ids, None)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(embedding_lookup_sparse(tf.constant(table), ids, max_norm=0.5)),
                               np.asarray(tf.nn.embedding_lookup_sparse(tf.constant(table), ids, None, max_norm=0.5)),
                               rtol=1e-6)


def graph_op_types(fn, *args):
    return {op.type for op in tf.function(fn).get_concrete_function(*args).graph.get_operations()}


@pytest.mark.skipif("tf_compiled.op_module() is None",
                    reason="the compiled TF kernel can't be built here (no compiler or TF headers)")
@pytest.mark.parametrize("kind", ["ragged", "sparse"])
@pytest.mark.parametrize("safe", [False, True], ids=["lookup", "safe-lookup"])
def test_graph_runs_the_compiled_kernel_on_every_element(rng, kind, safe):
    """In tf.function on the host the bags run as FusedEmbeddingBag, no Python op, and it
    writes every element of its (poisoned) output: weighted, with ids < 0 and weights <= 0
    for the safe lookup to prune."""
    table, lengths, values, weights = random_bags(rng, batch=40, max_length=9, empty_rows=True)
    if safe:
        values[::7] = -1
        weights[::5] = 0.0
    ids, sp_weights = as_kind(kind, lengths, values), as_kind(kind, lengths, weights)
    lookup = safe_embedding_lookup_sparse if safe else embedding_lookup_sparse
    fn = lambda t, i, w: lookup(t, i, w, combiner="mean")  # noqa: E731
    types = graph_op_types(fn, tf.constant(table), ids, sp_weights)
    assert "FusedEmbeddingBag" in types and not types & {"PyFunc", "PyFuncStateless", "EagerPyFunc"}, types
    tf_compiled.poison_outputs(float("nan"))  # an element the kernel skips stays NaN
    try:
        out = tf.function(fn)(tf.constant(table), ids, sp_weights).numpy()
    finally:
        tf_compiled.poison_outputs(None)
    assert not np.isnan(out).any()
    expected = tf.nn.safe_embedding_lookup_sparse(tf.constant(table), ids.to_sparse() if kind == "ragged" else ids,
                                                  sp_weights.to_sparse() if kind == "ragged" else sp_weights,
                                                  combiner="mean") if safe else None
    if expected is not None:
        assert_close(out, expected.numpy(), np.float32)
    else:
        keep = np.ones(values.shape[0], bool)
        assert_close(out, embedding_bag_reference(table, values, offsets_of(lengths), weights, "mean"), np.float32)
        assert keep.all()
