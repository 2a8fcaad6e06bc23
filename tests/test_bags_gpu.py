"""The numba-cuda CSR bags kernel against the float64 reference (the CUDA simulator here).

Poisoned outputs; every combiner, weighted and not (negative and zero weights), empty
bags, the three table dtypes, both id dtypes, D past a word boundary; the bad-id error
raised at once and deferred.
"""
import numpy as np
import pytest

import fused_embedding as fe
from fused_embedding import conformance, validation
from fused_embedding.backends import gpu_staging
from fused_embedding.spec import BoundsCheck, Pooling
from fused_embedding.validation import compare_bags, poisoned

from test_gpu_simulator import device_skip_reason, requires_numba_cuda

pytestmark = requires_numba_cuda


def numba_cuda():
    from fused_embedding import backends
    return backends.get("numba-cuda")


def random_bags(rng, vocab, dim, batch, table_dtype, id_dtype, weighted):
    return validation.random_bags(rng, vocab, dim, validation.short_bag_lengths(rng, batch), table_dtype,
                                  id_dtype, weighted)


@pytest.mark.parametrize("table_dtype", conformance.TABLE_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("id_dtype", conformance.ID_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("dim", [1, 3, 16, 33])
@pytest.mark.parametrize("pooling", list(Pooling), ids=lambda p: p.value)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_matches_reference(rng, table_dtype, id_dtype, dim, pooling, weighted):
    table, values, offsets, weights = random_bags(rng, 40, dim, 5, table_dtype, id_dtype, weighted)
    out = poisoned((5, dim), table_dtype)
    assert numba_cuda().embedding_bag(table, values, offsets, weights, pooling, out=out) is out
    np.testing.assert_array_equal(out[0].astype(np.float32), 0.0)
    report = compare_bags(out, table, values, offsets, weights, pooling.value)
    assert report is None, report


def test_no_bags_launch_nothing(rng):
    table = rng.standard_normal((10, 4), dtype=np.float32)
    out = numba_cuda().embedding_bag(table, np.zeros(0, np.int64), np.zeros(1, np.int64), None, Pooling.SUM)
    assert out.shape == (0, 4)


def test_bad_id_raises_at_once_or_deferred(rng):
    table, values, offsets, _ = random_bags(rng, 40, 8, 6, np.float32, np.int64, False)
    values = np.concatenate([values, [40]])  # a last bag of one bad id
    offsets = np.concatenate([offsets, [values.shape[0]]])
    first = values.shape[0] - 1
    message = rf"id 40 at values\[{first}\] \(bag 6\) is out of range for a table of 40 rows"
    with pytest.raises(IndexError, match=message):
        numba_cuda().embedding_bag(table, values, offsets, None, Pooling.MEAN)
    numba_cuda().embedding_bag(table, values, offsets, None, Pooling.MEAN, bounds_check=BoundsCheck.DEFERRED)
    assert gpu_staging.pending_checks() == 1
    with pytest.raises(IndexError, match=message + ".*deferred bounds check"):
        fe.synchronize()


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_public_op_runs_numba_cuda_on_host_inputs(rng, weighted):
    """fe.embedding_bag(backend="numba-cuda") on host inputs: a NumPy result equal to the
    reference, and a bad id named with its position and bag."""
    table, values, offsets, weights = random_bags(rng, 40, 6, 7, np.float32, np.int64, weighted)
    host = fe.embedding_bag(table, values, offsets, weights=weights, combiner="sqrtn", backend="numba-cuda")
    assert isinstance(host, np.ndarray)
    report = compare_bags(host, table, values, offsets, weights, "sqrtn")
    assert report is None, report
    bad = values.copy()
    bad[-1] = 40
    with pytest.raises(IndexError, match=rf"id 40 at values\[{bad.shape[0] - 1}\] \(bag 6\)"):
        fe.embedding_bag(table, bad, offsets, weights=weights, backend="numba-cuda")


@pytest.mark.skipif(device_skip_reason() is not None, reason=str(device_skip_reason()))
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_public_op_on_device_arrays(rng, weighted):
    """A device table with device values, offsets and weights: the GPU backend is picked by
    the table's device and the result stays there; device offsets are checked on the host."""
    from numba import cuda
    table, values, offsets, weights = random_bags(rng, 40, 6, 7, np.float32, np.int64, weighted)
    on_device = [None if a is None else cuda.to_device(a) for a in (table, values, offsets, weights)]
    result = fe.embedding_bag(*on_device[:3], weights=on_device[3], combiner="sqrtn")
    assert hasattr(result, "__cuda_array_interface__")
    report = compare_bags(result.copy_to_host(), table, values, offsets, weights, "sqrtn")
    assert report is None, report
    bad = values.copy()
    bad[-1] = 40
    with pytest.raises(IndexError, match=rf"id 40 at values\[{bad.shape[0] - 1}\] \(bag 6\)"):
        fe.embedding_bag(on_device[0], cuda.to_device(bad), on_device[2], weights=on_device[3])
    wrong = offsets.copy()
    wrong[-1] += 1
    with pytest.raises(ValueError, match=r"offsets\[-1\] must equal len\(values\)"):
        fe.embedding_bag(on_device[0], on_device[1], cuda.to_device(wrong))
