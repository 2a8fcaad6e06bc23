"""The core op's contract, on every host backend: against the float64 reference and Keras."""
import numpy as np
import pytest

import fused_embedding as fe
from fused_embedding import backends, conformance
from fused_embedding.reference import embedding_mean_reference
from fused_embedding.semantics import BFLOAT16
from fused_embedding.validation import (assert_close, assert_close_to_framework, poisoned, random_inputs,
                                       unwritten)
from conftest import ID_DTYPES, TABLE_DTYPES, run_backend

HOST_BACKENDS = ["cpu", "numpy"]


@pytest.mark.parametrize("dtype", TABLE_DTYPES, ids=lambda d: np.dtype(d).name)
def test_poison_is_seen_in_every_output_dtype(dtype):
    """The unwritten-element check sees the poison as the dtype rounds it (float16 and
    bfloat16 can't hold POISON exactly, so a value compare would miss every element)."""
    out = poisoned((3, 4), dtype)
    out[1, 2] = 0.5
    expected = np.ones((3, 4), bool)
    expected[1, 2] = False
    np.testing.assert_array_equal(unwritten(out), expected)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("case", conformance.cases(conformance.HOST_SHAPES), ids=lambda c: c.label)
def test_matches_reference(rng, backend, case):
    table, ids = case.inputs(rng)
    out = run_backend(backend, table, ids, case.axis, case.mask_zero)
    problem = case.check(out, table, ids)
    assert problem is None, problem
    # The public entry point gives the same.
    public = fe.embedding_mean(table, ids, axis=int(case.axis), mask_zero=case.mask_zero, backend=backend)
    np.testing.assert_array_equal(public, out)


@pytest.mark.parametrize("serial", [True, False], ids=["serial", "parallel"])
@pytest.mark.parametrize("table_dtype", TABLE_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("axis, constant", [(1, False), (2, False), (2, True)],
                         ids=["axis1", "axis2", "axis2-cached"])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "numpy-offset"])
