"""Row-wise quantized tables: the record's layout, quantize/dequantize, and the op on them
("cpu" kernels and the "numpy" reference backend) against the float64 dequantize-then-pool
reference, within a bound derived from float32 summation."""
import pickle

import numpy as np
import pytest

import fused_embedding as fe
from fused_embedding import quantized
from fused_embedding.bags import _embedding_bag
from fused_embedding.reference import dequantized_rows, embedding_bag_reference, embedding_mean_reference
from fused_embedding.spec import TableFormat
from fused_embedding.validation import (FLOAT32_UNIT_ROUNDOFF, bag_error_bound, compare, exact_weights, poisoned,
                                        quantized_term_sizes, unwritten)

from conftest import ID_DTYPES

MODES = ("int8", "int4", "keras_int8")
BACKENDS = ("cpu", "numpy")


def make_table(rng, mode, vocab, dim):
    """A QuantizedTable of ``mode`` with random rows (normal values, or Keras-like int8 and scales)."""
    if mode == "keras_int8":
        q = rng.integers(-127, 128, (vocab, dim)).astype(np.int8)
        return fe.QuantizedTable.from_keras_int8(q, rng.uniform(20, 200, vocab).astype(np.float32))
    table = (rng.standard_normal((vocab, dim), dtype=np.float32) * rng.uniform(0.1, 3, (vocab, 1))
             + rng.uniform(-2, 2, (vocab, 1))).astype(np.float32)
    return fe.quantize_table(table, mode)


def bag_bound(qtable, values, offsets, weights, combiner):
    """(B, D): the bound on a float32 bags result's error against the float64 reference
    (``validation.bag_error_bound``: (n + 4) u sum |w| (|q scale| + |bias|) / |denominator|)."""
    return bag_error_bound(qtable, values, offsets, weights, combiner)


def dense_as_csr(ids, mask_zero):
    """The counted ids of dense (B, L) ids as CSR (values, offsets)."""
    counted = ids != 0 if mask_zero else np.ones(ids.shape, bool)
    offsets = np.concatenate([[0], np.cumsum(counted.sum(axis=1))]).astype(np.int64)
    return ids[counted], offsets


def assert_matches(out, expected, bound):
    assert not unwritten(out).any(), f"{int(unwritten(out).sum())} elements never written"
    report = compare(out, expected, rtol=0.0, atol=bound)
    assert report is None, report


# --- the record ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dim", [2, 16, 38])
def test_round_trip_within_half_a_step(rng, mode, dim):
    table = rng.standard_normal((300, dim), dtype=np.float32) * 5
    table[3] = 1.25         # a constant row: scale 0, every value exact
    table[4, ::2] = -7.0    # the row's minimum: its bias, exact
    table[4, 1::2] = 9.0
    qtable = fe.quantize_table(table, mode)
    scales = qtable.scales.astype(np.float64)
    error = np.abs(table.astype(np.float64) - dequantized_rows(qtable, np.arange(300)))
    # Half a step of the stored float32 scale, up to the float64 rounding of (x - bias) / scale.
    assert (error <= scales[:, None] / 2 * (1 + 2.0**-40)).all(), float((error - scales[:, None] / 2).max())
    assert error[3].max() == 0 and error[4, ::2].max() == 0
    assert np.array_equal(qtable.dequantize(np.float64), dequantized_rows(qtable, np.arange(300)))
    assert np.array_equal(qtable.dequantize(), dequantized_rows(qtable, np.arange(300)).astype(np.float32))


