"""The axis-2 row-mean cache: used only for tables proven constant, bounded in bytes,
never keeping a table alive that nothing else references."""
import gc
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fused_embedding as fe
from fused_embedding import backends, row_mean_cache
from fused_embedding.reference import embedding_mean_reference
from fused_embedding.semantics import BFLOAT16, Axis, output_shape
from fused_embedding.validation import assert_close, poisoned, random_inputs, unwritten


@pytest.fixture(autouse=True)
def empty_cache():
    row_mean_cache.clear()
    yield
    row_mean_cache.clear()


def run_cpu(table, ids, mask_zero=False):
    """Axis 2 on the cpu backend into a poisoned output, so an unwritten element fails."""
    out = poisoned(output_shape(Axis.EMBEDDING, *ids.shape, table.shape[1]), table.dtype)
    assert backends.get("cpu").embedding_mean(table, ids, Axis.EMBEDDING, mask_zero, out=out) is out
    assert not unwritten(out).any(), "kernel left output elements unwritten"
    return out


@pytest.mark.parametrize("table_dtype", [np.float32, np.float16, BFLOAT16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("mask_zero", [False, True])
def test_cached_path_matches_reference(rng, table_dtype, mask_zero):
    values, ids = random_inputs(rng, 300, 37, 9, 11, table_dtype, padding_fraction=0.3 if mask_zero else 0.0)
    table = fe.frozen_table(values)
    expected = embedding_mean_reference(values, ids, 2, mask_zero)
    first = run_cpu(table, ids, mask_zero)
    assert row_mean_cache.cached_tables() == 1
    second = run_cpu(table, ids, mask_zero)
    assert_close(first, expected, table_dtype)
    np.testing.assert_array_equal(first, second)


def test_a_read_only_numpy_array_is_not_trusted(rng):
    """Issue 19.1: a writable view made before setflags(write=False) still writes the table."""
    table = rng.standard_normal((100, 32), dtype=np.float32)
    ids = rng.integers(0, 100, (8, 5)).astype(np.int32)
    view = table[:]
    table.setflags(write=False)
    assert_close(run_cpu(table, ids), embedding_mean_reference(table, ids, 2), np.float32)
    view[:] = 7.0
    np.testing.assert_array_equal(run_cpu(table, ids), np.full(ids.shape, 7.0, np.float32))
    np.testing.assert_array_equal(fe.embedding_mean(table, ids, axis=2, backend="numpy"), run_cpu(table, ids))
    assert row_mean_cache.cached_tables() == 0 and not row_mean_cache.is_constant(table)


@pytest.mark.parametrize("table_dtype", [np.float32, np.float16, BFLOAT16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("vocab", [1, 3, 1000, 5000])  # small tables come from the heap, large from mmap
def test_frozen_table_is_an_unwritable_copy(rng, table_dtype, vocab):
    values, _ = random_inputs(rng, vocab, 33, 1, 1, table_dtype)
    table = fe.frozen_table(values)
    assert table.dtype == values.dtype and table.shape == values.shape and table.flags.c_contiguous
    np.testing.assert_array_equal(table.view(np.uint8), values.view(np.uint8))
    assert table.ctypes.data % 64 == 0
    assert not table.flags.writeable
    with pytest.raises(ValueError, match="WRITEABLE"):
        table.setflags(write=True)
    with pytest.raises(ValueError, match="WRITEABLE"):
        table[:, 3:].setflags(write=True)
    values[:] = 0  # a copy: the source's later changes don't reach it
    assert table.view(np.uint16 if table.dtype.itemsize == 2 else np.uint32).any()
    assert row_mean_cache.is_constant(table) and row_mean_cache.is_constant(table[vocab // 2:, 2:])
    with pytest.raises(TypeError, match="numeric array, got dtype object"):
        fe.frozen_table(np.array([[1, "a"]], dtype=object))


def test_what_counts_as_constant(rng):
    """The owner of the memory decides, never a write flag on the way to it."""
    table, _ = random_inputs(rng, 50, 8, 1, 1)
    read_only = table.copy()
    read_only.setflags(write=False)
    assert not row_mean_cache.is_constant(read_only)  # can be made writable again
    view = table[:]
    view.setflags(write=False)
    assert not row_mean_cache.is_constant(view)
    assert not row_mean_cache.is_constant(np.frombuffer(memoryview(table).toreadonly(), np.float32))
    buffer = bytearray(table.tobytes())  # a mutable owner
    assert not row_mean_cache.is_constant(np.frombuffer(memoryview(buffer).toreadonly(), np.float32))
    assert row_mean_cache.is_constant(np.frombuffer(table.tobytes(), np.float32))  # immutable bytes
    frozen = fe.frozen_table(table)
    assert row_mean_cache.is_constant(np.frombuffer(memoryview(frozen).toreadonly(), np.float32))


def test_an_edited_writable_table_is_seen(rng):
    table, ids = random_inputs(rng, 50, 8, 4, 6)
    before = run_cpu(table, ids)
    table[ids[0, 0]] += 1.0
    after = run_cpu(table, ids)
    assert after[0, 0] == pytest.approx(before[0, 0] + 1.0, rel=1e-5)
    assert_close(after, embedding_mean_reference(table, ids, 2), np.float32)
    assert row_mean_cache.cached_tables() == 0


def test_an_entry_goes_with_its_table_and_its_views(rng):
    """The cache holds a frozen table weakly: it never keeps one alive."""
    table, ids = random_inputs(rng, 80, 8, 4, 6)
    frozen = fe.frozen_table(table)
    run_cpu(frozen, ids)
    assert row_mean_cache.cached_tables() == 1 and row_mean_cache.cached_bytes() == 80 * 4
    view = frozen[:, 2:]  # keeps the frozen table (and so its entry) alive
    del frozen
    gc.collect()
    assert row_mean_cache.cached_tables() == 1
    assert_close(run_cpu(view, ids), embedding_mean_reference(table[:, 2:], ids, 2), np.float32)
    assert row_mean_cache.cached_tables() == 2
    del view
    assert row_mean_cache.cached_tables() == 0 and row_mean_cache.cached_bytes() == 0


def test_a_reused_address_never_hits_a_stale_entry(rng):
    """Tables of one size made and dropped in turn land at the same addresses."""
    ids = rng.integers(0, 64, (5, 7)).astype(np.int32)
    addresses = set()
    for _ in range(12):
        table = fe.frozen_table(rng.standard_normal((64, 16), dtype=np.float32))
        addresses.add(table.ctypes.data)
        assert_close(run_cpu(table, ids), embedding_mean_reference(table, ids, 2), np.float32)
        del table
    assert row_mean_cache.cached_tables() == 0


def test_the_same_array_reshaped_in_place_is_rebuilt(rng):
    """The cache knows the last table by identity; an in-place change of shape (the buffer
    stays, its reading changes) must still give that reading's means."""
    table = fe.frozen_table(rng.standard_normal((60, 16)).astype(np.float16))
    ids = rng.integers(0, 30, (4, 6)).astype(np.int32)
    run_cpu(table, ids)
    table.shape = (120, 8)  # the same bytes as 120 rows of 8
    assert_close(run_cpu(table, ids), embedding_mean_reference(table, ids, 2), np.float16)
    table.shape = (30, 32)
    assert_close(run_cpu(table, ids), embedding_mean_reference(table, ids, 2), np.float16)
    assert row_mean_cache.cached_tables() == 3


def test_cache_is_capped_by_bytes(rng, monkeypatch):
    vocab = 200
    monkeypatch.setattr(row_mean_cache, "MAX_BYTES", 3 * vocab * 4)  # three tables' means
    ids = rng.integers(0, vocab, (3, 4)).astype(np.int32)
    tables = [fe.frozen_table(random_inputs(rng, vocab, 4, 1, 1)[0]) for _ in range(5)]
    for table in tables:
        assert_close(run_cpu(table, ids), embedding_mean_reference(table, ids, 2), np.float32)
        assert row_mean_cache.cached_bytes() <= row_mean_cache.MAX_BYTES
    assert row_mean_cache.cached_tables() == 3
    huge = fe.frozen_table(random_inputs(rng, 4 * vocab, 4, 1, 1)[0])  # its means alone exceed the cap
    assert_close(run_cpu(huge, ids), embedding_mean_reference(huge, ids, 2), np.float32)
    assert row_mean_cache.cached_tables() == 3  # not cached, nothing evicted for it


tf = pytest.importorskip("tensorflow", reason="TensorFlow is not installed")


def test_tf_tensor_is_cached_from_its_second_call_and_a_new_tensor_replaces_it(rng):
    table, ids = random_inputs(rng, 60, 8, 5, 7)
    tensor = tf.constant(table)
    for calls in (1, 2, 3):
        assert_close(run_cpu(np.asarray(tensor), ids), embedding_mean_reference(table, ids, 2), np.float32)
        assert row_mean_cache.cached_tables() == (0 if calls == 1 else 1)
    other = tf.constant(table + 3.0)
    for _ in range(2):
        assert_close(run_cpu(np.asarray(other), ids), embedding_mean_reference(table + 3.0, ids, 2), np.float32)
    # Tables handed to the core directly share one site: the first tensor's pin is gone.
    assert row_mean_cache.cached_tables() == 1
    assert row_mean_cache.cached_bytes() == table.nbytes + 60 * 4


def test_assigned_tf_variable_is_rebuilt(rng):
    """TF's copy-on-write: while the cache pins the old buffer, assign writes a new one."""
    table, ids = random_inputs(rng, 60, 8, 5, 7)
    variable = tf.Variable(table)
    read = lambda: run_cpu(np.asarray(variable.read_value()), ids)  # noqa: E731
    first = read()
    np.testing.assert_array_equal(read(), first)
    assert row_mean_cache.cached_tables() == 1
    variable.assign(table * -1.0)
    for _ in range(2):
        assert_close(read(), -first, np.float32)
    variable[ids[0, 0]].assign(np.full(8, 5.0, np.float32))  # a sliced assign too
    for _ in range(2):
        assert read()[0, 0] == pytest.approx(5.0)


def test_the_tf_op_releases_a_variable_s_pin_when_the_variable_goes(rng):
    import fused_embedding.tf as fe_tf
    table, ids = random_inputs(rng, 60, 8, 5, 7)
    variable = tf.Variable(table)
    for _ in range(2):
        out = fe_tf.embedding_mean(variable, ids, axis=2)
    assert_close(np.asarray(out), embedding_mean_reference(table, ids, 2), np.float32)
    assert row_mean_cache.cached_tables() == 1
    del variable, out
    gc.collect()
    assert row_mean_cache.cached_tables() == 0 and row_mean_cache.cached_bytes() == 0


RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, psutil, tensorflow as tf
    import fused_embedding.tf as fe_tf
    from fused_embedding import row_mean_cache
    from fused_embedding.reference import embedding_mean_reference
    mode, seed = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((1 << 16, 256), dtype=np.float32)  # 64 MiB
    ids = tf.constant(rng.integers(0, 1 << 16, (64, 16)).astype(np.int32))
    variable = tf.Variable(table)
    tf.gather(variable, [0])  # TF's copy-on-read mode: every read of the variable is a fresh copy
    op = lambda: fe_tf.embedding_mean(variable, ids, axis=2)
    if mode == "tf.function":
        op = tf.function(op)
    rss = []
    for _ in range(7):
        out = op()
        rss.append(psutil.Process().memory_info().rss)
    expected = embedding_mean_reference(table, ids.numpy(), 2)
    print(json.dumps({"rss": rss, "table": table.nbytes, "held": row_mean_cache.cached_bytes(),
                      "error": float(np.abs(np.asarray(out) - expected).max())}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eager", "tf.function"])
def test_copy_on_read_variable_copies_do_not_pile_up(rng, mode):
    """A variable a sparse op has put in TF's copy-on-read mode, read seven times: the op
    reads it in place (tf_variables.read_without_copy), so the cache pins at most that one
    64 MiB buffer (with its row means), and memory is flat from the third call on. (Before
    the op read in place, each read was a fresh copy; a pile-up of pinned copies would add
    one table per call.) The allocator may keep pages of the first calls, so RSS may settle
    up to two tables above the first call's."""
    result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, mode, str(int(rng.integers(1 << 31)))],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["error"] < 1e-5
    rss, table = report["rss"], report["table"]
    assert report["held"] <= table + table // 256 * 2, f"the cache holds {report['held']} bytes: more than one table"
    trace = f"RSS after each call {[r // 2**20 for r in rss]} MiB, table {table // 2**20} MiB"
    assert rss[-1] - rss[2] < table // 2, trace
    assert rss[-1] - rss[0] < table * 5 // 2, trace
