"""Property tests: random shapes, dtypes, masks and axes on every backend CI can run, against the float64 reference.

Hypothesis draws V and D (from 1), B and L (0 and 1 included), the table and id dtypes, the ids
themselves, the mask, the axis, and NaN / inf planted in the table; the table's
other values come from a drawn seed. Each backend's launcher is called directly
on a poisoned output, so an element it never writes fails. Examples are not
derandomised (each run explores new ones); a failure prints the example and a
``@reproduce_failure`` blob to replay it.

Per backend per run: ``EXAMPLES_PER_BACKEND`` examples. Under the CUDA
simulator (one OS thread per CUDA thread) the shapes are kept tiny.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import fused_embedding as fe
from fused_embedding import backends
from fused_embedding.reference import embedding_mean_reference
from fused_embedding.semantics import Axis, output_shape
from fused_embedding.validation import compare, poisoned, tolerance, unwritten
from conftest import ID_DTYPES, TABLE_DTYPES, backend_param

EXAMPLES_PER_BACKEND = 500

SPECIAL_VALUES = [np.nan, np.inf, -np.inf]

# Largest V, D, B, L drawn per backend: enough to cross chunk and lane
# boundaries on the host; tiny for the simulator, where every CUDA thread is an
# OS thread.
HOST_LIMITS = dict(vocab=40, dim=40, batch=12, length=12)
SIMULATOR_LIMITS = dict(vocab=24, dim=24, batch=3, length=4)


@st.composite
def cases(draw, vocab, dim, batch, length):
    """(table [V][D], ids [B][L], axis, mask_zero) with V >= 1 and ids in [0, V)."""
    v = draw(st.integers(1, vocab))
    d = draw(st.integers(1, dim))
    b = draw(st.integers(0, batch))
    n = draw(st.integers(0, length))
    table_dtype = draw(st.sampled_from(TABLE_DTYPES))
    id_dtype = draw(st.sampled_from(ID_DTYPES))
    mask_zero = draw(st.booleans())
    axis = draw(st.sampled_from([Axis.SEQUENCE, Axis.EMBEDDING]))
    # Ids drawn by hypothesis (not from the seed) so it can steer them to 0 (the
    # padding id), V - 1 and repeats, and shrink a failure to the fewest ids.
    ids = draw(arrays(id_dtype, (b, n), elements=st.integers(0, v - 1)))
    seed = draw(st.integers(0, 2**32 - 1))
    table = np.random.default_rng(seed).standard_normal((v, d), dtype=np.float32).astype(table_dtype)
    specials = draw(st.lists(st.tuples(st.integers(0, v - 1), st.integers(0, d - 1),
                                       st.sampled_from(SPECIAL_VALUES)), max_size=2))
    for row, col, value in specials:
        table[row, col] = value
    return table, ids, axis, mask_zero


def check_backend(name, table, ids, axis, mask_zero):
    shape = output_shape(axis, ids.shape[0], ids.shape[1], table.shape[1])
    out = poisoned(shape, table.dtype)
    result = backends.get(name).embedding_mean(table, ids, axis, mask_zero, out=out)
    result = np.asarray(result)
    expected = embedding_mean_reference(table, ids, axis, mask_zero)
    assert result.shape == shape and result.dtype == table.dtype, (result.shape, result.dtype)
    assert not unwritten(result).any(), "the backend left output elements unwritten"
    report = compare(result, expected, **tolerance(table.dtype))
    assert report is None, report
    return result


def bits(array):
    """The array's bit patterns, so NaN compares equal to the same NaN (ml_dtypes' bfloat16 included)."""
    return np.ascontiguousarray(array).view(f"u{array.dtype.itemsize}")


def property_settings(limit_examples=EXAMPLES_PER_BACKEND):
    return settings(max_examples=limit_examples, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("name", [backend_param("cpu"), backend_param("numpy")])
@property_settings()
@given(case=cases(**HOST_LIMITS))
def test_host_backend_matches_reference(name, case):
    table, ids, axis, mask_zero = case
    direct = check_backend(name, table, ids, axis, mask_zero)
    # The public op, which validates and picks the same launcher, gives the same bits.
    public = fe.embedding_mean(table, ids, axis=int(axis), mask_zero=mask_zero, backend=name)
    assert public.dtype == direct.dtype
    np.testing.assert_array_equal(bits(public), bits(direct))


# Planted inf - inf is NaN by design; the simulator's NumPy scalars warn about it.
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("name", [backend_param("numba-cuda")])
@property_settings()
@given(case=cases(**SIMULATOR_LIMITS))
def test_gpu_backend_matches_reference(name, case):
    table, ids, axis, mask_zero = case
    check_backend(name, table, ids, axis, mask_zero)


@st.composite
def bad_id_cases(draw, vocab, batch, length):
    """(table, ids with at least one id outside [0, V), the first bad (row, col) in row order)."""
    v = draw(st.integers(1, vocab))
    b = draw(st.integers(1, batch))
    n = draw(st.integers(1, length))
    id_dtype = draw(st.sampled_from(ID_DTYPES))
    limit = np.iinfo(id_dtype)
    bad_value = st.one_of(st.integers(v, v + 2), st.integers(-3, -1),
                          st.integers(v, int(limit.max)), st.integers(int(limit.min), -1))
    ids = draw(arrays(id_dtype, (b, n), elements=st.one_of(st.integers(0, v - 1), bad_value)))
    row, col = draw(st.integers(0, b - 1)), draw(st.integers(0, n - 1))
    ids[row, col] = draw(bad_value)  # at least one
    bad = (ids < 0) | (ids >= v)
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    table = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal((v, 3), dtype=np.float32)
    return table, ids, first


def check_first_bad_id_is_reported(name, table, ids, first, axis, mask_zero):
    row, col = first
    message = (rf"^id {ids[row, col]} at ids\[{row}, {col}\] is out of range for a table of "
               rf"{table.shape[0]} rows")
    out = poisoned(output_shape(axis, ids.shape[0], ids.shape[1], table.shape[1]), table.dtype)
    with pytest.raises(IndexError, match=message):
        backends.get(name).embedding_mean(table, ids, axis, mask_zero, out=out)


@pytest.mark.parametrize("name", [backend_param("cpu"), backend_param("numpy")])
@property_settings(limit_examples=200)
@given(case=bad_id_cases(vocab=HOST_LIMITS["vocab"], batch=HOST_LIMITS["batch"], length=HOST_LIMITS["length"]),
       axis=st.sampled_from([Axis.SEQUENCE, Axis.EMBEDDING]), mask_zero=st.booleans())
def test_host_backend_reports_the_first_bad_id(name, case, axis, mask_zero):
    """Any mix of bad ids (negative, >= V, up to the dtype's limits): the first in row order is named."""
    check_first_bad_id_is_reported(name, *case, axis, mask_zero)


@pytest.mark.slow
@pytest.mark.parametrize("name", [backend_param("numba-cuda")])
@property_settings(limit_examples=50)
@given(case=bad_id_cases(vocab=SIMULATOR_LIMITS["vocab"], batch=SIMULATOR_LIMITS["batch"],
                         length=SIMULATOR_LIMITS["length"]),
       axis=st.sampled_from([Axis.SEQUENCE, Axis.EMBEDDING]), mask_zero=st.booleans())
def test_gpu_backend_reports_the_first_bad_id(name, case, axis, mask_zero):
    check_first_bad_id_is_reported(name, *case, axis, mask_zero)


# Layouts the core op passes through unchanged: views with steps, Fortran order, reversed rows.
LAYOUT_TRANSFORMS = {
    "as is": lambda a: a,
    "fortran": np.asfortranarray,
    "reversed rows": lambda a: a[::-1],
}


@st.composite
def strided_cases(draw, vocab, dim, batch, length):
    """(table view, ids view, axis, mask_zero): random steps, orders and reversals over fresh data."""
    table, ids, axis, mask_zero = draw(cases(vocab, dim, batch, length))
    column_step = draw(st.integers(1, 3))
    # A wider table read with a column step: the view has the drawn table's values.
    wide = np.zeros((table.shape[0], table.shape[1] * column_step), table.dtype)
    wide[:, ::column_step] = table
    table_view = wide[:, ::column_step]
    table_view = LAYOUT_TRANSFORMS[draw(st.sampled_from(sorted(LAYOUT_TRANSFORMS)))](table_view)
    ids_view = LAYOUT_TRANSFORMS[draw(st.sampled_from(sorted(LAYOUT_TRANSFORMS)))](ids)
    if draw(st.booleans()):
        ids_view = ids_view.T.copy().T  # ids in Fortran order through a transpose
    return table_view, ids_view, axis, mask_zero


@pytest.mark.slow
@pytest.mark.parametrize("name", [backend_param("cpu")])
@property_settings(limit_examples=200)
@given(case=strided_cases(**HOST_LIMITS))
def test_public_op_on_strided_views_matches_reference(name, case):
    """Whatever the strides of the caller's arrays, the public op gives the reference's result."""
    table, ids, axis, mask_zero = case
    expected = embedding_mean_reference(table, ids, axis, mask_zero)
    result = fe.embedding_mean(table, ids, axis=int(axis), mask_zero=mask_zero, backend=name)
    report = compare(result, expected, **tolerance(table.dtype))
    assert report is None, report