def test_layout_is_as_documented():
    table = np.array([[0.0, 1.0, 2.0, 3.0], [-1.0, -1.0, -1.0, 14.0]], np.float32)
    int8 = fe.quantize_table(table, "int8")
    assert int8.data.dtype == np.uint8 and int8.data.shape == (2, 4) and int8.shape == (2, 4)
    assert int8.params.dtype == np.float32 and int8.params.shape == (2, 2)
    assert np.array_equal(int8.data, [[0, 85, 170, 255], [0, 0, 0, 255]])
    assert np.array_equal(int8.scales, np.float32([3 / 255, 15 / 255])) and np.array_equal(int8.biases, [0, -1])
    int4 = fe.quantize_table(table, "int4")
    assert int4.data.shape == (2, 2) and int4.shape == (2, 4)
    # q = [0, 5, 10, 15] and [0, 0, 0, 15]: column 2j in the low nibble of byte j.
    assert np.array_equal(int4.data, [[0 | 5 << 4, 10 | 15 << 4], [0, 15 << 4]])
    assert np.array_equal(int4.dequantize(), table)
    for qtable in (int8, int4):
        assert qtable.nbytes == 2 * qtable.format.bytes_per_row(4)
        assert qtable.dtype == np.float32


def test_formats_in_the_spec():
    assert TableFormat.INT8_ROWWISE.bytes_per_row(128) == 136
    assert TableFormat.INT4_ROWWISE.bytes_per_row(128) == 72
    assert TableFormat.KERAS_INT8.bytes_per_row(128) == 132
    assert TableFormat.FP32.bytes_per_row(128) == 512
    assert {f.storage_dtype for f in TableFormat if f.quantized} == {np.dtype(np.uint8), np.dtype(np.int8)}
    assert all(f.output_dtype == np.float32 for f in TableFormat if f.quantized)
    assert len({f.kernel_code for f in TableFormat}) == len(TableFormat)
    assert TableFormat.of_dtype(np.uint8) is None and TableFormat.of_dtype(np.int8) is None


def test_resident_size_is_the_formats():
    qtable = fe.quantize_table(np.zeros((1000, 128), np.float32), "int8")
    assert qtable.nbytes == 1000 * 136  # 1M rows: 136 MB, not float32's 512 MB


@pytest.mark.parametrize("mode", MODES)
def test_serialises(rng, tmp_path, mode):
    qtable = make_table(rng, mode, 20, 6)
    np.savez(tmp_path / "t.npz", **qtable.to_arrays())
    with np.load(tmp_path / "t.npz") as arrays:
        loaded = fe.QuantizedTable.from_arrays(arrays)
    for other in (loaded, pickle.loads(pickle.dumps(qtable))):
        assert other.format is qtable.format and other.shape == qtable.shape
        assert np.array_equal(other.data, qtable.data) and np.array_equal(other.params, qtable.params)


def test_keras_int8_is_read_as_it_is(rng):
    q = rng.integers(-127, 128, (10, 8)).astype(np.int8)
    scale = rng.uniform(1, 100, 10).astype(np.float32)
    qtable = fe.QuantizedTable.from_keras_int8(q, scale)
    assert np.shares_memory(qtable.data, q) and np.shares_memory(qtable.params, scale)
    assert qtable.biases is None and qtable.nbytes == 10 * TableFormat.KERAS_INT8.bytes_per_row(8)
    assert np.array_equal(qtable.dequantize(np.float64), q / scale.astype(np.float64)[:, None])


def test_rowwise_from_parts(rng):
    data = rng.integers(0, 256, (5, 4)).astype(np.uint8)
    scales, biases = rng.random(5).astype(np.float32), rng.random(5).astype(np.float32)
    qtable = fe.QuantizedTable.rowwise(data, scales, biases, "int8")
    assert not np.shares_memory(qtable.data, data) and np.array_equal(qtable.data, data)
    assert np.array_equal(qtable.scales, scales) and np.array_equal(qtable.biases, biases)
    # copied into one buffer of rows: 4 data bytes, then scale and bias
    assert qtable.params.ctypes.data - qtable.data.ctypes.data == 4 and qtable.data.strides == (12, 1)


@pytest.mark.parametrize("mode, dim, row_bytes", [("int8", 128, 136), ("int8", 6, 16), ("int4", 10, 16),
                                                   ("int4", 8, 12)])
