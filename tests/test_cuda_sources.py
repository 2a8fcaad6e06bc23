"""The CUDA C kernels without a GPU: they compile for sm_80 and sm_90 without spills, and they compute the op.

No GPU is needed: nvcc compiles (``-cubin``), ptxas reports registers and spills
(``-Xptxas -v``). Then the same source, compiled as host C++ with one OS thread
per CUDA thread and warp shuffles exchanged through a per-warp barrier, runs the
"cupy" backend's kernels, launched as that backend launches them, against the
float64 reference. The templates are instantiated with every name the "cupy"
backend can ask CuPy for with int64 ids (``all_kernel_names``), and with int32
ids for narrow rows (the id type changes one load, not the register budget), so
what is checked here is what NVRTC will build on a GPU machine.
"""
import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fused_embedding import launch
from fused_embedding.backends import cupy as cupy_backend
from fused_embedding.reference import embedding_mean_reference
from fused_embedding.semantics import BFLOAT16, Axis, output_shape, table_format
from fused_embedding.spec import Pooling
from fused_embedding.validation import assert_close, poisoned, random_inputs, unwritten

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
SOURCES = sorted(KERNELS.glob("*.cu"))
ARCHS = ["sm_80", "sm_90"]
NVCC = shutil.which("nvcc")
KERNEL_NAMES = sorted(set(cupy_backend.all_kernel_names(id_dtypes=[np.dtype(np.int64)]))
                      | set(cupy_backend.all_kernel_names(16, id_dtypes=[np.dtype(np.int32)])))
# The dense kernels' one parameter list, and the bags kernel's (see kernels/gather_mean.cu).
PARAMETERS = "const void*, const void*, long long, long long, long long, long long, int, void*, long long*"
BAG_PARAMETERS = ("const void*, const void*, const long long*, const float*, long long, long long, long long, "
                  "void*, long long*")
# Bags: every launch shape in its heaviest variant (weighted sqrtn: one more load and a
# square root per bag); the other five differ from it in a few scalar instructions.
BAG_KERNEL_NAMES = cupy_backend.all_bag_kernel_names(variants=[(Pooling.SQRTN, True)])

GXX = shutil.which("g++")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed: CUDA C sources cannot be compiled here")


