"""``fused-embedding build``: every cpu kernel compiled ahead, and the notice of a compile on
first use, each checked in fresh processes on a Numba cache and a TF library folder of their own."""
import json
import os
import subprocess
import sys

import pytest

from fused_embedding import build
from fused_embedding.kernels import cpu, cpu_bags, cpu_quant

NOTICE = "Numba is compiling the cpu backend's kernels"
TF_BUILD_WARNING = "building the TF op's compiled kernel"

# One small call of the cpu backend per table format, id dtype and axis, on a fresh
# process' cache; prints the kernels' cache misses.
COLD_SCRIPT = """
import json, sys
import numpy as np
import fused_embedding as fe
from fused_embedding.kernels import cpu
from fused_embedding.reference import embedding_mean_reference
from fused_embedding.validation import assert_close, random_inputs
rng = np.random.default_rng(int(sys.argv[1]))
for dtype in (np.float32, np.float16):
    table, ids = random_inputs(rng, 40, 8, 3, 5, dtype)
    for _ in range(2):
        assert_close(fe.embedding_mean(table, ids, axis=2, backend="cpu"),
                     embedding_mean_reference(table, ids, 2), dtype)
kernel = cpu.gather_mean_embedding_serial
# numba.np.linalg is imported by Numba's target refresh, which compiling needs and a load
# from the disk cache skips (backends/cpu.py's _CacheLoadingWithoutRefresh).
print(json.dumps(dict(misses=sum(kernel.stats.cache_misses.values()),
                      hits=sum(kernel.stats.cache_hits.values()),
                      target_refreshed="numba.np.linalg" in sys.modules)))
"""

# Every kind of call the cpu backend makes (table formats, id dtypes, both axes, masks,
# writable and read-only inputs (TF's eager tensors are read-only), frozen tables, serial
# and parallel sizes, CSR bags with and without weights, int8 / int4 / Keras-int8 quantized
# tables on both axes and as bags), in a fresh process whose plan
# kernels record the argument types Numba would compile them for, instead of compiling
# (a first call of a signature goes through the dispatcher's _compile_for_args, which
# hands back what to run: here a stand-in that returns "no bad id"); prints the signatures outside the build's plan and how many it saw.
LAUNCH_SCRIPT = """
import json, sys
import numpy as np
import fused_embedding as fe
from fused_embedding import build
from fused_embedding.semantics import BFLOAT16
from fused_embedding.quantized import QuantizedTable
from fused_embedding.validation import random_inputs
rng = np.random.default_rng(int(sys.argv[1]))
plan = build.kernel_signatures()
launched = {}

def recorder(dispatcher):
    def compile_for_args(*args, **kws):
        launched.setdefault(dispatcher, set()).add(tuple(dispatcher.typeof_pyval(a) for a in args))
        return lambda *args: 2**62  # what the dispatcher calls: returns a position past any, no bad id
    return compile_for_args

for dispatcher, _ in plan:
    dispatcher._compile_for_args = recorder(dispatcher)
# The backend asks Numba's threading layer after its first parallel launch; no parallel
# code runs here, so say what that question would decide.
from fused_embedding.backends import cpu as cpu_backend
cpu_backend._serialise_launches = False

def read_only(array):
    array = array.copy()
    array.setflags(write=False)
    return array

frozen = fe.frozen_table  # a constant table: axis 2 reads cached row means

# Twice: as usual, then with every launch on the serial entry points (as after a fork
# from GNU OpenMP's threads), which row means otherwise never take.
for forced_serial in (False, True):
    cpu_backend._forked_from_gnu_openmp = forced_serial
    for dtype in (np.float32, np.float16, BFLOAT16):
        for id_dtype in (np.int32, np.int64):
            # B*L*row bytes past launch.CPU_SERIAL_MAX_BYTES for the large size: the parallel entry points
            for batch, length in ((3, 5), (512, 64)):
                table, ids = random_inputs(rng, 50, 16, batch, length, dtype, id_dtype, padding_fraction=0.2)
                for table_in, ids_in in ((table, ids), (read_only(table), ids), (table, read_only(ids)),
                                         (read_only(table), read_only(ids)), (frozen(table), ids)):
                    for axis in (1, 2):
                        for mask_zero in (False, True):
                            for _ in range(2):  # a frozen table's row means: built, then read
                                fe.embedding_mean(table_in, ids_in, axis=axis, mask_zero=mask_zero, backend="cpu")
            for n_values in (7, 20000):
                values = rng.integers(0, 50, n_values).astype(id_dtype)
                offsets = np.sort(rng.integers(0, n_values + 1, 6))
                offsets[0], offsets[-1] = 0, n_values
                weights = rng.random(n_values, dtype=np.float32)
                for ro in (False, True):
                    args = [read_only(a) if ro else a for a in (table, values, offsets, weights)]
                    for w in (None, args[3]):
                        fe.embedding_bag(args[0], args[1], args[2], weights=w, backend="cpu")
    float_table = rng.standard_normal((50, 16)).astype(np.float32)
    keras_int8 = QuantizedTable.from_keras_int8(rng.integers(-127, 128, (50, 16)).astype(np.int8),
                                                rng.random(50).astype(np.float32) + 1)
    held = [fe.quantize_table(float_table, "int8"), fe.quantize_table(float_table, "int4"), keras_int8]
    # as the TF op (tf_quantized) hands them over: read-only C arrays
    held += [QuantizedTable(q.format, read_only(np.ascontiguousarray(q.data)), read_only(np.ascontiguousarray(q.params)))
             for q in held]
    for qtable in held:
        for id_dtype in (np.int32, np.int64):
            for batch, length in ((3, 5), (512, 64)):
                ids = rng.integers(0, 50, (batch, length)).astype(id_dtype)
                for axis in (1, 2):
                    fe.embedding_mean(qtable, ids, axis=axis, mask_zero=True, backend="cpu")
            for n_values in (7, 20000):
                values = rng.integers(0, 50, n_values).astype(id_dtype)
                for w in (None, rng.random(n_values, dtype=np.float32)):
                    fe.embedding_bag(qtable, values, np.array([0, n_values // 2, n_values]), weights=w,
                                     combiner="sum", backend="cpu")

planned = {d: set(sigs) for d, sigs in plan}
outside = {d.py_func.__qualname__: sorted(map(str, sigs - planned[d])) for d, sigs in launched.items()}
print(json.dumps(dict(outside={k: v for k, v in outside.items() if v},
                      seen={d.py_func.__qualname__: len(sigs) for d, sigs in launched.items()})))
"""


