"""Property tests: random shapes, dtypes, masks and axes on every backend CI can run, against the float64 reference.

Hypothesis draws V, D, B, L (0 and 1 included), the table and id dtypes, the ids
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
from fused_embedding.semantics import BFLOAT16, Axis, output_shape
from fused_embedding.validation import POISON, compare, poisoned, tolerance

EXAMPLES_PER_BACKEND = 500

TABLE_DTYPES = [np.dtype(np.float32), np.dtype(np.float16), BFLOAT16]
ID_DTYPES = [np.dtype(np.int32), np.dtype(np.int64)]
SPECIAL_VALUES = [np.nan, np.inf, -np.inf]

# Largest V, D, B, L drawn per backend: enough to cross chunk and lane
# boundaries on the host; tiny for the simulator, where every CUDA thread is an
# OS thread.
HOST_LIMITS = dict(vocab=40, dim=40, batch=12, length=12)
SIMULATOR_LIMITS = dict(vocab=24, dim=24, batch=3, length=4)


def backend_param(name):
    reason = backends.unavailable_reason(name)
    marks = [pytest.mark.skip(reason=f"backend {name!r} unavailable: {reason}")] if reason else []
    return pytest.param(name, marks=marks, id=name)


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
    assert not (result == POISON).any(), "the backend left output elements unwritten"
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


@pytest.mark.parametrize("name", [backend_param("numba-cuda")])
@property_settings()
@given(case=cases(**SIMULATOR_LIMITS))
def test_gpu_backend_matches_reference(name, case):
    table, ids, axis, mask_zero = case
    check_backend(name, table, ids, axis, mask_zero)