def instantiations(source: Path) -> str:
    """The source plus an explicit instantiation of every kernel the backend may launch."""
    lines = [f'#include "{source}"']
    if source.name == cupy_backend.SOURCE_FILE:
        lines += [f"template __global__ void {name}({PARAMETERS});" for name in KERNEL_NAMES]
        lines += [f"template __global__ void {name}({BAG_PARAMETERS});" for name in BAG_KERNEL_NAMES]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def ptxas_reports(tmp_path_factory):
    """{(source name, arch): (returncode, nvcc output)}, the archs compiled in parallel."""
    folder = tmp_path_factory.mktemp("cuda")
    reports = {}
    for source in SOURCES:
        wrapper = folder / f"{source.stem}_instances.cu"
        wrapper.write_text(instantiations(source))
        runs = {arch: subprocess.Popen([NVCC, "-std=c++17", "-cubin", f"-arch={arch}", "-Xptxas", "-v",
                                        str(wrapper), "-o", str(folder / f"{source.stem}.{arch}.cubin")],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for arch in ARCHS}
        for arch, run in runs.items():
            output, _ = run.communicate(timeout=600)
            reports[source.name, arch] = (run.returncode, output)
    return reports


def test_there_are_sources():
    assert cupy_backend.SOURCE_FILE in [s.name for s in SOURCES]


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", [s.name for s in SOURCES])
def test_compiles_without_spills(ptxas_reports, source, arch):
    returncode, output = ptxas_reports[source, arch]
    assert returncode == 0, f"nvcc failed for {source} on {arch}:\n{output[-4000:]}"
    functions = re.findall(r"Compiling entry function '(\w+)'", output)
    if source == cupy_backend.SOURCE_FILE:
        assert len(functions) == len(KERNEL_NAMES) + len(BAG_KERNEL_NAMES), "not every instantiation was compiled"
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", output)
    assert len(spills) == len(functions)
    spilled = [(name, stores, loads) for name, (stores, loads) in zip(functions, spills)
               if int(stores) or int(loads)]
    assert not spilled, (f"{len(spilled)} kernels spill registers on {arch}: " + "; ".join(
        f"{name}: {stores} B stored, {loads} B loaded" for name, stores, loads in spilled[:5]))


# --- the kernels run on the host --------------------------------------------------------
# Stand-ins for what the kernels use from CUDA: thread and block indices (per OS thread),
# uint2/uint4, bit casts, a locked atomicMin, and shuffles that meet at a per-warp barrier
# (a barrier that times out instead of hanging, and says so, if lanes ever diverge).
HOST_PRELUDE = r"""
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
struct Dim { unsigned x, y; };
thread_local Dim threadIdx, blockIdx;
static Dim blockDim;
static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static inline float host_half_bits_to_float(unsigned bits) {
    unsigned short h = (unsigned short)bits; _Float16 v; std::memcpy(&v, &h, 2); return (float)v;
}
static inline unsigned short host_float_to_half_bits(float value) {
    _Float16 v = (_Float16)value; unsigned short h; std::memcpy(&h, &v, 2); return h;
}
static std::mutex atomic_lock;
static inline long long atomicMin(long long* address, long long value) {
    std::lock_guard<std::mutex> guard(atomic_lock);
    long long old = *address;
    if (value < old) *address = value;
    return old;
}
static int diverged = 0;
struct Warp {
    std::mutex lock; std::condition_variable cv; int waiting = 0; long generation = 0;
    long long ints[32]; float floats[32];
    void sync() {
        std::unique_lock<std::mutex> guard(lock);
        long my_generation = generation;
        if (++waiting == 32) { waiting = 0; ++generation; cv.notify_all(); return; }
        if (!cv.wait_for(guard, std::chrono::seconds(20), [&] { return generation != my_generation; })) diverged = 1;
    }
};
thread_local Warp* warp;
static inline long long __shfl_sync(unsigned, long long value, int source, int width) {
    int lane = threadIdx.x % 32;
    warp->ints[lane] = value; warp->sync();
    long long result = warp->ints[lane / width * width + source % width]; warp->sync();
    return result;
}
static inline float __shfl_xor_sync(unsigned, float value, int mask, int width) {
    int lane = threadIdx.x % 32;
    warp->floats[lane] = value; warp->sync();
    float result = warp->floats[(lane ^ mask) % 32]; warp->sync();
    return result;
}
template <typename Kernel, typename... Args>
static int launch_on_host(Kernel kernel, unsigned grid_x, unsigned grid_y, unsigned block, Args... args) {
    blockDim = {block, 1};
    for (unsigned by = 0; by < grid_y; ++by)
        for (unsigned bx = 0; bx < grid_x; ++bx) {
            std::vector<Warp> warps(block / 32);
            std::vector<std::thread> threads;
            for (unsigned t = 0; t < block; ++t)
                threads.emplace_back([&, t] { threadIdx = {t, 0}; blockIdx = {bx, by}; warp = &warps[t / 32]; kernel(args...); });
            for (auto& thread : threads) thread.join();
        }
    return diverged;
}
#define FUSED_EMBEDDING_HOST_EMULATION 1
"""

# (table dtype, id dtype, (V, D, B, L), axis, mask_zero, element offset of the table): D = 1,
# odd, narrow (sub-warps of 2-16 lanes), wide with column tiles; L past one ids stage; an
# offset table that forces narrower words.
EMULATED_CASES = [
    (np.float32, np.int32, (40, 1, 3, 5), 1, False, 0),
    (np.float32, np.int64, (40, 3, 2, 9), 2, True, 0),
    (np.float32, np.int64, (60, 16, 5, 37), 1, True, 0),
    (np.float32, np.int32, (60, 16, 5, 6), 2, False, 0),
    (np.float32, np.int64, (300, 128, 9, 7), 1, False, 0),
    (np.float32, np.int64, (300, 128, 3, 4), 2, True, 1),
    (np.float32, np.int32, (50, 129, 2, 3), 1, True, 0),
    (np.float32, np.int64, (20, 2100, 2, 3), 1, False, 0),
    (np.float16, np.int64, (40, 1, 4, 3), 1, True, 0),
    (np.float16, np.int32, (60, 8, 3, 33), 1, False, 0),
    (np.float16, np.int64, (300, 128, 5, 9), 1, True, 0),
    (np.float16, np.int64, (300, 128, 2, 5), 2, False, 0),
    (np.float16, np.int32, (50, 33, 3, 4), 2, True, 0),
    (BFLOAT16, np.int64, (40, 2, 3, 4), 1, False, 0),
    (BFLOAT16, np.int32, (300, 128, 4, 9), 1, True, 0),
    (BFLOAT16, np.int64, (300, 64, 3, 4), 2, True, 2),
    (BFLOAT16, np.int64, (70, 512, 2, 6), 2, False, 0),
]

BOUNDS_CASES = [(np.float32, np.int64, (50, 16, 6, 7), axis, False, 0) for axis in (1, 2)]


def emulated_launch(table_dtype, id_dtype, shape, axis, offset):
    """(kernel name, launch) exactly as the cupy backend picks them, the table at ``offset`` elements."""
    vocab, dim, batch, length = shape
    item = np.dtype(table_dtype).itemsize
    word = launch.gpu_word_bytes(dim, item, offset * item, cupy_backend.MAX_WORD_BYTES)
    config = launch.gpu_launch(Axis(axis), batch, length, dim, item, word)
    name = cupy_backend.kernel_name(Axis(axis), table_format(table_dtype), config, id_dtype)
    return name, config


def build_host_kernels(folder: Path, names) -> tuple:
    """(library, {kernel name: index}): the CUDA C kernels as host C++, entry point run_<index> per name.

    run_<index>(grid x, grid y, block, then the kernel's own arguments) -> 1 if lanes diverged.
    """
    if GXX is None:
        pytest.skip("g++ is not installed: the CUDA C kernels cannot be run on the host")
    names = sorted(set(names))
    lines = [HOST_PRELUDE, f'#include "{KERNELS / cupy_backend.SOURCE_FILE}"']
    for index, name in enumerate(names):
        if name.startswith("gather_bags"):
            lines.append(f'extern "C" int run_{index}(unsigned gx, unsigned gy, unsigned block, const void* table, '
                         f'const void* values, const long long* offsets, const float* weights, long long b, '
                         f'long long v, long long w, void* out, long long* bad) {{ return launch_on_host({name}, '
                         f'gx, gy, block, table, values, offsets, weights, b, v, w, out, bad); }}')
            continue
        lines.append(f'extern "C" int run_{index}(unsigned gx, unsigned gy, unsigned block, const void* table, '
                     f'const void* ids, long long b, long long l, long long v, long long w, int mask, void* out, '
                     f'long long* bad) {{ return launch_on_host({name}, gx, gy, block, table, ids, b, l, v, w, '
                     f'mask, out, bad); }}')
    source = folder / "host_kernels.cpp"
    source.write_text("\n".join(lines) + "\n")
    library = folder / "host_kernels.so"
    build = subprocess.run([GXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-x", "c++", str(source),
                            "-o", str(library)], capture_output=True, text=True)
    assert build.returncode == 0, f"the kernels do not build as host C++:\n{build.stderr[-4000:]}"
    library = ctypes.CDLL(str(library))
    for index, name in enumerate(names):
        getattr(library, f"run_{index}").argtypes = (
            [ctypes.c_uint] * 3 + [ctypes.c_void_p] * 4 + [ctypes.c_longlong] * 3 + [ctypes.c_void_p] * 2
            if name.startswith("gather_bags") else
            [ctypes.c_uint] * 3 + [ctypes.c_void_p] * 2 + [ctypes.c_longlong] * 4
            + [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p])
    return library, {name: index for index, name in enumerate(names)}


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    """The kernels of every emulated case, built for the host."""
    return build_host_kernels(tmp_path_factory.mktemp("host_kernels"),
                              [emulated_launch(t, i, s, a, o)[0] for t, i, s, a, _, o in EMULATED_CASES + BOUNDS_CASES])


def run_on_host(host_kernels, table, ids, axis, mask_zero, offset=0):
    """The kernel the cupy backend would launch, run on the host; poisoned output; (out, first bad position)."""
    library, entry = host_kernels
    vocab, dim = table.shape
    batch, length = ids.shape
    name, config = emulated_launch(table.dtype, ids.dtype, (vocab, dim, batch, length), axis, offset)
    elements = np.uint16 if table.dtype.itemsize == 2 else np.float32
    # The table placed `offset` elements into an aligned buffer, as a view of a GPU buffer may be.
    buffer = np.zeros(vocab * dim + offset + 16, dtype=elements)
    start = (-buffer.ctypes.data % 16) // buffer.itemsize + offset
    placed = buffer[start:start + vocab * dim].reshape(vocab, dim)
    placed[...] = table.view(elements)
    out = poisoned(output_shape(Axis(axis), batch, length, dim), table.dtype)
    bad = np.array([batch * length], dtype=np.int64)
    ids = np.ascontiguousarray(ids)
    grid = tuple(config.grid) + (1,) * (2 - len(config.grid))
    run = getattr(library, f"run_{entry[name]}")
    diverged = run(grid[0], grid[1], config.block, placed.ctypes.data, ids.ctypes.data, batch, length, vocab,
                   config.words_per_row, int(mask_zero), out.ctypes.data, bad.ctypes.data)
    assert diverged == 0, f"{name}: lanes of a warp reached different shuffles"
    return out, int(bad[0])


@pytest.mark.parametrize("table_dtype, id_dtype, shape, axis, mask_zero, offset", EMULATED_CASES,
                         ids=lambda v: np.dtype(v).name if isinstance(v, type) or isinstance(v, np.dtype) else str(v))
def test_kernels_compute_the_op_on_the_host(rng, host_kernels, table_dtype, id_dtype, shape, axis, mask_zero, offset):
    table, ids = random_inputs(rng, *shape, table_dtype, id_dtype, padding_fraction=0.3 if mask_zero else 0.0)
    if mask_zero:
        ids[0, 0] = 0
        table[0, :] = np.nan  # the padding row is never read
    out, bad = run_on_host(host_kernels, table, ids, axis, mask_zero, offset)
    assert bad == ids.size, f"no id is out of range, yet the kernel flagged position {bad}"
    assert not unwritten(out).any(), "output elements left unwritten"
    assert_close(out, embedding_mean_reference(table, ids, axis, mask_zero), table_dtype)


@pytest.mark.parametrize("table_dtype, id_dtype, shape, axis, mask_zero, offset", BOUNDS_CASES)
def test_kernels_flag_the_first_bad_position_on_the_host(rng, host_kernels, table_dtype, id_dtype, shape, axis,
                                                         mask_zero, offset):
    table, ids = random_inputs(rng, *shape, table_dtype, id_dtype)
    ids[5, 0] = -1
    ids[4, 5] = 50
    ids[4, 6] = 2**40
    _, bad = run_on_host(host_kernels, table, ids, axis, False)
    assert divmod(bad, 7) == (4, 5)


# --- CSR bags ----------------------------------------------------------------------------
# (table dtype, id dtype, (V, D, B), pooling, weighted, element offset of the table)
BAG_CASES = [
    (np.float32, np.int64, (40, 1, 5), Pooling.MEAN, False, 0),
    (np.float32, np.int32, (60, 16, 7), Pooling.SQRTN, True, 0),
    (np.float32, np.int64, (300, 128, 9), Pooling.SUM, True, 1),
    (np.float16, np.int64, (300, 128, 6), Pooling.MEAN, True, 0),
    (np.float16, np.int32, (50, 33, 4), Pooling.SQRTN, False, 0),
    (BFLOAT16, np.int64, (70, 512, 3), Pooling.SUM, False, 0),
    (BFLOAT16, np.int64, (40, 2, 5), Pooling.MEAN, True, 2),
]


def bag_launch(table_dtype, id_dtype, shape, pooling, weighted, offset):
    vocab, dim, batch = shape
    item = np.dtype(table_dtype).itemsize
    word = launch.gpu_word_bytes(dim, item, offset * item, cupy_backend.MAX_WORD_BYTES)
    config = launch.gpu_launch(Axis.SEQUENCE, batch, 1, dim, item, word)
    return cupy_backend.bag_kernel_name(table_format(table_dtype), config, pooling, weighted, id_dtype), config


@pytest.fixture(scope="module")
def host_bag_kernels(tmp_path_factory):
    return build_host_kernels(tmp_path_factory.mktemp("host_bag_kernels"),
                              [bag_launch(*case)[0] for case in BAG_CASES])


def random_bags(rng, vocab, dim, batch, table_dtype, id_dtype, weighted):
    from fused_embedding import validation
    return validation.random_bags(rng, vocab, dim, validation.short_bag_lengths(rng, batch), table_dtype,
                                  id_dtype, weighted)


def run_bags_on_host(host_bag_kernels, case, table, values, offsets, weights):
    library, entry = host_bag_kernels
    table_dtype, id_dtype, (vocab, dim, batch), pooling, weighted, offset = case
    name, config = bag_launch(*case)
    elements = np.uint16 if np.dtype(table_dtype).itemsize == 2 else np.float32
    buffer = np.zeros(vocab * dim + offset + 16, dtype=elements)
    start = (-buffer.ctypes.data % 16) // buffer.itemsize + offset
    placed = buffer[start:start + vocab * dim].reshape(vocab, dim)
    placed[...] = table.view(elements)
    out = poisoned((batch, dim), table_dtype)
    bad = np.array([values.shape[0]], dtype=np.int64)
    weights_buffer = weights if weights is not None else np.zeros(1, np.float32)
    grid = tuple(config.grid) + (1,) * (2 - len(config.grid))
    diverged = getattr(library, f"run_{entry[name]}")(
        grid[0], grid[1], config.block, placed.ctypes.data, values.ctypes.data, offsets.ctypes.data,
        weights_buffer.ctypes.data, batch, vocab, config.words_per_row, out.ctypes.data, bad.ctypes.data)
    assert diverged == 0
    return out, int(bad[0])


@pytest.mark.parametrize("case", BAG_CASES, ids=lambda c: f"{np.dtype(c[0]).name}-{np.dtype(c[1]).name}-"
                                                          f"D{c[2][1]}-{c[3].value}-w{int(c[4])}-off{c[5]}")
def test_bag_kernel_computes_the_op_on_the_host(rng, host_bag_kernels, case):
    from fused_embedding.validation import compare_bags
    table_dtype, id_dtype, (vocab, dim, batch), pooling, weighted, _ = case
    table, values, offsets, weights = random_bags(rng, vocab, dim, batch, table_dtype, id_dtype, weighted)
    out, bad = run_bags_on_host(host_bag_kernels, case, table, values, offsets, weights)
    assert bad == values.shape[0], f"no id is out of range, yet the kernel flagged position {bad}"
    assert not unwritten(out).any(), "output elements left unwritten"
    report = compare_bags(out, table, values, offsets, weights, pooling.value)  # within float32 summation's bound
    assert report is None, report


def test_bag_kernel_flags_the_first_bad_position_on_the_host(rng, host_bag_kernels):
    case = BAG_CASES[2]
    table_dtype, id_dtype, (vocab, dim, batch), pooling, weighted, _ = case
    table, values, offsets, weights = random_bags(rng, vocab, dim, batch, table_dtype, id_dtype, weighted)
    values = np.concatenate([values, [vocab, -1, 2**40]]).astype(id_dtype)
    weights = np.concatenate([weights, np.ones(3, np.float32)])
    offsets[-1] = values.shape[0]
    _, bad = run_bags_on_host(host_bag_kernels, case, table, values, offsets, weights)
    assert bad == values.shape[0] - 3