# ``fused-embedding build`` on a plan of a few signatures (the same loop builds every one):
# the two dense entry points for a float32 table and int32 ids, both writable.
SMALL_PLAN = """
from fused_embedding import build
from numba import types
full = build.kernel_signatures
def small_plan():
    array = lambda dtype: types.Array(dtype, 2, "C")
    wanted = (array(types.float32), array(types.int32))
    return [(kernel, [sig for sig in sigs if sig[:2] == wanted]) for kernel, sigs in full()
            if kernel.py_func.__name__.startswith("gather_mean_sequence")]
build.kernel_signatures = small_plan
"""

# After the small build: the calls its plan covers, serial and parallel, in a fresh process.
SMALL_PLAN_CALLS = """
import json, sys
import numpy as np
import fused_embedding as fe
from fused_embedding.kernels import cpu
from fused_embedding.reference import embedding_mean_reference
from fused_embedding.validation import assert_close, random_inputs
rng = np.random.default_rng(int(sys.argv[1]))
for batch, length in ((3, 5), (512, 64)):  # past launch.CPU_SERIAL_MAX_BYTES: the parallel one
    table, ids = random_inputs(rng, 50, 16, batch, length, np.float32, np.int32)
    assert_close(fe.embedding_mean(table, ids, backend="cpu"), embedding_mean_reference(table, ids, 1), np.float32)
from fused_embedding.backends import cpu_cfunc
kernels = (cpu.gather_mean_sequence, cpu.gather_mean_sequence_serial)
print(json.dumps(dict(misses={k.py_func.__name__: sum(k.stats.cache_misses.values()) for k in kernels},
                      hits={k.py_func.__name__: sum(k.stats.cache_hits.values()) for k in kernels},
                      launcher_hits=cpu_cfunc.launch_sequence_mean.cache_hits)))
"""


def _env(cache_root):
    env = dict(os.environ)
    env["NUMBA_CACHE_DIR"] = str(cache_root / "numba")
    env["FUSED_EMBEDDING_CACHE_DIR"] = str(cache_root / "tf-op")
    env.pop("FUSED_EMBEDDING_COMPILED_TF_OP", None)
    return env


