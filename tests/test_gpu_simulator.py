"""The GPU backends against the float64 reference: under the CUDA simulator in CI, on a GPU where there is one.

Without a GPU, conftest sets NUMBA_ENABLE_CUDASIM=1 and the Numba CUDA kernels
run on the CPU (one OS thread per CUDA thread): shapes stay tiny. The same tests
run on a real device when there is one; tests that need one skip with the reason.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fused_embedding as fe
from fused_embedding import backends, conformance, launch
from fused_embedding.reference import embedding_mean_reference
from fused_embedding.semantics import BFLOAT16, Axis
from fused_embedding.spec import Pooling
from fused_embedding.validation import poisoned
from fused_embedding.validation import assert_close, random_inputs, unwritten
from conftest import backend_skip_reason, run_backend

ROOT = Path(__file__).resolve().parents[1]


simulated = backends.cuda_simulated


requires_numba_cuda = pytest.mark.skipif(backend_skip_reason("numba-cuda") is not None,
                                         reason=str(backend_skip_reason("numba-cuda")))


def gpu_backend_params():
    return [pytest.param(name, id=name, marks=pytest.mark.skipif(backend_skip_reason(name) is not None,
                                                                 reason=str(backend_skip_reason(name))))
            for name in ("numba-cuda", "cupy")]


@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("case", conformance.cases(conformance.SIMULATOR_SHAPES), ids=lambda c: c.label)
def test_matches_reference(rng, backend, case):
    table, ids = case.inputs(rng)
    out = run_backend(backend, table, ids, case.axis, case.mask_zero)
    problem = case.check(out, table, ids)
    assert problem is None, problem


@pytest.mark.parametrize("backend", gpu_backend_params())
def test_public_op_with_a_forced_gpu_backend_returns_numpy(rng, backend):
    table, ids = random_inputs(rng, 30, 8, 3, 4, np.float16, np.int64)
    result = fe.embedding_mean(table, ids, axis=1, backend=backend)
    assert isinstance(result, np.ndarray) and result.dtype == np.float16 and result.shape == (3, 8)
    assert_close(result, embedding_mean_reference(table, ids, 1), np.float16)


@pytest.mark.parametrize("backend", gpu_backend_params())
def test_empty_bags_are_zero(rng, backend):
    table, _ = random_inputs(rng, 20, 8, 1, 1)
    table[0, :] = np.inf  # padding: never read
    ids = np.zeros((3, 4), np.int32)
    np.testing.assert_array_equal(run_backend(backend, table, ids, 1, True), np.zeros((3, 8), np.float32))
    np.testing.assert_array_equal(run_backend(backend, table, ids, 2, True), np.zeros((3, 4), np.float32))
    no_positions = np.zeros((3, 0), np.int64)  # L = 0
    np.testing.assert_array_equal(run_backend(backend, table, no_positions, 1, False),
                                  np.zeros((3, 8), np.float32))
    assert run_backend(backend, table, no_positions, 2, False).shape == (3, 0)


@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("axis, shape", [(1, (0, 8)), (2, (0, 5))])
def test_empty_batch_launches_nothing(rng, backend, axis, shape):
    table, _ = random_inputs(rng, 20, 8, 1, 1, BFLOAT16)
    out = fe.embedding_mean(table, np.zeros((0, 5), np.int32), axis=axis, backend=backend)
    assert out.shape == shape and out.dtype == BFLOAT16


@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("bad_id", [-1, 50, 2**40])
@pytest.mark.parametrize("axis", [1, 2])
def test_out_of_range_id_names_id_position_and_vocab(rng, backend, bad_id, axis):
    table, ids = random_inputs(rng, 50, 4, 6, 7, id_dtype=np.int64)
    ids[5, 0] = bad_id
    ids[4, 5] = bad_id  # the first in row order is reported, whatever order the GPU met them in
    with pytest.raises(IndexError, match=rf"id {bad_id} at ids\[4, 5\] is out of range for a table of 50 rows "
                                         rf"\(expected 0 <= id < 50\)"):
        fe.embedding_mean(table, ids, axis=axis, backend=backend)


@pytest.mark.parametrize("backend", gpu_backend_params())
def test_bad_id_is_reported_under_mask_zero_and_int32(rng, backend):
    table, ids = random_inputs(rng, 9, 3, 2, 3, id_dtype=np.int32)
    ids[1, 2] = -7
    with pytest.raises(IndexError, match=r"id -7 at ids\[1, 2\] .* table of 9 rows"):
        fe.embedding_mean(table, ids, mask_zero=True, backend=backend)


# --- device arrays (a real GPU only) ------------------------------------------------------
def device_skip_reason():
    if backend_skip_reason("numba-cuda"):
        return backend_skip_reason("numba-cuda")
    if simulated():
        return "the CUDA simulator's arrays have no __cuda_array_interface__: device inputs need a real GPU"
    return None


@pytest.mark.skipif(device_skip_reason() is not None, reason=str(device_skip_reason()))
@pytest.mark.parametrize("axis", [1, 2])
def test_device_table_gives_a_device_result(rng, axis):
    from numba import cuda
    table, ids = random_inputs(rng, 1000, 64, 33, 17, np.float32, np.int64)
    on_device = fe.embedding_mean(cuda.to_device(table), cuda.to_device(ids), axis=axis)
    assert hasattr(on_device, "__cuda_array_interface__")
    host_ids = fe.embedding_mean(cuda.to_device(table), ids, axis=axis)  # ids copied, not the table
    expected = embedding_mean_reference(table, ids, axis)
    assert_close(on_device.copy_to_host(), expected, np.float32)
    assert_close(host_ids.copy_to_host(), expected, np.float32)


# --- the direct launch's arguments (no GPU needed) -----------------------------------------
class InterfaceOnly:
    """A GPU array as far as the CUDA array interface goes (the memory is never touched)."""

    def __init__(self, shape, typestr, pointer, strides=None):
        self.__cuda_array_interface__ = {"shape": shape, "strides": strides, "typestr": typestr,
                                         "data": (pointer, False), "version": 3}


def test_device_buffer_reads_the_interface_and_views_the_same_bytes():
    from fused_embedding.backends.numba_cuda import DeviceBuffer
    table = DeviceBuffer.of(InterfaceOnly((5, 8), "<f4", 4096))
    assert (table.pointer, table.shape, table.strides, table.c_contiguous) == (4096, (5, 8), (32, 4), True)
    words = table.view(np.uint64)
    assert (words.shape, words.strides, words.dtype, words.pointer) == ((5, 4), (32, 8), np.dtype(np.uint64), 4096)
    assert words.__cuda_array_interface__["strides"] is None  # contiguous: Numba types it "C"
    assert words.kernel_arguments() == (0, 0, 20, 8, 4096, 5, 4, 32, 8)
    strided = DeviceBuffer.of(InterfaceOnly((3, 4), "<i8", 8192, strides=(64, 8)))  # every other row
    assert not strided.c_contiguous and strided.__cuda_array_interface__["strides"] == (64, 8)
    with pytest.raises(ValueError, match="contiguous last axis"):
        DeviceBuffer.of(InterfaceOnly((3, 4), "<f4", 0, strides=(32, 8))).view(np.uint64)


NUMBA_FLATTENING = """
import sys
import types
import numpy as np
from numba.cuda.cudadrv import devicearray, driver
from numba.cuda.descriptor import cuda_target
from numba.cuda.dispatcher import _Kernel
from fused_embedding.backends.numba_cuda import DeviceBuffer, _numba_type, _type_key
sys.path.insert(0, "tests")
from test_gpu_simulator import InterfaceOnly