def test_serial_and_parallel_kernels_both_match_reference(rng, monkeypatch, serial, table_dtype, axis,
                                                          constant, aligned):
    """Each cpu kernel has a parallel and a serial entry point (small calls run serial): both
    are right, with bad ids too, on 64-byte aligned tables and on NumPy's (rows across lines)."""
    from fused_embedding import launch
    from fused_embedding.memory import empty_aligned
    monkeypatch.setattr(launch, "cpu_runs_serial", lambda rows, row_bytes: serial)
    for vocab, dim, batch, length in [(300, 16, 37, 9), (300, 129, 9, 33), (50, 40, 64, 1)]:
        values, ids = random_inputs(rng, vocab, dim, batch, length, table_dtype, padding_fraction=0.2)
        table = empty_aligned(values.shape, values.dtype) if aligned else np.empty_like(values)
        table[...] = values
        if aligned:
            assert table.ctypes.data % 64 == 0
        if constant:  # axis 2 then reads cached row means (frozen_table's copy is aligned)
            table = fe.frozen_table(table)
        for mask_zero in (False, True):
            expected = embedding_mean_reference(table, ids, axis, mask_zero)
            out = run_backend("cpu", table, ids, axis, mask_zero)
            assert not unwritten(out).any(), "kernel left output elements unwritten"
            assert_close(out, expected, table_dtype)
        bad = ids.copy()
        bad[batch // 2, length - 1] = vocab
        bad[batch - 1, 0] = -1  # a later bad id, in another chunk: the first in row order is named
        with pytest.raises(IndexError, match=rf"id {vocab} at ids\[{batch // 2}, {length - 1}\]"):
            fe.embedding_mean(table, bad, axis=axis, backend="cpu")


def test_small_calls_run_serial_and_large_ones_parallel(rng, cpu_launches):
    from fused_embedding import launch
    table = rng.standard_normal((5000, 128), dtype=np.float32)  # 512-byte rows
    small_rows = launch.CPU_SERIAL_MAX_BYTES // 512
    fe.embedding_mean(table, rng.integers(0, 5000, (1, small_rows)), backend="cpu")
    fe.embedding_mean(table, rng.integers(0, 5000, (2, small_rows)), backend="cpu")
    assert [serial for _, serial in cpu_launches] == [True, False]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_empty_bags_are_zero(rng, backend):
    table, _ = random_inputs(rng, 20, 8, 1, 1)
    ids = np.zeros((3, 4), np.int32)  # every position padding
    np.testing.assert_array_equal(run_backend(backend, table, ids, 1, True), np.zeros((3, 8), np.float32))
    np.testing.assert_array_equal(run_backend(backend, table, ids, 2, True), np.zeros((3, 4), np.float32))
    no_positions = np.zeros((3, 0), np.int64)  # L = 0
    np.testing.assert_array_equal(run_backend(backend, table, no_positions, 1, False), np.zeros((3, 8), np.float32))
    assert run_backend(backend, table, no_positions, 2, False).shape == (3, 0)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("axis, shape", [(1, (0, 8)), (2, (0, 5))])
def test_empty_batch(rng, backend, axis, shape):
    table, _ = random_inputs(rng, 20, 8, 1, 1)
    out = fe.embedding_mean(table, np.zeros((0, 5), np.int32), axis=axis, backend=backend)
    assert out.shape == shape and out.dtype == np.float32


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("bad_id", [-1, 50, 2**40])
@pytest.mark.parametrize("axis", [1, 2])
def test_out_of_range_id_names_id_position_and_vocab(rng, backend, bad_id, axis):
    table, ids = random_inputs(rng, 50, 4, 6, 7, id_dtype=np.int64)
    ids[4, 5] = bad_id
    ids[5, 0] = bad_id  # a later bad id: the first in row order is reported
    with pytest.raises(IndexError, match=rf"id {bad_id} at ids\[4, 5\] .* table of 50 rows"):
        fe.embedding_mean(table, ids, axis=axis, backend=backend)


@pytest.mark.parametrize("make, error, message", [
    (lambda t, i: (t, i.astype(np.float32)), TypeError, "ids must be int32 or int64, got float32"),
    (lambda t, i: (t, i.astype(np.uint8)), TypeError, "ids must be int32 or int64, got uint8"),
    (lambda t, i: (t.astype(np.float64), i), TypeError, "table must be float32, float16 or bfloat16, got float64"),
    (lambda t, i: (t, i[0]), ValueError, r"ids must be 2-D \(B, L\), got 1-D"),
    (lambda t, i: (t[:, :, None], i), ValueError, r"table must be 2-D \(V, D\), got 3-D"),
    (lambda t, i: (t[:, :0], i), ValueError, r"at least one column"),
])
def test_bad_inputs_raise_saying_what_was_expected(rng, make, error, message):
    table, ids = make(*random_inputs(rng, 20, 4, 3, 5))
    with pytest.raises(error, match=message):
        fe.embedding_mean(table, ids)


@pytest.mark.parametrize("axis, error", [(0, ValueError), (3, ValueError), (-2, ValueError),
                                         (1.0, TypeError), (True, TypeError)])
def test_bad_axis(rng, axis, error):
    table, ids = random_inputs(rng, 20, 4, 3, 5)
    with pytest.raises(error, match="axis"):
        fe.embedding_mean(table, ids, axis=axis)


def test_axis_minus_one_is_axis_two(rng):
    table, ids = random_inputs(rng, 20, 4, 3, 5)
    np.testing.assert_array_equal(fe.embedding_mean(table, ids, axis=-1), fe.embedding_mean(table, ids, axis=2))


def test_backend_selection(rng, monkeypatch):
    table, ids = random_inputs(rng, 20, 4, 3, 5)
    assert fe.available_backends()[-2:] == ["cpu", "numpy"]
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fe.embedding_mean(table, ids, backend="fast")
    monkeypatch.setenv("FUSED_EMBEDDING_BACKEND", "numpy")
    calls = []
    real = backends.get("numpy").embedding_mean
    monkeypatch.setattr(backends.get("numpy"), "embedding_mean", lambda *a, **k: calls.append(1) or real(*a, **k))
    fe.embedding_mean(table, ids)
    assert calls == [1]


def test_cpu_kernel_takes_the_callers_table_without_copying(rng, cpu_launches):
    table, ids = random_inputs(rng, 20, 4, 3, 5)
    fe.embedding_mean(table, ids, backend="cpu")
    first_launch_args, _ = cpu_launches[0]
    assert np.shares_memory(first_launch_args[0], table)


# --- against Keras itself ---------------------------------------------------------------

keras = pytest.importorskip("keras", reason="Keras (TensorFlow) is not installed")


def keras_pooled(table, ids, data_format, mask_zero):
    """Keras Embedding -> GlobalAveragePooling1D carrying `table`, on `ids`."""
    embedding = keras.layers.Embedding(table.shape[0], table.shape[1], mask_zero=mask_zero,
                                       dtype=str(np.dtype(table.dtype)))
    pooling = keras.layers.GlobalAveragePooling1D(data_format=data_format,
                                                  dtype=str(np.dtype(table.dtype)))
    embedding.build((None, ids.shape[1]))
    embedding.set_weights([table])
    rows = embedding(ids)
    mask = embedding.compute_mask(ids) if mask_zero else None
    return keras.ops.convert_to_numpy(pooling(rows, mask=mask))


@pytest.mark.parametrize("table_dtype", [np.float32, np.float16, BFLOAT16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(1000, 128, 16, 64), (50, 1, 1, 1), (50, 3, 4, 9), (300, 129, 5, 2)],
                         ids=lambda s: "V%d-D%d-B%d-L%d" % s)
@pytest.mark.parametrize("mask_zero", [False, True])
def test_channels_last_matches_keras(rng, table_dtype, id_dtype, shape, mask_zero):
    table, ids = random_inputs(rng, *shape, table_dtype, id_dtype, padding_fraction=0.3 if mask_zero else 0.0)
    if mask_zero:
        ids[:, 0] = np.maximum(ids[:, 0], 1)  # Keras gives NaN for an all-padding bag; we give 0
    expected = keras_pooled(table, ids, "channels_last", mask_zero)
    actual = fe.embedding_mean(table, ids, axis=1, mask_zero=mask_zero, backend="cpu")
    assert_close_to_framework(actual, expected, embedding_mean_reference(table, ids, 1, mask_zero),
                              table_dtype)


@pytest.mark.parametrize("table_dtype", [np.float32, np.float16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(1000, 128, 16, 64), (50, 1, 1, 1), (300, 129, 5, 2)],
                         ids=lambda s: "V%d-D%d-B%d-L%d" % s)
def test_channels_first_matches_keras(rng, table_dtype, shape):
    table, ids = random_inputs(rng, *shape, table_dtype, np.int64)
    expected = keras_pooled(table, ids, "channels_first", mask_zero=False)
    actual = fe.embedding_mean(table, ids, axis=2, backend="cpu")
    assert_close_to_framework(actual, expected, embedding_mean_reference(table, ids, 2), table_dtype)


def test_all_padding_bag_keras_nan_ours_zero(rng):
    table, ids = random_inputs(rng, 20, 4, 2, 3)
    ids[1] = 0
    assert np.isnan(keras_pooled(table, ids, "channels_last", True)[1]).all()
    np.testing.assert_array_equal(fe.embedding_mean(table, ids, mask_zero=True)[1], np.zeros(4, np.float32))
