"""Index arithmetic is 64-bit: tables with more than 2^31 elements (or rows) return the right rows near their end.

The tables are ``np.empty`` (4-9 GB of address space) with only the rows the
ids name written, so only those pages are ever committed: the tests also check
that the process' resident memory grows by far less than the table, which
shows no backend step copied or touched the whole table.
"""
import os

import numpy as np
import pytest

import fused_embedding as fe
from fused_embedding.reference import embedding_mean_reference
from fused_embedding.validation import assert_close
from conftest import numba_cuda_device_skip_reason

psutil = pytest.importorskip("psutil", reason="psutil measures resident memory")

# Resident growth allowed for a multi-GB table of which a few hundred rows are written.
RSS_GROWTH_LIMIT = 256 * 2**20


def sparse_table(rng, vocab, dim, dtype, rows):
    """np.empty (V, D) table with only ``rows`` written (random normals); the rest never touched."""
    table = np.empty((vocab, dim), dtype)
    table[rows] = rng.standard_normal((len(rows), dim), dtype=np.float32).astype(dtype)
    return table


def ids_near_the_end(rng, vocab, dim, batch, length, id_dtype):
    """(B, L) ids: the last rows, the rows either side of element 2^31, and row 0 (padding)."""
    boundary = 2**31 // dim
    special = np.array([vocab - 1, vocab - 2, vocab - 1000, boundary - 1, boundary, boundary + 1, 0, 1])
    tail = rng.integers(vocab - 2000, vocab, batch * length)
    ids = np.where(rng.random(batch * length) < 0.5, rng.choice(special, batch * length), tail)
    ids[:len(special)] = special  # each at least once
    return ids.reshape(batch, length).astype(id_dtype)


def reference_on_touched_rows(table, ids, axis, mask_zero):
    """The float64 reference on the touched rows only (the reference reads the whole table)."""
    rows, local_ids = np.unique(ids, return_inverse=True)  # rows sorted: row 0, if present, stays local 0
    local_ids = local_ids.reshape(ids.shape)
    if mask_zero and rows[0] != 0:
        rows, local_ids = np.concatenate([[0], rows]), local_ids + 1  # keep local 0 the padding id
    return embedding_mean_reference(table[rows], local_ids, axis, mask_zero)


def rss():
    return psutil.Process(os.getpid()).memory_info().rss


CASES = [
    # (V, D, table dtype, id dtype): V*D > 2^31 elements; and V > 2^31 rows, ids past int32.
    (2**31 // 64 + 1000, 64, np.float16, np.int32),
    (2**31 // 64 + 1000, 64, np.float32, np.int64),
    (2**31 + 1000, 1, np.float16, np.int64),
]


@pytest.mark.parametrize("vocab, dim, table_dtype, id_dtype", CASES,
                         ids=lambda v: np.dtype(v).name if isinstance(v, type) else str(v))
def test_cpu_reads_rows_past_2_to_the_31(rng, vocab, dim, table_dtype, id_dtype):
    ids = ids_near_the_end(rng, vocab, dim, 6, 12, id_dtype)
    before = rss()
    table = sparse_table(rng, vocab, dim, table_dtype, np.unique(ids))
    assert vocab * dim > 2**31
    for axis in (1, 2):
        for mask_zero in (False, True):
            actual = fe.embedding_mean(table, ids, axis=axis, mask_zero=mask_zero, backend="cpu")
            assert_close(actual, reference_on_touched_rows(table, ids, axis, mask_zero), table_dtype)
    bad = ids.astype(np.int64)
    bad[5, 11] = vocab
    with pytest.raises(IndexError, match=rf"id {vocab} at ids\[5, 11\] is out of range for a table of {vocab} rows"):
        fe.embedding_mean(table, bad, backend="cpu")
    growth = rss() - before
    assert growth < RSS_GROWTH_LIMIT, f"resident memory grew {growth / 2**20:.0f} MiB for a sparse table"


def gpu_skip_reason():
    return numba_cuda_device_skip_reason(
        "the CUDA simulator indexes with 64-bit NumPy integers, so it cannot show a 32-bit "
        "overflow, and it copies the whole (multi-GB) host table to its simulated device")


@pytest.mark.skipif(gpu_skip_reason() is not None, reason=str(gpu_skip_reason()))
def test_numba_cuda_reads_rows_past_2_to_the_31(rng):
    # float32, odd D: single-float32 loads, so word offsets (not just element
    # offsets) pass 2^31. The host table is copied to the GPU (8.6 GB there);
    # reading never-written host pages commits no host memory.
    from numba import cuda
    dim = 65
    vocab = 2**31 // dim + 1000
    free, _ = cuda.current_context().get_memory_info()
    if free < vocab * dim * 4 * 1.2:
        pytest.skip(f"the GPU has {free / 2**30:.1f} GiB free; this test needs {vocab * dim * 4 / 2**30:.1f} GiB")
    ids = ids_near_the_end(rng, vocab, dim, 6, 12, np.int64)
    table = sparse_table(rng, vocab, dim, np.float32, np.unique(ids))
    for axis in (1, 2):
        actual = fe.embedding_mean(table, ids, axis=axis, backend="numba-cuda")
        assert_close(np.asarray(actual), reference_on_touched_rows(table, ids, axis, False), np.float32)