checked = 0
for array in [InterfaceOnly((5, 7), "<u8", 1 << 16), InterfaceOnly((5, 7), "<i8", 1 << 17, (80, 8)),
              InterfaceOnly((1,), "<i8", 4096), InterfaceOnly((4, 6), "<f4", 8192, (4, 16)),
              InterfaceOnly((3, 9), "<u2", 1 << 20)]:
    buffer = DeviceBuffer.of(array)
    numba_type = _numba_type(_type_key(buffer))
    fields = cuda_target.target_context.data_model_manager[numba_type]._fields
    assert fields == ("meminfo", "parent", "nitems", "itemsize", "data", "shape", "strides"), fields
    # Numba's own argument packing for its own device array over the same memory.
    memory = driver.MemoryPointer(None, driver.binding.CUdeviceptr(buffer.pointer), size=1 << 20, owner=None)
    numba_array = devicearray.DeviceNDArray(shape=buffer.shape, strides=buffer.strides, dtype=buffer.dtype,
                                            gpu_data=memory, stream=0)
    packed = []
    _Kernel._prepare_args(types.SimpleNamespace(extensions=[]), numba_type, numba_array, 0, [], packed)
    assert [int(v) for v in packed] == list(buffer.kernel_arguments()), (packed, buffer.kernel_arguments())
    checked += 1