def _run(script, env, seed, timeout=900):
    done = subprocess.run([sys.executable, "-c", script, str(seed)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_each_parallel_kernel_and_its_serial_entry_point_are_built_for_the_same_signatures():
    plan = dict(build.kernel_signatures())
    pairs = [(parallel, serial) for parallel, serial in cpu.SERIAL.items()]
    pairs.append((cpu_bags.embedding_bag, cpu_bags.embedding_bag_serial))
    pairs += [(cpu_quant.pool_quantized, cpu_quant.pool_quantized_serial),
              (cpu_quant.gather_quantized_means, cpu_quant.gather_quantized_means_serial)]
    assert set(plan) == {kernel for pair in pairs for kernel in pair}
    for parallel, serial in pairs:
        assert plan[parallel] == plan[serial]
        assert len(set(plan[parallel])) == len(plan[parallel]), "no signature twice"
    # Both table element types (float32; uint16 bits of float16 / bfloat16) and id dtypes,
    # writable and read-only, in the gather kernels.
    tables_and_ids = {(str(sig[0].dtype), sig[0].mutable, str(sig[1].dtype), sig[1].mutable)
                      for sig in plan[cpu.gather_mean_sequence]}
    assert len(tables_and_ids) == 16


@pytest.mark.slow
def test_a_cold_cache_says_so_once_and_a_warm_one_says_nothing(tmp_path, rng):
    seed = int(rng.integers(2**31))
    cold, err = _run(COLD_SCRIPT, _env(tmp_path), seed)
    assert cold["misses"] >= 1, "the fresh cache held the kernel already"
    assert err.count(NOTICE) == 1, err[-3000:]
    assert "fused-embedding build" in err.split(NOTICE, 1)[1].splitlines()[0]
    assert cold["target_refreshed"]
    warm, err = _run(COLD_SCRIPT, _env(tmp_path), seed)
    assert warm["misses"] == 0 and warm["hits"] >= 1
    assert NOTICE not in err, err[-3000:]
    assert not warm["target_refreshed"], "loading from the cache refreshed Numba's whole target"


def test_every_cpu_kernel_and_the_launcher_load_from_the_cache_without_a_target_refresh():
    from fused_embedding.backends import cpu as cpu_backend
    from fused_embedding.backends import cpu_cfunc
    kernels = cpu_backend._kernel_module()
    for parallel, serial in kernels.SERIAL.items():
        for kernel in (parallel, serial):
            assert type(kernel._cache) is cpu_backend._CacheLoadingWithoutRefresh, kernel.py_func.__name__
    assert type(cpu_cfunc.launch_sequence_mean._cache) is cpu_backend._CacheLoadingWithoutRefresh


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(cache root, the build's stdout) of ``fused-embedding build --cache-dir`` run in a
    fresh process on empty folders, on SMALL_PLAN (building every signature from empty
    caches takes minutes; that the full plan covers every call is checked apart, on the
    usual cache, by test_every_call_the_backend_makes_is_in_the_build_plan)."""
    root = tmp_path_factory.mktemp("build")
    env = dict(os.environ)
    for name in ("NUMBA_CACHE_DIR", "FUSED_EMBEDDING_CACHE_DIR", "FUSED_EMBEDDING_COMPILED_TF_OP"):
        env.pop(name, None)
    script = SMALL_PLAN + "\nfrom fused_embedding import cli\nraise SystemExit(cli.main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", "import sys\n" + script, "build", "--cache-dir", str(root)],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root, done.stdout


@pytest.mark.slow
def test_build_says_where_it_wrote_and_what_a_deployment_sets(built):
    root, out = built
    numba_dir, tf_dir = root.resolve() / "numba", root.resolve() / "tf-op"
    assert f"in {numba_dir}" in out
    assert f"verified against its digest, in {tf_dir}" in out
    assert f"NUMBA_CACHE_DIR={numba_dir} FUSED_EMBEDDING_CACHE_DIR={tf_dir} set" in out
    assert list(numba_dir.rglob("*.nbi")) and list(tf_dir.glob("*.so"))


@pytest.mark.slow
def test_after_build_a_fresh_process_compiles_nothing(built, rng):
    root, out = built
    assert "Numba CPU kernels: 2 signatures of 2 entry points" in out, out
    result, err = _run(SMALL_PLAN_CALLS, _env(root), int(rng.integers(2**31)))
    assert result["misses"] == {name: 0 for name in result["misses"]}, result
    assert all(hits >= 1 for hits in result["hits"].values()), result
    assert result["launcher_hits"] == 1, "the TF op's launcher was compiled, not loaded"
    assert NOTICE not in err, err[-3000:]


def test_every_call_the_backend_makes_is_in_the_build_plan(rng):
    """LAUNCH_SCRIPT in a fresh process: every kernel signature the cpu backend launches is
    one the build compiles, and every entry point of the plan is launched."""
    result, _ = _run(LAUNCH_SCRIPT, dict(os.environ), int(rng.integers(2**31)))
    assert result["outside"] == {}, result["outside"]
    plan = build.kernel_signatures()
    assert set(result["seen"]) == {kernel.py_func.__qualname__ for kernel, _ in plan}, result["seen"]
