"""The bad-input table (README "Bad inputs"): each input a user can pass gets a clear error or the documented result.

Never a crash, a hang or a wrong answer. Errors are asserted by type and
message; results against the float64 reference with the per-dtype tolerances.
"""
import tracemalloc

import numpy as np
import pytest

import fused_embedding as fe
from fused_embedding import api, backends
from fused_embedding.reference import embedding_mean_reference
from fused_embedding.semantics import BFLOAT16
from fused_embedding.validation import assert_close, compare, random_inputs, tolerance
from conftest import TABLE_DTYPES, backend_param

HOST_BACKENDS = ["cpu", "numpy"]


# Host inputs on the GPU backend: copied to the device and back (under the CUDA
# simulator in CI), so results and errors are checked there too.
ALL_BACKENDS = [backend_param(name) for name in HOST_BACKENDS + ["numba-cuda"]]


def by_name(dtype):
    return np.dtype(dtype).name


# --- dtypes and ranks ---------------------------------------------------------------------

@pytest.mark.parametrize("id_dtype", [np.float32, np.float64, np.float16], ids=by_name)
def test_float_ids_raise(rng, id_dtype):
    table, ids = random_inputs(rng, 20, 4, 3, 5)
    with pytest.raises(TypeError, match=rf"ids must be int32 or int64, got {by_name(id_dtype)} "
                                        r"\(float ids are not truncated as Keras does\)"):
        fe.embedding_mean(table, ids.astype(id_dtype))


def test_bool_ids_raise(rng):
    table, ids = random_inputs(rng, 20, 4, 3, 5)
    with pytest.raises(TypeError, match="ids must be int32 or int64, got bool"):
        fe.embedding_mean(table, ids > 10)


@pytest.mark.parametrize("id_dtype", [np.int8, np.int16, np.uint8, np.uint32, np.uint64, ">i4", ">i8", object],
                         ids=lambda d: np.dtype(d).str)
def test_other_id_dtypes_raise(rng, id_dtype):
    table, ids = random_inputs(rng, 20, 4, 3, 5)
    with pytest.raises(TypeError, match=rf"ids must be int32 or int64, got {np.dtype(id_dtype)}"):
        fe.embedding_mean(table, ids.astype(id_dtype))


@pytest.mark.parametrize("make_ids, rank, shape", [
    (lambda ids: ids[0], 1, r"\(5,\)"),
    (lambda ids: ids[:, :, None], 3, r"\(3, 5, 1\)"),
    (lambda ids: ids[0, 0], 0, r"\(\)"),
], ids=["1-D", "3-D", "0-D"])
def test_ids_not_2d_raise(rng, make_ids, rank, shape):
    table, ids = random_inputs(rng, 20, 4, 3, 5)
    with pytest.raises(ValueError, match=rf"ids must be 2-D \(B, L\), got {rank}-D with shape {shape}"):
        fe.embedding_mean(table, make_ids(ids))


@pytest.mark.parametrize("make_table, rank, shape", [
    (lambda table: table[:, 0], 1, r"\(20,\)"),
    (lambda table: table[None], 3, r"\(1, 20, 4\)"),
], ids=["1-D", "3-D"])
def test_table_not_2d_raise(rng, make_table, rank, shape):
    table, ids = random_inputs(rng, 20, 4, 3, 5)
    with pytest.raises(ValueError, match=rf"table must be 2-D \(V, D\), got {rank}-D with shape {shape}"):
        fe.embedding_mean(make_table(table), ids)


def test_table_without_columns_raises(rng):
    table, ids = random_inputs(rng, 20, 4, 3, 5)
    with pytest.raises(ValueError, match=r"at least one column \(D >= 1\), got shape \(20, 0\)"):
        fe.embedding_mean(table[:, :0], ids)


@pytest.mark.parametrize("table_dtype", [np.int32, np.int64, np.uint8, np.float64, bool, ">f4"],
                         ids=lambda d: np.dtype(d).str)