def test_parameters_follow_each_rows_data(mode, dim, row_bytes):
    qtable = fe.quantize_table(np.arange(3 * dim, dtype=np.float32).reshape(3, dim), mode)
    columns = qtable.data.shape[1]
    data_at, params_at = qtable.data.ctypes.data, qtable.params.ctypes.data
    # one row = its data bytes, padding to 4 bytes, scale, bias; rows one stride apart
    assert qtable.data.strides == (row_bytes, 1) and qtable.params.strides == (row_bytes, 4)
    assert params_at - data_at == -(-columns // 4) * 4 and params_at % 4 == 0
    assert data_at % 64 == 0  # the buffer starts on a cache line


@pytest.mark.parametrize("make, error, words", [
    (lambda: fe.quantize_table(np.zeros((4, 7), np.float32), "int4"), ValueError, "D must be even, got D = 7"),
    (lambda: fe.quantize_table(np.zeros((4, 8), np.float32), "int2"), ValueError, "one of ['int4', 'int8'"),
    (lambda: fe.quantize_table(np.zeros((4, 8), np.int32), "int8"), TypeError, "got int32"),
    (lambda: fe.quantize_table(np.zeros(8, np.float32), "int8"), ValueError, "2-D (V, D)"),
    (lambda: fe.quantize_table(np.array([[0, np.nan]], np.float32), "int8"), ValueError, "row 0 has a NaN"),
    (lambda: fe.QuantizedTable.rowwise(np.zeros((4, 8), np.uint8), np.ones(3, np.float32),
                                       np.ones(4, np.float32)), ValueError, "scales must be float32 (4,)"),
    (lambda: fe.QuantizedTable.rowwise(np.zeros((4, 8), np.uint8), np.ones(4, np.float64),
                                       np.ones(4, np.float32)), ValueError, "got float64 (4,)"),
    (lambda: fe.QuantizedTable.rowwise(np.zeros((4, 8), np.uint8), np.ones(4, np.float32),
                                       np.ones(5, np.float32)), ValueError, "biases must be float32 (4,)"),
    (lambda: fe.QuantizedTable.rowwise(np.zeros((4, 8), np.int8), np.ones(4, np.float32),
                                       np.ones(4, np.float32), "int4"), TypeError, "uint8 array (V, D / 2)"),
    (lambda: fe.QuantizedTable.from_keras_int8(np.zeros((4, 8), np.int8), np.ones(5, np.float32)),
     ValueError, "embeddings_scale must be float32 (4,)"),
    (lambda: fe.QuantizedTable.from_keras_int8(np.zeros((4, 8), np.int8), np.ones(4, np.float16)),
     ValueError, "got float16 (4,)"),
    (lambda: fe.QuantizedTable.from_keras_int8(np.zeros((4, 8), np.uint8), np.ones(4, np.float32)),
     TypeError, "2-D int8 array"),
    (lambda: fe.QuantizedTable("int8", np.zeros((4, 16), np.uint8)[:, ::2], np.ones((4, 2), np.float32)),
     ValueError, "data must have contiguous, non-overlapping rows"),
    (lambda: fe.QuantizedTable("int8", np.zeros((4, 8), np.uint8), np.ones((4, 1), np.float32)),
     ValueError, "params must be float32 (4, 2)"),
])
def test_bad_layouts_say_what_was_expected(make, error, words):
    with pytest.raises(error) as info:
        make()
    assert words in str(info.value)


# --- the op ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("id_dtype", ID_DTYPES)
@pytest.mark.parametrize("mask_zero", [False, True])
def test_mean_sequence_axis(rng, backend, mode, id_dtype, mask_zero):
    qtable = make_table(rng, mode, 50, 38)  # 38: int4 data of 19 bytes a row
    ids = rng.integers(0, 50, (9, 13)).astype(id_dtype)
    ids[rng.random(ids.shape) < 0.3] = 0
    ids[2] = 0   # a bag of padding only under mask_zero
    out = poisoned((9, 38), np.float32)
    quantized.embedding_mean(qtable, ids, 1, mask_zero, backend, out=out)
    values, offsets = dense_as_csr(ids, mask_zero)
    assert_matches(out, embedding_mean_reference(qtable, ids, 1, mask_zero),
                   bag_bound(qtable, values, offsets, None, "mean"))
    public = fe.embedding_mean(qtable, ids, axis=1, mask_zero=mask_zero, backend=backend)
    assert public.dtype == np.float32 and np.array_equal(public, out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mask_zero", [False, True])
def test_mean_embedding_axis(rng, backend, mode, mask_zero):
    qtable = make_table(rng, mode, 50, 38)
    ids = rng.integers(0, 50, (7, 11)).astype(np.int32)
    ids[rng.random(ids.shape) < 0.3] = 0
    out = poisoned((7, 11), np.float32)
    quantized.embedding_mean(qtable, ids, 2, mask_zero, backend, out=out)
    # scale * (exact sum of q) / D + bias: three roundings of at most mean |q * scale| + |bias|
    # each, one of the sum; the float64 reference's own rounding is below that.
    size = quantized_term_sizes(qtable)[ids].mean(axis=2)
    if qtable.biases is not None:
        size += np.abs(qtable.biases.astype(np.float64))[ids]
    bound = np.where(mask_zero & (ids == 0), 0.0, 4 * FLOAT32_UNIT_ROUNDOFF * size)
    assert_matches(out, embedding_mean_reference(qtable, ids, 2, mask_zero), bound)
    assert np.array_equal(fe.embedding_mean(qtable, ids, axis=-1, mask_zero=mask_zero, backend=backend), out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("combiner", ["mean", "sum", "sqrtn"])
@pytest.mark.parametrize("weighted", [False, True])
def test_bags(rng, backend, mode, combiner, weighted):
    qtable = make_table(rng, mode, 60, 20)
    lengths = rng.integers(0, 9, 12)
    lengths[3] = 0
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = rng.integers(0, 60, offsets[-1]).astype(np.int64 if weighted else np.int32)
    weights = exact_weights(rng, values.shape[0]) if weighted else None
    out = poisoned((12, 20), np.float32)
    _embedding_bag(qtable, values, offsets, weights, combiner, backend, out=out)
    assert_matches(out, embedding_bag_reference(qtable, values, offsets, weights, combiner),
                   bag_bound(qtable, values, offsets, weights, combiner))
    public = fe.embedding_bag(qtable, values, offsets, weights=weights, combiner=combiner, backend=backend)
    assert public.dtype == np.float32 and np.array_equal(public, out)


@pytest.mark.parametrize("mode", MODES)
def test_parallel_kernels(rng, mode):
    """Calls large enough for the thread team (past launch.CPU_SERIAL_MAX_BYTES), several
    bags a chunk, both kernels."""
    qtable = make_table(rng, mode, 3000, 128)
    ids = rng.integers(0, 3000, (64, 40)).astype(np.int32)
    ids[:, ::5] = 0
    assert not quantized._serial(ids.size, qtable)
    for axis in (1, 2):
        out = poisoned((64, 128) if axis == 1 else (64, 40), np.float32)
        quantized.embedding_mean(qtable, ids, axis, True, "cpu", out=out)
        expected = embedding_mean_reference(qtable, ids, axis, True)
        assert not unwritten(out).any()
        if axis == 1:
            assert_matches(out, expected, bag_bound(qtable, *dense_as_csr(ids, True), None, "mean"))
        else:
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", [1, 2])
@pytest.mark.parametrize("bad", [-1, 40, 2**31 - 1])
def test_bad_ids_raise_as_for_float_tables(rng, backend, axis, bad):
    qtable = make_table(rng, "int8", 40, 8)
    ids = rng.integers(0, 40, (6, 5)).astype(np.int64)
    ids[4, 1] = bad
    ids[2, 3] = bad   # the first in row order
    float_table = np.zeros((40, 8), np.float32)
    with pytest.raises(IndexError) as expected:
        fe.embedding_mean(float_table, ids, axis=axis, backend="numpy")
    with pytest.raises(IndexError) as got:
        fe.embedding_mean(qtable, ids, axis=axis, backend=backend)
    assert str(got.value) == str(expected.value) and "ids[2, 3]" in str(got.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_bag_ids_raise_as_for_float_tables(rng, backend):
    qtable = make_table(rng, "int4", 40, 8)
    values = rng.integers(0, 40, 30).astype(np.int32)
    values[[9, 20]] = 40
    offsets = np.array([0, 4, 4, 17, 30], np.int64)
    with pytest.raises(IndexError) as expected:
        fe.embedding_bag(np.zeros((40, 8), np.float32), values, offsets, backend="numpy")
    with pytest.raises(IndexError) as got:
        fe.embedding_bag(qtable, values, offsets, backend=backend)
    assert str(got.value) == str(expected.value) and "values[9] (bag 2)" in str(got.value)


@pytest.mark.parametrize("backend", ["numba-cuda", "cupy"])
def test_other_backends_say_what_runs(rng, backend):
    qtable = make_table(rng, "int8", 10, 4)
    ids = np.zeros((2, 3), np.int32)
    for call in (lambda: fe.embedding_mean(qtable, ids, backend=backend),
                 lambda: fe.embedding_bag(qtable, ids.reshape(-1), np.array([0, 3, 6]), backend=backend)):
        with pytest.raises(ValueError, match="runs on the 'cpu' and 'numpy' backends"):
            call()


def test_bad_arguments(rng):
    qtable = make_table(rng, "int8", 10, 4)
    with pytest.raises(TypeError, match="ids must be int32 or int64, got float32"):
        fe.embedding_mean(qtable, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="ids must be 2-D"):
        fe.embedding_mean(qtable, np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="offsets\\[-1\\] must equal len\\(values\\)"):
        fe.embedding_bag(qtable, np.zeros(3, np.int32), np.array([0, 2]))
    with pytest.raises(ValueError, match="axis must be 1"):
        fe.embedding_mean(qtable, np.zeros((2, 3), np.int32), axis=3)


@pytest.mark.slow  # imports Keras (and TensorFlow)
def test_keras_int8_layer_gives_the_same_means(rng):
    keras = pytest.importorskip("keras")
    layer = keras.layers.Embedding(50, 24)
    layer.build((None,))
    layer.quantize("int8")
    qtable = fe.QuantizedTable.from_keras_int8(np.asarray(layer._embeddings), np.asarray(layer.embeddings_scale))
    ids = rng.integers(0, 50, (6, 9)).astype(np.int32)
    theirs = np.asarray(keras.ops.mean(layer(ids), axis=1), np.float64)
    ours = fe.embedding_mean(qtable, ids)
    # Both err from the exact mean by at most (L + 4) u of the mean of |values| (Keras: a
    # float32 quotient a value, a float32 sum of L, a division; ours: bag_bound's).
    size = np.abs(dequantized_rows(qtable, ids)).mean(axis=1)
    report = compare(ours, theirs, rtol=0.0, atol=2 * (ids.shape[1] + 4) * FLOAT32_UNIT_ROUNDOFF * size)
    assert report is None, report


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
def test_empty_shapes(rng, backend, shape):
    qtable = make_table(rng, "int4", 10, 6)
    ids = np.zeros(shape, np.int32)
    for axis, out_shape in ((1, (shape[0], 6)), (2, shape)):
        out = fe.embedding_mean(qtable, ids, axis=axis, mask_zero=True, backend=backend)
        assert out.shape == out_shape and out.dtype == np.float32 and not out.any()
    empty_bags = fe.embedding_bag(qtable, np.zeros(0, np.int32), np.zeros(shape[0] + 1, np.int64), backend=backend)
    assert empty_bags.shape == (shape[0], 6) and not empty_bags.any()
