"""embedding_bag (CSR bags) on the host backends: against the float64 reference, TF's
embedding_lookup_sparse, and embedding_mean; empty bags; bags cut across the cpu
kernel's chunks; the chunks' balance; bad inputs.

Results are compared on poisoned outputs with a bound on float32 summation error
(``check_against_reference``), so any draw of weights holds for every seed.
"""
import numpy as np
import pytest

import fused_embedding as fe
from fused_embedding import bags
from fused_embedding.reference import embedding_bag_reference, embedding_mean_reference
from fused_embedding.validation import (assert_close_to_framework, bag_error_bound, compare, compare_bags,
                                        exact_weights, poisoned, random_bags)
from conftest import TABLE_DTYPES, backend_param

COMBINERS = ["mean", "sum", "sqrtn"]


HOST_BACKEND_NAMES = ["cpu", "numpy"]  # the GPU backends' bags: tests/test_bags_gpu.py
HOST_BACKENDS = [backend_param(name) for name in HOST_BACKEND_NAMES]


def offsets_of(lengths, dtype=np.int64):
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(dtype)


random_weights = exact_weights


def geometric_lengths(rng, batch, mean):
    return rng.geometric(1.0 / (mean + 1), batch) - 1  # 0 (an empty bag) included


def check_against_reference(out, table, values, offsets, weights, combiner):
    """out: (B, D) of the table's dtype, written into a poisoned buffer by the op."""
    report = compare_bags(out, table, values, offsets, weights, combiner)
    assert report is None, report


def run_poisoned(table, values, offsets, weights, combiner, backend, n_chunks=None):
    out = poisoned((offsets.shape[0] - 1, table.shape[1]), table.dtype)
    assert bags._embedding_bag(table, values, offsets, weights, combiner, backend, out=out,
                               n_chunks=n_chunks) is out
    return out


# --- results ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("table_dtype", TABLE_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("id_dtype", [np.int32, np.int64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("combiner", COMBINERS)
def test_matches_reference(rng, backend, table_dtype, id_dtype, weighted, combiner):
    # D = 37: two vector passes (32 columns) and a scalar tail; geometric lengths, 0 included.
    lengths = geometric_lengths(rng, 40, 6)
    table, values, offsets, weights = random_bags(rng, 300, 37, lengths, table_dtype, id_dtype, weighted)
    out = run_poisoned(table, values, offsets, weights, combiner, backend)
    check_against_reference(out, table, values, offsets, weights, combiner)


@pytest.mark.parametrize("dim", [1, 16, 200])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_widths(rng, dim, weighted):
    # D = 1: scalar only; 16: one vector; 200: a 128-column pass, then 64, then 8 scalar.
    lengths = geometric_lengths(rng, 30, 4)
    table, values, offsets, weights = random_bags(rng, 100, dim, lengths, weighted=weighted)
    check_against_reference(run_poisoned(table, values, offsets, weights, "mean", "cpu"),
                            table, values, offsets, weights, "mean")


@pytest.mark.parametrize("offsets_dtype", [np.int32, np.int64], ids=lambda d: np.dtype(d).name)
def test_public_call(rng, offsets_dtype):
    table, values, offsets, weights = random_bags(rng, 50, 8, geometric_lengths(rng, 12, 3), weighted=True)
    out = fe.embedding_bag(table, values, offsets.astype(offsets_dtype), weights=weights, combiner="sqrtn")
    assert out.dtype == np.float32 and out.shape == (12, 8)
    report = compare(out, embedding_bag_reference(table, values, offsets, weights, "sqrtn"),
                     rtol=1e-5, atol=bag_error_bound(table, values, offsets, weights, "sqrtn") + 1e-6)
    assert report is None, report