def test_table_dtype_raise(rng, table_dtype):
    table, ids = random_inputs(rng, 20, 4, 3, 5)
    with pytest.raises(TypeError, match=rf"table must be float32, float16 or bfloat16, got {np.dtype(table_dtype)}"):
        fe.embedding_mean(table.astype(table_dtype), ids)


def test_python_lists_follow_the_array_rules():
    # Lists go through np.asarray: Python floats become float64 (refused), Python ints int64.
    ids = [[0, 2], [1, 1]]
    with pytest.raises(TypeError, match="table must be float32, float16 or bfloat16, got float64"):
        fe.embedding_mean([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], ids)
    table = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], np.float32)
    np.testing.assert_array_equal(fe.embedding_mean(table, ids), np.array([[3.0, 4.0], [3.0, 4.0]], np.float32))


@pytest.mark.parametrize("mask_zero", [1, 0, None, "yes", np.int64(1)], ids=repr)
def test_mask_zero_not_bool_raises(rng, mask_zero):
    table, ids = random_inputs(rng, 20, 4, 3, 5)
    with pytest.raises(TypeError, match="mask_zero must be a bool, got"):
        fe.embedding_mean(table, ids, mask_zero=mask_zero)


# --- ids out of range ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", HOST_BACKENDS)  # numba-cuda: tests/test_gpu_simulator.py
@pytest.mark.parametrize("bad_id", [20, 21, 2**31 - 1, 2**31, 2**62], ids=str)
@pytest.mark.parametrize("axis", [1, 2])
@pytest.mark.parametrize("mask_zero", [False, True])
def test_id_at_or_past_vocab_raises(rng, backend, bad_id, axis, mask_zero):
    table, ids = random_inputs(rng, 20, 4, 3, 5, id_dtype=np.int64)
    ids[2, 3] = bad_id
    with pytest.raises(IndexError, match=rf"^id {bad_id} at ids\[2, 3\] is out of range for a table of 20 rows "
                                         r"\(expected 0 <= id < 20\)$"):
        fe.embedding_mean(table, ids, axis=axis, mask_zero=mask_zero, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bad_id", [-1, -20, -(2**31)], ids=str)
@pytest.mark.parametrize("id_dtype", [np.int32, np.int64], ids=by_name)
@pytest.mark.parametrize("axis", [1, 2])
def test_negative_id_raises_not_wraps(rng, backend, bad_id, id_dtype, axis):
    table, ids = random_inputs(rng, 20, 4, 3, 5, id_dtype=id_dtype)
    ids[1, 0] = bad_id
    with pytest.raises(IndexError, match=rf"^id {bad_id} at ids\[1, 0\] is out of range for a table of 20 rows"):
        fe.embedding_mean(table, ids, axis=axis, backend=backend)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_empty_table(rng, backend):
    table, ids = random_inputs(rng, 20, 4, 3, 5)
    empty = table[:0]  # V = 0: every id is out of range, no ids is fine
    with pytest.raises(IndexError, match=r"for a table of 0 rows"):
        fe.embedding_mean(empty, ids, backend=backend)
    np.testing.assert_array_equal(fe.embedding_mean(empty, ids[:, :0], backend=backend), np.zeros((3, 4), np.float32))
    assert fe.embedding_mean(empty, ids[:0], backend=backend).shape == (0, 4)


# --- NaN, inf and overflow in the table ---------------------------------------------------

# inf - inf is NaN by design here; the simulator's NumPy scalars warn about it.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("table_dtype", TABLE_DTYPES, ids=by_name)
@pytest.mark.parametrize("axis", [1, 2])
@pytest.mark.parametrize("mask_zero", [False, True])
def test_nan_and_inf_propagate_as_the_reference_does(rng, backend, table_dtype, axis, mask_zero):
    table, _ = random_inputs(rng, 10, 6, 1, 1, table_dtype)
    table[0, :] = np.nan     # the padding row: under mask_zero it is never read
    table[3, 2] = np.nan
    table[4, 1] = np.inf
    table[5, 1] = -np.inf
    ids = np.array([[3, 7, 8],    # NaN in one row: that feature's mean is NaN (axis 1), that row's (axis 2)
                    [4, 7, 7],    # +inf
                    [4, 5, 9],    # +inf and -inf in one bag: NaN on axis 1
                    [0, 7, 8],    # the NaN padding row
                    [6, 7, 8]])   # finite
    expected = embedding_mean_reference(table, ids, axis, mask_zero)
    actual = fe.embedding_mean(table, ids, axis=axis, mask_zero=mask_zero, backend=backend)
    report = compare(actual, expected, **tolerance(table_dtype))  # NaN only where NaN, inf only where inf
    assert report is None, report
    assert np.isnan(actual.astype(np.float32)).any() and np.isinf(actual.astype(np.float32)).any()
    assert np.isnan(actual[3].astype(np.float32)).any() != mask_zero  # the padding row only when counted


@pytest.mark.parametrize("table_dtype", [np.float32, BFLOAT16], ids=by_name)
@pytest.mark.parametrize("axis", [1, 2])
def test_float32_sum_overflow_gives_inf(table_dtype, axis):
    # Accumulation is in float32 (as Keras sums float32 tables): a sum past float32's
    # largest value (3.4e38) is inf even when the mean would fit. The numpy backend
    # (the float64 reference) gives the finite mean.
    table = np.full((3, 4), 3e38, np.float32).astype(table_dtype)
    ids = np.array([[1, 2]])
    assert np.isinf(fe.embedding_mean(table, ids, axis=axis, backend="cpu").astype(np.float32)).all()
    reference = fe.embedding_mean(table, ids, axis=axis, backend="numpy").astype(np.float32)
    assert np.isfinite(reference).all()


# --- layouts: strided, transposed, broadcast, read-only ----------------------------------

def strided_inputs(rng, layout, table_dtype):
    """(table [V][D], ids [B][L]) views in the given memory layout over fresh random data."""
    table, ids = random_inputs(rng, 40, 12, 6, 9, table_dtype, np.int64)
    if layout == "table columns sliced":
        table = random_inputs(rng, 40, 24, 1, 1, table_dtype)[0][:, ::2]
    elif layout == "table transposed (Fortran order)":
        table = np.asfortranarray(table)
    elif layout == "table rows reversed":
        table = table[::-1]
    elif layout == "ids transposed (Fortran order)":
        ids = np.asfortranarray(ids)
    elif layout == "ids broadcast (stride 0)":
        ids = np.broadcast_to(ids[:1], ids.shape)
    elif layout == "read-only":
        table.flags.writeable = False
        ids.flags.writeable = False
    return table, ids


LAYOUTS = ["table columns sliced", "table transposed (Fortran order)", "table rows reversed",
           "ids transposed (Fortran order)", "ids broadcast (stride 0)", "read-only"]


@pytest.mark.parametrize("layout, table_dtype", [(layout, np.float32) for layout in LAYOUTS]
                         + [("table columns sliced", np.float16), ("table transposed (Fortran order)", BFLOAT16)],
                         ids=lambda v: by_name(v) if not isinstance(v, str) else v)
@pytest.mark.parametrize("axis", [1, 2])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_strided_inputs_give_the_right_result(rng, layout, table_dtype, axis, backend):
    table, ids = strided_inputs(rng, layout, table_dtype)
    assert not (table.flags.c_contiguous and ids.flags.c_contiguous) or layout == "read-only"
    expected = embedding_mean_reference(table, ids, axis)
    assert_close(fe.embedding_mean(table, ids, axis=axis, backend=backend), expected, table_dtype)


def arrays_handed(launches) -> list:
    """The arrays among the arguments of the recorded cpu kernel launches (conftest.cpu_launches)."""
    return [a for args, _ in launches for a in args if isinstance(a, np.ndarray)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("axis", [1, 2])
def test_strided_inputs_are_read_in_place(rng, cpu_launches, layout, axis):
    """The cpu kernels are handed the caller's table buffer; ids are copied only when not C-contiguous."""
    table, ids = strided_inputs(rng, layout, np.float16)
    fe.embedding_mean(table, ids, axis=axis, backend="cpu")
    arrays = arrays_handed(cpu_launches)
    assert any(np.shares_memory(a, table) for a in arrays), "the kernel got a copy of the table"
    if ids.flags.c_contiguous:
        assert any(np.shares_memory(a, ids) for a in arrays), "the kernel got a copy of C-contiguous ids"
    else:  # the kernels walk ids flat: a C-contiguous copy of the ids (B*L ids, small) is documented
        assert any(a.shape == ids.shape and a.flags.c_contiguous and (a == ids).all() for a in arrays)


@pytest.mark.parametrize("layout", ["columns sliced", "Fortran order"])
def test_no_table_sized_allocation_on_cpu(rng, layout):
    """Measured, not assumed: the cpu backend allocates far less than a copy of the table."""
    if layout == "columns sliced":
        table = rng.standard_normal((20_000, 128), dtype=np.float32)[:, ::2]
    else:
        table = np.asfortranarray(rng.standard_normal((20_000, 64), dtype=np.float32))
    ids = rng.integers(0, table.shape[0], (8, 16))
    fe.embedding_mean(table, ids, backend="cpu")  # compiled and warm
    tracemalloc.start()
    try:
        fe.embedding_mean(table, ids, backend="cpu")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    table_bytes = table.shape[0] * table.shape[1] * table.itemsize
    assert peak < table_bytes / 10, f"peak traced allocation {peak} bytes vs a {table_bytes}-byte table"


def test_memory_mapped_table_is_read_in_place(rng, tmp_path, cpu_launches):
    """A table in a file (np.memmap, read-only): the right rows, read from the mapping itself."""
    table, ids = random_inputs(rng, 300, 16, 5, 7)
    path = tmp_path / "table.f32"
    table.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=table.shape)
    for axis in (1, 2):
        assert_close(fe.embedding_mean(mapped, ids, axis=axis, backend="cpu"),
                     embedding_mean_reference(table, ids, axis), np.float32)
    assert any(np.shares_memory(a, mapped) for a in arrays_handed(cpu_launches))


def test_torch_cpu_tensors_are_read_in_place(rng, cpu_launches):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    table, ids = random_inputs(rng, 300, 16, 5, 7, id_dtype=np.int64)
    table_tensor, ids_tensor = torch.from_numpy(table), torch.from_numpy(ids)
    result = fe.embedding_mean(table_tensor, ids_tensor, backend="cpu")
    assert isinstance(result, np.ndarray)
    assert_close(result, embedding_mean_reference(table, ids), np.float32)
    assert any(np.shares_memory(a, table) for a in arrays_handed(cpu_launches))


# --- devices and backends -----------------------------------------------------------------

class CudaArrayStandIn:
    """Looks like a GPU array to the core op (CUDA array interface), without a GPU."""

    def __init__(self, host):
        self.shape, self.dtype, self.ndim = host.shape, host.dtype, host.ndim

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (0, False), "version": 3}