packed = []
_Kernel._prepare_args(types.SimpleNamespace(extensions=[]), _numba_type(bool), True, 0, [], packed)
assert packed == [True], packed

# The launch keeps its buffers (and the memory they own) alive: it passes bare addresses.
import gc, weakref
from fused_embedding import launch
from fused_embedding.backends import numba_cuda

class Owner:  # memory only the buffer refers to, as a host table's device copy is
    __cuda_array_interface__ = {"shape": (4, 2), "strides": None, "typestr": "<u8", "data": (1 << 12, False),
                                "version": 3}

launched = []
class Kernel:
    library = types.SimpleNamespace(get_cufunc=lambda: types.SimpleNamespace(kernel="kernel"))
class Dispatcher:
    def compile(self, argument_types):
        return Kernel()
import cuda.core
cuda.core.launch = lambda stream, config, kernel, *flat: launched.append(flat)
owner = Owner()
alive = weakref.ref(owner)
run = numba_cuda._direct_launch(Dispatcher(), launch.gpu_launch(1, 4, 3, 2, 8, 8),
                                (DeviceBuffer.of(owner), True))
del owner
gc.collect()
assert alive() is not None, "the launch let its buffer's owner go"
run()
assert launched == [(0, 0, 8, 8, 1 << 12, 4, 2, 16, 8, True)], launched
print("checked", checked)
"""


@requires_numba_cuda
def test_direct_launch_packs_arrays_as_numba_does():
    """The direct launch passes each array as Numba's dispatcher would (same fields, same
    values), and keeps the buffers it passes by address alive while it can run.

    Runs numba-cuda's real target (not the simulator) in a child process; nothing
    touches a GPU, so it runs here too. Fails when a numba-cuda release changes how
    kernel arguments are laid out, before any kernel could read them wrongly.
    """
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    run = subprocess.run([sys.executable, "-c", NUMBA_FLATTENING], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "checked 5" in run.stdout, (run.stdout + run.stderr)[-3000:]


# --- launch shapes ----------------------------------------------------------------------
@pytest.mark.parametrize("dim, item, address, widest, expected", [
    (128, 4, 0, 16, 16), (128, 4, 8, 16, 8), (128, 4, 4, 16, 4), (3, 4, 0, 16, 4),
    (6, 2, 0, 16, 4), (129, 2, 0, 16, 2), (16, 2, 256, 8, 8)])
def test_word_is_the_widest_load_rows_and_address_allow(dim, item, address, widest, expected):
    assert launch.gpu_word_bytes(dim, item, address, widest) == expected


@pytest.mark.parametrize("axis", [1, 2])
@pytest.mark.parametrize("dim", [1, 3, 16, 100, 128, 129, 512, 1000, 4096])
@pytest.mark.parametrize("item, widest", [(4, 8), (4, 16), (2, 8), (2, 16)])
def test_launch_covers_every_word_of_every_row(axis, dim, item, widest):
    word = launch.gpu_word_bytes(dim, item, 0, widest)
    config = launch.gpu_launch(axis, 1000, 7, dim, item, word)
    assert config.words_per_row * config.elements_per_word == dim
    assert config.lanes in (1, 2, 4, 8, 16, 32) and config.block % 32 == 0
    if axis == 1:
        assert config.words_per_lane <= launch.GPU_MAX_WORDS_PER_LANE
        assert config.grid[0] * config.groups_per_block >= 1000
        assert config.grid[1] * config.lanes * config.words_per_lane >= config.words_per_row
    else:
        assert config.grid[0] * config.groups_per_block >= 1000 * 7


def test_launch_past_the_grid_limit_says_so():
    with pytest.raises(ValueError, match="past CUDA's limits"):
        launch.gpu_launch(2, 2**31, 256, 128, 4, 16)


# --- the GPU check script -----------------------------------------------------------------
@pytest.mark.slow
@requires_numba_cuda
def test_gpu_check_script_passes_in_simulate_mode(tmp_path):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", OUT=str(tmp_path))
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--simulate"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert "PASS" in output and "FAIL" not in output
    assert "timings skipped" in output
    assert (tmp_path / "gpu_check.json").exists() and (tmp_path / "gpu_check.md").exists()


# --- the cupy backend's host code, on the CUDA C kernels run on the host --------------------
# CuPy needs a GPU. Its backend's host code (word choice, launch shape, kernel name, the
# argument list, the error flag, copies in and out) is checked here with a NumPy stand-in
# for the few CuPy calls it makes, whose RawModule runs the real CUDA C kernels built for
# the host (tests/test_cuda_sources.py). Results are checked against the float64 reference.
class StandInArray:
    """What the backend uses of cupy.ndarray, over host memory."""

    def __init__(self, host, dtype=None):
        self.host = host
        self.dtype = np.dtype(dtype or host.dtype)  # a bfloat16 table on a GPU reports bfloat16
        self.__cuda_array_interface__ = {"shape": host.shape, "typestr": host.dtype.str,
                                         "data": (host.ctypes.data, False), "strides": None, "version": 3}

    shape = property(lambda self: self.host.shape)
    ndim = property(lambda self: self.host.ndim)
    flags = property(lambda self: self.host.flags)
    @property
    def data(self):
        host = self.host

        class Memory:
            ptr = host.ctypes.data

            @staticmethod
            def memset_async(value, size):
                host.view(np.uint8).reshape(-1)[:size] = value
        return Memory()

    def view(self, dtype):
        return StandInArray(self.host.view(dtype))

    def get(self, out=None):
        if out is None:
            return self.host.copy()
        out[...] = self.host
        return out

    def __getitem__(self, index):
        return StandInArray(np.asarray(self.host[index]))


def cupy_stand_in(library, entries):
    import types

    class Device:
        id = 0

        def __init__(self, *_):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *_):
            return False

    class RawModule:
        def __init__(self, code, options, name_expressions):
            assert "gather_mean_sequence" in code and name_expressions

        def get_function(self, name):
            run = getattr(library, f"run_{entries[name]}")

            def launch(grid, block, args):
                grid = tuple(grid) + (1,) * (2 - len(grid))
                pointers = [a.host.ctypes.data if isinstance(a, StandInArray) else int(a) for a in args]
                assert run(grid[0], grid[1], block[0], *pointers) == 0, f"{name}: lanes diverged"
            return launch

    def asarray(array):
        return array if isinstance(array, StandInArray) else StandInArray(np.array(array, order="C"))

    return types.SimpleNamespace(
        ndarray=StandInArray, int64=np.int64, asarray=asarray, ascontiguousarray=asarray,
        empty=lambda shape, dtype: StandInArray(np.empty(shape, dtype)),
        RawModule=RawModule, cuda=types.SimpleNamespace(Device=Device))


# (table dtype, id dtype, (V, D, B, L), axis, mask_zero, on_device)
STAND_IN_CASES = [
    (np.float32, np.int64, (300, 128, 9, 7), 1, True, False),
    (np.float16, np.int32, (60, 16, 5, 37), 1, False, False),
    (BFLOAT16, np.int64, (300, 64, 3, 4), 2, True, False),
    (np.float32, np.int32, (40, 3, 2, 9), 2, False, True),
    (BFLOAT16, np.int64, (50, 129, 2, 3), 1, True, True),
]


# (table dtype, id dtype, (V, D, B), pooling, weighted, 0): what the cupy backend's bags path stages.
STAND_IN_BAG_CASES = [(np.float32, np.int64, (60, 16, 7), Pooling.SQRTN, True, 0),
                      (BFLOAT16, np.int32, (50, 33, 4), Pooling.MEAN, False, 0)]


@pytest.fixture
def stand_in_cupy(tmp_path, monkeypatch):
    from test_cuda_sources import bag_launch, build_host_kernels, emulated_launch

    from fused_embedding.backends import cupy as cupy_backend
    names = [emulated_launch(t, i, s, a, 0)[0] for t, i, s, a, _, _ in STAND_IN_CASES]
    names += [emulated_launch(np.float32, np.int64, (50, 4, 6, 7), axis, 0)[0] for axis in (1, 2)]
    names += [bag_launch(*case)[0] for case in STAND_IN_BAG_CASES]
    library, entries = build_host_kernels(tmp_path, names)
    monkeypatch.setitem(sys.modules, "cupy", cupy_stand_in(library, entries))
    cupy_backend._kernel.cache_clear()
    yield cupy_backend
    cupy_backend._kernel.cache_clear()


@pytest.mark.parametrize("table_dtype, id_dtype, shape, axis, mask_zero, on_device", STAND_IN_CASES,
                         ids=lambda v: np.dtype(v).name if isinstance(v, (type, np.dtype)) else str(v))
def test_cupy_backend_host_code(rng, stand_in_cupy, table_dtype, id_dtype, shape, axis, mask_zero, on_device):
    table, ids = random_inputs(rng, *shape, table_dtype, id_dtype, padding_fraction=0.3 if mask_zero else 0.0)
    if mask_zero:
        ids[0, 0] = 0
        table[0, :] = np.nan
    expected = embedding_mean_reference(table, ids, axis, mask_zero)
    if on_device:
        elements = np.uint16 if np.dtype(table_dtype).itemsize == 2 else np.float32
        device_table = StandInArray(table.view(elements), dtype=table_dtype)
        result = stand_in_cupy.embedding_mean(device_table, StandInArray(ids), Axis(axis), mask_zero)
        assert isinstance(result, StandInArray)  # stays on the device
        out = result.get().view(table_dtype)
    else:
        out = conformance.run_poisoned(stand_in_cupy, table, ids, axis, mask_zero)
    assert not unwritten(out).any()
    assert_close(out, expected, table_dtype)


@pytest.mark.parametrize("case", STAND_IN_BAG_CASES, ids=lambda c: f"{np.dtype(c[0]).name}-{c[3].value}")
def test_cupy_backend_bags_host_code(rng, stand_in_cupy, case):
    from test_cuda_sources import random_bags

    from fused_embedding.reference import embedding_bag_reference
    table_dtype, id_dtype, (vocab, dim, batch), pooling, weighted, _ = case
    table, values, offsets, weights = random_bags(rng, vocab, dim, batch, table_dtype, id_dtype, weighted)
    out = poisoned((batch, dim), table_dtype)
    assert stand_in_cupy.embedding_bag(table, values, offsets, weights, pooling, out=out) is out
    assert not unwritten(out).any()
    assert_close(out, embedding_bag_reference(table, values, offsets, weights, pooling.value), table_dtype)
    bag = int(np.flatnonzero(np.diff(offsets))[-1])  # the last bag with ids
    values[int(offsets[bag])] = vocab
    with pytest.raises(IndexError, match=rf"id {vocab} at values\[{int(offsets[bag])}\] \(bag {bag}\)"):
        stand_in_cupy.embedding_bag(table, values, offsets, weights, pooling)


@pytest.mark.parametrize("axis", [1, 2])
def test_cupy_backend_raises_for_the_first_bad_id(rng, stand_in_cupy, axis):
    table, ids = random_inputs(rng, 50, 4, 6, 7, id_dtype=np.int64)
    ids[5, 0] = -3
    ids[4, 5] = 50
    with pytest.raises(IndexError, match=r"id 50 at ids\[4, 5\] is out of range for a table of 50 rows"):
        stand_in_cupy.embedding_mean(table, ids, Axis(axis), False)
    empty = stand_in_cupy.embedding_mean(table, ids[:0], Axis(axis), False)
    assert isinstance(empty, np.ndarray) and empty.shape == ((0, 4) if axis == 1 else (0, 7))




def test_gpu_check_lists_each_compiled_kernels_resources(monkeypatch):
    """The GPU check's kernel table, from the driver's attributes (stood in for here: the
    simulator has no compiled kernels to ask)."""
    import importlib.util
    from types import SimpleNamespace
    from fused_embedding.kernels import cuda as kernels
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    built = kernels.make_gather_mean_sequence(0, "uint64", 4, 2, 8)  # memoised: listed once
    assert [k for _, k in kernels.BUILT_KERNELS].count(built) == 1
    assert ("gather_mean_sequence(fmt=0, word=uint64, lanes=4, words_per_lane=2, rows_in_flight=8)"
            in [name for name, _ in kernels.BUILT_KERNELS])
    compiled = SimpleNamespace(regs_per_thread=48, local_mem_per_thread=0, shared_mem_per_block=2048)
    monkeypatch.setattr(kernels, "BUILT_KERNELS",
                        [("gather_mean_sequence(fmt=1, ...)", SimpleNamespace(overloads={("a", "b"): compiled}))])
    report = gpu_check.Report()
    gpu_check.report_kernel_resources(report)
    assert report.lines[-1] == ("gather_mean_sequence(fmt=1, ...): 48 registers/thread, 0 B local/thread, "
                                "2048 B shared/block (a, b)")
