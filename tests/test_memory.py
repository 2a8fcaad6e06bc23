"""Aligned host buffers (fused_embedding.memory) and the launch heuristics that size CPU work."""
import numpy as np
import pytest

from fused_embedding import launch, memory, providers
from fused_embedding.semantics import BFLOAT16


@pytest.mark.parametrize("shape", [(7,), (1000, 17), (3, 0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, BFLOAT16, np.int64])
@pytest.mark.parametrize("alignment", [64, 4096])
def test_empty_aligned_starts_on_the_boundary(shape, dtype, alignment):
    array = memory.empty_aligned(shape, dtype, alignment=alignment)
    assert array.shape == shape and array.dtype == np.dtype(dtype) and array.flags.c_contiguous
    if array.size:  # NumPy may point an empty array anywhere
        assert array.ctypes.data % alignment == 0
    array[...] = 1  # writable, and every element inside the buffer
    assert (array == 1).all()


def test_empty_on_huge_pages_large_vectors_start_on_a_huge_page():
    big = memory.empty_on_huge_pages(1_000_000, np.float32)
    assert big.shape == (1_000_000,) and big.dtype == np.float32
    assert big.ctypes.data % memory.HUGE_PAGE_BYTES == 0
    assert big.base.nbytes >= memory.NUMPY_HUGE_PAGE_MIN_BYTES  # large enough for NumPy to advise huge pages
    small = memory.empty_on_huge_pages(100, np.float32)
    assert small.shape == (100,) and small.base is None  # an ordinary array: no padding for small ones


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BFLOAT16])
def test_benchmark_tables_are_cache_line_aligned(rng, dtype):
    table = providers.random_table(rng, 1000, 17, dtype)
    assert table.ctypes.data % 64 == 0 and table.dtype == np.dtype(dtype) and table.shape == (1000, 17)
    values = table.astype(np.float32)
    assert values.min() >= -1 and values.max() <= 1 and values.std() > 0.3


def test_rows_ahead_is_about_8_kb_within_bounds():
    for row_bytes in (1, 2, 64, 100, 128, 256, 512, 2048, 1 << 20):
        ahead = launch.cpu_rows_ahead(row_bytes)
        assert 16 <= ahead <= 128
    assert launch.cpu_rows_ahead(64) == 128 and launch.cpu_rows_ahead(256) == 32
    assert launch.cpu_rows_ahead(512) == 16


def test_serial_threshold_counts_whole_cache_lines():
    lines = launch.CPU_SERIAL_MAX_BYTES // 64
    assert launch.cpu_runs_serial(lines, 64) and not launch.cpu_runs_serial(lines + 1, 64)
    assert launch.cpu_runs_serial(lines, 4)  # a 4-byte read still costs a line
    assert not launch.cpu_runs_serial(lines, 65)  # 65 bytes span two lines