@pytest.mark.parametrize("n_chunks", [1, 2, 3, 7, 64, 10_000])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("combiner", COMBINERS)
def test_bags_cut_across_chunks(rng, n_chunks, weighted, combiner):
    # One bag of 700 ids among bags of 0-3: with 2 chunks and more it is cut, with 64 and
    # more it spans many chunks whole; as many chunks as steps cut every bag. D = 72 puts
    # the call past the serial bound: the parallel kernel runs.
    lengths = rng.integers(0, 4, 150)
    lengths[rng.integers(0, 150)] = 700
    table, values, offsets, weights = random_bags(rng, 500, 72, lengths, weighted=weighted)
    steps = int(offsets[-1]) + 150
    out = run_poisoned(table, values, offsets, weights, combiner, "cpu", n_chunks=min(n_chunks, steps))
    check_against_reference(out, table, values, offsets, weights, combiner)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("combiner", COMBINERS)
def test_empty_bags_give_zeros(rng, backend, weighted, combiner):
    lengths = np.array([0, 3, 0, 0, 5, 0])
    table, values, offsets, weights = random_bags(rng, 20, 5, lengths, weighted=weighted)
    out = run_poisoned(table, values, offsets, weights, combiner, backend, n_chunks=None)
    assert (out[lengths == 0] == 0).all()
    check_against_reference(out, table, values, offsets, weights, combiner)
    # All bags empty (N = 0), and no bags at all (B = 0).
    none = np.zeros(0, np.int32)
    assert (run_poisoned(table, none, np.zeros(4, np.int64), None, combiner, backend) == 0).all()
    assert run_poisoned(table, none, np.zeros(1, np.int64), None, combiner, backend).shape == (0, 5)


def test_dense_ids_are_bags_of_equal_length(rng):
    """embedding_mean's (B, L) ids are CSR bags with offsets 0, L, 2L, ...: same result."""
    table = rng.standard_normal((200, 40), dtype=np.float32)
    ids = rng.integers(0, 200, (16, 9)).astype(np.int32)
    out = fe.embedding_bag(table, ids.reshape(-1), np.arange(0, ids.size + 1, 9))
    report = compare(out, fe.embedding_mean(table, ids), rtol=1e-5, atol=1e-6)
    assert report is None, report
    report = compare(out, embedding_mean_reference(table, ids), rtol=1e-5, atol=1e-6)
    assert report is None, report


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_strided_inputs(rng, backend):
    table, values, offsets, weights = random_bags(rng, 60, 20, geometric_lengths(rng, 10, 4), weighted=True)
    fortran = np.asfortranarray(table)
    strided_values = np.repeat(values, 2)[::2]
    strided_weights = np.repeat(weights, 2)[::2]
    assert not (fortran.flags.c_contiguous or strided_values.flags.c_contiguous)
    out = run_poisoned(fortran, strided_values, offsets, strided_weights, "mean", backend)
    check_against_reference(out, table, values, offsets, weights, "mean")


# --- TF's definitions -------------------------------------------------------------------------

def tf_lookup_sparse(table, values, offsets, weights, combiner):
    tf = pytest.importorskip("tensorflow")
    lengths = np.diff(offsets)
    rows = np.repeat(np.arange(lengths.shape[0]), lengths)
    cols = np.arange(values.shape[0]) - np.repeat(offsets[:-1], lengths)
    indices = np.stack([rows, cols], axis=1).astype(np.int64)
    shape = (lengths.shape[0], max(1, int(lengths.max(initial=0))))
    ids = tf.SparseTensor(indices, values.astype(np.int64), shape)
    sp_weights = None if weights is None else tf.SparseTensor(indices, weights, shape)
    return tf.nn.embedding_lookup_sparse(table, ids, sp_weights, combiner=combiner).numpy()


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("combiner", COMBINERS)
def test_matches_tf_embedding_lookup_sparse(rng, weighted, combiner):
    # TF's unsafe op assumes no empty rows: lengths from 1.
    table, values, offsets, weights = random_bags(rng, 100, 24, rng.integers(1, 12, 20), weighted=weighted)
    theirs = tf_lookup_sparse(table, values, offsets, weights, combiner)
    ours = fe.embedding_bag(table, values, offsets, weights=weights, combiner=combiner)
    assert_close_to_framework(ours, theirs, embedding_bag_reference(table, values, offsets, weights, combiner),
                              np.float32)