class DLPackCudaStandIn:
    """Reports a CUDA DLPack device (kDLCUDA = 2, device 0)."""

    def __dlpack_device__(self):
        return (2, 0)


def test_device_of(rng):
    table, ids = random_inputs(rng, 20, 4, 3, 5)
    assert api.device_of(table) == "cpu"
    assert api.device_of(CudaArrayStandIn(table)) == "cuda"
    assert api.device_of(DLPackCudaStandIn()) == "cuda"


def test_ids_on_gpu_table_on_host_raises(rng):
    table, ids = random_inputs(rng, 20, 4, 3, 5)
    with pytest.raises(ValueError, match="ids are on a GPU but the table is in host memory"):
        fe.embedding_mean(table, CudaArrayStandIn(ids))


def test_table_on_gpu_with_a_host_backend_raises(rng):
    table, ids = random_inputs(rng, 20, 4, 3, 5)
    with pytest.raises(ValueError, match="backend 'cpu' runs on host arrays but the table is on a GPU"):
        fe.embedding_mean(CudaArrayStandIn(table), ids, backend="cpu")


def test_table_on_gpu_without_a_gpu_backend_raises(rng, monkeypatch):
    table, ids = random_inputs(rng, 20, 4, 3, 5)
    for name in ("numba-cuda", "cupy"):
        monkeypatch.setitem(backends._reasons, name, "no CUDA driver")
    with pytest.raises(RuntimeError, match=r"no backend can run on cuda arrays here "
                                           r"\(numba-cuda: no CUDA driver; cupy: no CUDA driver\)"):
        fe.embedding_mean(CudaArrayStandIn(table), ids)


