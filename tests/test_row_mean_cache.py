"""The axis-2 row-mean cache: used only for tables that can't change, rebuilt when they do."""
import numpy as np
import pytest

import fused_embedding as fe
from fused_embedding import row_mean_cache
from fused_embedding.reference import embedding_mean_reference
from fused_embedding.semantics import BFLOAT16
from fused_embedding.validation import assert_close, random_inputs


@pytest.fixture(autouse=True)
def empty_cache():
    row_mean_cache.clear()
    yield
    row_mean_cache.clear()


def frozen(array):
    array.setflags(write=False)
    return array


@pytest.mark.parametrize("table_dtype", [np.float32, np.float16, BFLOAT16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("mask_zero", [False, True])
def test_cached_path_matches_reference(rng, table_dtype, mask_zero):
    table, ids = random_inputs(rng, 300, 37, 9, 11, table_dtype, padding_fraction=0.3 if mask_zero else 0.0)
    table = frozen(table)
    expected = embedding_mean_reference(table, ids, 2, mask_zero)
    first = fe.embedding_mean(table, ids, axis=2, mask_zero=mask_zero, backend="cpu")
    assert row_mean_cache.cached_tables() == 1
    second = fe.embedding_mean(table, ids, axis=2, mask_zero=mask_zero, backend="cpu")
    assert_close(first, expected, table_dtype)
    np.testing.assert_array_equal(first, second)


def test_writable_table_is_never_cached(rng):
    table, ids = random_inputs(rng, 50, 8, 4, 6)
    before = fe.embedding_mean(table, ids, axis=2)
    assert row_mean_cache.cached_tables() == 0
    table[ids[0, 0]] += 1.0  # an in-place edit must show in the next call
    after = fe.embedding_mean(table, ids, axis=2)
    assert after[0, 0] == pytest.approx(before[0, 0] + 1.0, rel=1e-5)
    assert_close(after, embedding_mean_reference(table, ids, 2), np.float32)


def test_view_of_a_writable_array_is_not_constant(rng):
    table, _ = random_inputs(rng, 50, 8, 1, 1)
    view = table[:]
    view.setflags(write=False)
    assert not row_mean_cache.is_constant(view)  # its base can still be written
    assert row_mean_cache.is_constant(frozen(table)[:])


def test_read_only_views_through_memoryviews_follow_the_owner(rng):
    """A read-only memoryview proves nothing: what it exports may still be written."""
    table, ids = random_inputs(rng, 50, 8, 4, 6)
    view = np.frombuffer(memoryview(table).toreadonly(), np.float32).reshape(table.shape)
    assert not view.flags.writeable and not row_mean_cache.is_constant(view)
    before = fe.embedding_mean(view, ids, axis=2)
    table[:] = 0.0  # written through the array the memoryview exports
    np.testing.assert_array_equal(fe.embedding_mean(view, ids, axis=2), np.zeros_like(before))
    assert row_mean_cache.cached_tables() == 0

    buffer = bytearray(table.tobytes())  # a mutable owner, whatever the flags say
    assert not row_mean_cache.is_constant(np.frombuffer(memoryview(buffer).toreadonly(), np.float32))
    immutable = np.frombuffer(table.tobytes(), np.float32)
    assert row_mean_cache.is_constant(immutable)
    assert row_mean_cache.is_constant(np.frombuffer(memoryview(frozen(table)).toreadonly(), np.float32))


def test_a_call_with_the_table_writable_drops_its_entry(rng):
    table, ids = random_inputs(rng, 50, 8, 4, 6)
    fe.embedding_mean(frozen(table), ids, axis=2)
    assert row_mean_cache.cached_tables() == 1
    table.setflags(write=True)
    table[ids[1, 2]] = 7.0
    assert fe.embedding_mean(table, ids, axis=2)[1, 2] == pytest.approx(7.0)
    assert row_mean_cache.cached_tables() == 0
    frozen(table)
    assert fe.embedding_mean(table, ids, axis=2)[1, 2] == pytest.approx(7.0)


def test_the_same_array_reshaped_or_retyped_in_place_is_rebuilt(rng):
    """The cache knows the last table by identity; an in-place change of shape or dtype
    (the buffer stays, its reading changes) must still give that reading's means."""
    table, _ = random_inputs(rng, 60, 16, 1, 1, np.float16)
    frozen(table)
    ids = rng.integers(0, 30, (4, 6)).astype(np.int32)
    fe.embedding_mean(table, ids, axis=2)
    table.shape = (120, 8)  # the same bytes as 120 rows of 8
    assert_close(fe.embedding_mean(table, ids, axis=2), embedding_mean_reference(table, ids, 2), np.float16)
    table.shape = (60, 16)
    table.dtype = np.float32  # the same bytes as 60 rows of 8 floats (finite: halves' bits)
    assert np.isfinite(table).all()
    assert_close(fe.embedding_mean(table, ids, axis=2), embedding_mean_reference(table, ids, 2), np.float32)
    row_mean_cache.clear()
    assert row_mean_cache.cached_tables() == 0
    assert_close(fe.embedding_mean(table, ids, axis=2), embedding_mean_reference(table, ids, 2), np.float32)
    assert row_mean_cache.cached_tables() == 1


def test_new_array_with_other_values_is_rebuilt(rng):
    table, ids = random_inputs(rng, 50, 8, 4, 6)
    first = fe.embedding_mean(frozen(table.copy()), ids, axis=2)
    other = frozen(table * 2.0)
    second = fe.embedding_mean(other, ids, axis=2)
    assert_close(second, 2.0 * first, np.float32)


def test_cache_is_bounded(rng):
    tables = [frozen(random_inputs(rng, 20, 4, 1, 1)[0]) for _ in range(row_mean_cache.MAX_TABLES + 3)]
    ids = np.ones((2, 3), np.int32)
    for table in tables:
        fe.embedding_mean(table, ids, axis=2)
    assert row_mean_cache.cached_tables() == row_mean_cache.MAX_TABLES


tf = pytest.importorskip("tensorflow", reason="TensorFlow is not installed")


def test_tf_tensor_is_cached_and_a_new_tensor_rebuilt(rng):
    table, ids = random_inputs(rng, 60, 8, 5, 7)
    tensor = tf.constant(table)
    out = fe.embedding_mean(np.asarray(tensor), ids, axis=2)
    assert row_mean_cache.cached_tables() == 1
    assert_close(out, embedding_mean_reference(table, ids, 2), np.float32)
    other = tf.constant(table + 3.0)
    out2 = fe.embedding_mean(np.asarray(other), ids, axis=2)
    assert_close(out2, embedding_mean_reference(table + 3.0, ids, 2), np.float32)


def test_assigned_tf_variable_is_rebuilt(rng):
    """TF's copy-on-write: while the cache holds the old buffer, assign writes a new one."""
    table, ids = random_inputs(rng, 60, 8, 5, 7)
    variable = tf.Variable(table)
    first = fe.embedding_mean(np.asarray(variable.read_value()), ids, axis=2)
    assert row_mean_cache.cached_tables() == 1
    variable.assign(table * -1.0)
    second = fe.embedding_mean(np.asarray(variable.read_value()), ids, axis=2)
    assert_close(second, -first, np.float32)
    variable[ids[0, 0]].assign(np.full(8, 5.0, np.float32))  # a sliced assign too
    third = fe.embedding_mean(np.asarray(variable.read_value()), ids, axis=2)
    assert third[0, 0] == pytest.approx(5.0)