@pytest.mark.parametrize("combiner", ["mean", "sqrtn"])
def test_zero_denominator_gives_zeros_as_tf(rng, combiner):
    """Weights summing to 0 (mean) or all 0 (sqrtn): TF's div_no_nan gives 0, and so do we."""
    table = rng.standard_normal((10, 6), dtype=np.float32)
    values = np.array([1, 2, 3, 4, 5], np.int32)
    offsets = np.array([0, 2, 5])
    weights = np.array([0.5, -0.5, 1, 2, -3] if combiner == "mean" else [0, 0, 0, 0, 0], np.float32)
    theirs = tf_lookup_sparse(table, values, offsets, weights, combiner)
    ours = fe.embedding_bag(table, values, offsets, weights=weights, combiner=combiner)
    assert (theirs == 0).all() and (ours == 0).all()


# --- balance ----------------------------------------------------------------------------------

def chunks_of(offsets, n_chunks):
    from fused_embedding.kernels import cpu_bags
    bag_bounds = np.empty(n_chunks + 1, np.int64)
    id_bounds = np.empty(n_chunks + 1, np.int64)
    cpu_bags.split_work(np.asarray(offsets, np.int64), n_chunks, bag_bounds, id_bounds)
    return bag_bounds, id_bounds


def check_split(offsets, n_chunks):
    bag_bounds, id_bounds = chunks_of(offsets, n_chunks)
    batch, total = offsets.shape[0] - 1, int(offsets[-1])
    assert (bag_bounds[0], id_bounds[0]) == (0, 0) and (bag_bounds[-1], id_bounds[-1]) == (batch, total)
    # Each boundary is a state of the merge path: inside bag i, between its ends.
    assert (offsets[bag_bounds] <= id_bounds).all()
    open_bags = bag_bounds < batch
    assert (id_bounds[open_bags] <= offsets[bag_bounds[open_bags] + 1]).all()
    ids = np.diff(id_bounds)
    steps = ids + np.diff(bag_bounds)
    assert steps.max() - steps.min() <= 1, steps  # ids plus bag ends: equal to one step
    assert ids.max() <= -(-(total + batch) // n_chunks), ids
    return ids


def test_chunks_balance_ids_not_bags(rng):
    """One bag of 5,000 ids among 3,000 bags of 3: no chunk reads more than its share of
    the N + B steps, so the long bag is spread over several chunks (a split by bags would
    give its chunk all 5,000)."""
    lengths = np.full(3001, 3)
    lengths[rng.integers(0, 3001)] = 5000
    offsets = offsets_of(lengths)
    for n_chunks in (2, 8, 64):
        ids = check_split(offsets, n_chunks)
        share = (int(offsets[-1]) + 3001) / n_chunks
        assert ids.max() <= np.ceil(share)
        # A chunk of bags of 3 spends a step in 4 on a bag end (give or take a bag at its ends).
        assert ids.min() >= share * 3 / 4 - 3


@pytest.mark.parametrize("n_chunks", [1, 3, 8, 100])
def test_chunks_of_random_offsets(rng, n_chunks):
    lengths = np.where(rng.random(200) < 0.3, 0, rng.geometric(0.05, 200))
    check_split(offsets_of(lengths), n_chunks)
    check_split(offsets_of([]), n_chunks)  # B = 0
    check_split(offsets_of([0, 0, 0]), n_chunks)  # N = 0


def test_parallel_call_uses_the_balanced_split(rng, cpu_launches):
    """A call large enough to go parallel gets more chunks than threads."""
    import numba
    table, values, offsets, _ = random_bags(rng, 5000, 64, np.full(200, 32))
    fe.embedding_bag(table, values, offsets)
    (args, serial), = cpu_launches
    assert not serial and args[7] == numba.config.NUMBA_NUM_THREADS * 4


# --- bad inputs -------------------------------------------------------------------------------

def good_inputs(rng):
    return random_bags(rng, 20, 4, np.array([2, 0, 3]), weighted=True)


@pytest.mark.parametrize("offsets, message", [
    (np.array([0, 3, 2, 5]), r"offsets must be non-decreasing, got offsets\[2\] = 2 after offsets\[1\] = 3"),
    (np.array([1, 2, 2, 5]), r"offsets\[0\] must be 0 .*got 1"),
    (np.array([0, 2, 2, 7]), r"offsets\[-1\] must equal len\(values\) = 5, got offsets\[3\] = 7, "
                             r"past the end of values"),
    (np.array([0, 2, 2, 4]), r"offsets\[-1\] must equal len\(values\) = 5, got offsets\[3\] = 4, short of"),
    (np.array([], np.int64), r"offsets must have B \+ 1 >= 1 entries"),
    (np.array([[0, 2, 2, 5]]), r"offsets must be 1-D \(B \+ 1,\), got 2-D with shape \(1, 4\)"),
])
def test_bad_offsets_raise(rng, offsets, message):
    table, values, _, weights = good_inputs(rng)
    for backend in HOST_BACKEND_NAMES:
        with pytest.raises(ValueError, match=message):
            fe.embedding_bag(table, values, offsets, weights=weights, backend=backend)


@pytest.mark.parametrize("change, error, message", [
    (dict(offsets=np.array([0., 2, 2, 5])), TypeError, "offsets must be int32 or int64, got float64"),
    (dict(values=np.array([1., 2, 3, 4, 5])), TypeError,
     r"values must be int32 or int64, got float64 \(float ids are not truncated"),
    (dict(values=np.array([1, 2, 3, 4, 5], np.uint32)), TypeError, "values must be int32 or int64, got uint32"),
    (dict(values=np.ones((5, 1), np.int32)), ValueError, r"values must be 1-D \(N,\), got 2-D"),
    (dict(weights=np.ones(5)), TypeError, "weights must be float32, got float64"),
    (dict(weights=np.ones(4, np.float32)), ValueError, r"weights must have the shape of values, \(5,\), got \(4,\)"),
    (dict(table=np.ones((20, 4), np.int64)), TypeError, "table must be float32, float16 or bfloat16, got int64"),
    (dict(table=np.ones(20, np.float32)), ValueError, r"table must be 2-D \(V, D\)"),
    (dict(combiner="max"), ValueError, r"combiner must be one of \['mean', 'sum', 'sqrtn'\], got 'max'"),
    (dict(backend="tpu"), ValueError, r"unknown backend 'tpu'; expected one of \['cpu', 'cupy', 'numba-cuda', 'numpy'\]"),
])
def test_bad_arguments_raise(rng, change, error, message):
    table, values, offsets, weights = good_inputs(rng)
    arguments = dict(table=table, values=values, offsets=offsets, weights=weights, combiner="mean",
                     backend=None) | change
    with pytest.raises(error, match=message):
        fe.embedding_bag(arguments.pop("table"), arguments.pop("values"), arguments.pop("offsets"), **arguments)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("bad", [-1, 20, 2**40], ids=["negative", "V", "huge"])
def test_bad_id_names_id_position_bag_and_vocab(rng, backend, bad):
    lengths = np.array([2, 0, 0, 3, 4])
    table, values, offsets, weights = random_bags(rng, 20, 4, lengths, id_dtype=np.int64, weighted=True)
    values[4] = bad      # bag 3's last id (bags 1 and 2 are empty, at bag 3's start)
    values[8] = 20       # a later bad id: not the one named
    with pytest.raises(IndexError, match=rf"^id {bad} at values\[4\] \(bag 3\) is out of range for a "
                                         r"table of 20 rows \(expected 0 <= id < 20\)$"):
        fe.embedding_bag(table, values, offsets, weights=weights, backend=backend)


@pytest.mark.parametrize("n_chunks", [1, 4, 50])
def test_first_bad_id_across_chunks(rng, n_chunks):
    """Bad ids in several chunks of a parallel call (1,600 rows of 256 bytes: past the
    serial bound): the first in values order is named."""
    table, values, offsets, _ = random_bags(rng, 30, 64, np.full(40, 40))
    values[[1590, 617, 1203]] = [30, 31, 32]
    with pytest.raises(IndexError, match=r"^id 31 at values\[617\] \(bag 15\)"):
        bags._embedding_bag(table, values, offsets, None, "mean", "cpu", n_chunks=n_chunks)