def test_unknown_backend_raises(rng, monkeypatch):
    table, ids = random_inputs(rng, 20, 4, 3, 5)
    message = r"unknown backend 'fast'; expected one of \['cpu', 'cupy', 'numba-cuda', 'numpy'\]"
    with pytest.raises(ValueError, match=message):
        fe.embedding_mean(table, ids, backend="fast")
    monkeypatch.setenv(api.BACKEND_ENV_VAR, "fast")
    with pytest.raises(ValueError, match=message):
        fe.embedding_mean(table, ids)


def test_forced_unavailable_backend_raises_with_the_reason(rng, monkeypatch):
    table, ids = random_inputs(rng, 20, 4, 3, 5)
    monkeypatch.setitem(backends._reasons, "cupy", "import failed: No module named 'cupy'")
    with pytest.raises(RuntimeError, match="backend 'cupy' was requested but is not available here: "
                                           "import failed: No module named 'cupy'"):
        fe.embedding_mean(table, ids, backend="cupy")
    monkeypatch.setenv(api.BACKEND_ENV_VAR, "cupy")
    with pytest.raises(RuntimeError, match="backend 'cupy' was requested"):
        fe.embedding_mean(table, ids)


def test_unavailable_backend_is_skipped_when_not_forced(rng, monkeypatch):
    table, ids = random_inputs(rng, 20, 4, 3, 5)
    monkeypatch.setitem(backends._reasons, "cpu", "numba is not installed")
    with pytest.raises(RuntimeError, match="backend 'cpu' was requested but is not available here: "
                                           "numba is not installed"):
        fe.embedding_mean(table, ids, backend="cpu")
    # Not forced: the next host backend runs, quietly.
    numpy_backend = backends.get("numpy")
    calls = []
    real = numpy_backend.embedding_mean
    monkeypatch.setattr(numpy_backend, "embedding_mean", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert_close(fe.embedding_mean(table, ids), embedding_mean_reference(table, ids), np.float32)
    assert calls == [1], "the numpy backend, next in line, did not run"


# --- an output too large ------------------------------------------------------------------

@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("axis, ids_shape, out_shape", [
    (1, (2**31, 1), (2**31, 2**12)),
    (2, (2**31, 2**12), (2**31, 2**12)),
], ids=["axis1", "axis2"])
def test_output_too_large_raises_before_allocating(rng, monkeypatch, backend, axis, ids_shape, out_shape):
    table, _ = random_inputs(rng, 3, 2**12, 1, 1)
    ids = np.broadcast_to(np.zeros((1, 1), np.int32), ids_shape)  # no memory behind it
    module = backends.get(backend)
    launched = []
    monkeypatch.setattr(module, "embedding_mean", lambda *args, **kwargs: launched.append(1))
    with pytest.raises(MemoryError, match=rf"the output \({out_shape[0]}, {out_shape[1]}\) float32 needs "
                                          rf"32768\.0 GiB, more than the [0-9.]+ GiB the '{backend}' backend's"):
        fe.embedding_mean(table, ids, axis=axis, backend=backend)
    assert not launched
