"""Many Python threads calling the op at once: every result correct, no crash, no deadlock.

Numba's threading layers differ here: "omp" and "tbb" take concurrent parallel
launches; "workqueue" (Numba's fallback when neither loads) aborts the process
on them, so the cpu backend serialises its launches under workqueue. The
workqueue case runs in a subprocess, where an abort fails the test instead of
killing the session.
"""
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import fused_embedding as fe
from fused_embedding.reference import embedding_mean_reference
from fused_embedding.semantics import BFLOAT16
from fused_embedding.validation import compare, random_inputs, tolerance
from conftest import numba_cuda_device_skip_reason

THREADS = 8
CALLS_PER_THREAD = 200
# A thread that has not finished by then has hung (all calls take well under a second).
JOIN_TIMEOUT_S = 300

# One configuration per thread: every dtype pairing, both axes, with and without a
# mask, so concurrent launches run different compiled kernels as well as the same one.
THREAD_CASES = [
    (np.float32, np.int32, 1, False), (np.float32, np.int64, 2, True),
    (np.float16, np.int64, 1, True), (np.float16, np.int32, 2, False),
    (BFLOAT16, np.int32, 1, False), (BFLOAT16, np.int64, 2, True),
    (np.float32, np.int64, 1, True), (np.float32, np.int32, 1, False),
]


# Calls this small run on the calling thread (launch.CPU_SERIAL_MAX_BYTES); these tests
# are about parallel launches from many threads, so they lift that threshold, and run
# once more with it for the serial entry points.
FORCE_PARALLEL = "from fused_embedding import launch; launch.CPU_SERIAL_MAX_BYTES = 0"


@pytest.fixture(params=["parallel", "small-calls-serial"])
def schedule(request, monkeypatch):
    if request.param == "parallel":
        from fused_embedding import launch
        monkeypatch.setattr(launch, "CPU_SERIAL_MAX_BYTES", 0)
    return request.param


def thread_inputs(rng):
    """Per thread: (table, ids, axis, mask_zero, float64 expected); shapes differ between threads."""
    cases = []
    for i, (table_dtype, id_dtype, axis, mask_zero) in enumerate(THREAD_CASES):
        table, ids = random_inputs(rng, 500 + 37 * i, 16 + 5 * i, 32 + i, 20 + 3 * i, table_dtype, id_dtype,
                                   padding_fraction=0.2 if mask_zero else 0.0)
        cases.append((table, ids, axis, mask_zero, embedding_mean_reference(table, ids, axis, mask_zero)))
    return cases


def run_threads(call, cases, calls_per_thread=CALLS_PER_THREAD):
    """Run ``call(table, ids, axis, mask_zero)`` calls_per_thread times in each of len(cases) threads.

    Returns the list of failures (thread, call, report or exception).
    """
    failures = []
    start = threading.Barrier(len(cases))

    def work(index):
        table, ids, axis, mask_zero, expected = cases[index]
        start.wait()  # all threads launch together
        for n in range(calls_per_thread):
            try:
                report = compare(np.asarray(call(table, ids, axis, mask_zero)), expected,
                                 **tolerance(table.dtype))
            except Exception as exc:  # noqa: BLE001 (collected and reported below)
                report = f"{type(exc).__name__}: {exc}"
            if report:
                failures.append((index, n, report))
                return

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT_S)
    hung = [i for i, thread in enumerate(threads) if thread.is_alive()]
    assert not hung, f"threads {hung} still running after {JOIN_TIMEOUT_S} s"
    return failures


def test_core_op_from_8_threads(rng, schedule):
    cases = thread_inputs(rng)
    failures = run_threads(
        lambda table, ids, axis, mask_zero: fe.embedding_mean(table, ids, axis=axis, mask_zero=mask_zero,
                                                              backend="cpu"), cases)
    assert not failures, failures[:3]


@pytest.mark.parametrize("case_index, frozen", [(0, False), (1, True)],
                         ids=["axis1-writable", "axis2-frozen"])
def test_core_op_from_8_threads_shared_inputs(rng, case_index, frozen, schedule):
    """All threads on the same table and ids (the usual serving case).

    A frozen table on axis 2 is the one the backend caches row means for: eight
    threads then race to build and read that cache.
    """
    table, ids, axis, mask_zero, expected = thread_inputs(rng)[case_index]
    if frozen:
        table = fe.frozen_table(table)
    failures = run_threads(
        lambda table, ids, axis, mask_zero: fe.embedding_mean(table, ids, axis=axis, mask_zero=mask_zero,
                                                              backend="cpu"),
        [(table, ids, axis, mask_zero, expected)] * THREADS)
    assert not failures, failures[:3]


def gpu_skip_reason():
    return numba_cuda_device_skip_reason(
        "the CUDA simulator is not thread-safe: launches from several Python threads at once "
        "fail inside it (its fake cuda module is swapped per launch)")


@pytest.mark.skipif(gpu_skip_reason() is not None, reason=str(gpu_skip_reason()))
def test_numba_cuda_from_8_threads(rng):
    """On a real GPU: eight threads each copying, launching and reading back at once."""
    cases = thread_inputs(rng)
    failures = run_threads(
        lambda table, ids, axis, mask_zero: fe.embedding_mean(table, ids, axis=axis, mask_zero=mask_zero,
                                                              backend="numba-cuda"), cases)
    assert not failures, failures[:3]


WORKQUEUE_SCRIPT = textwrap.dedent("""
    import numba, numpy as np
    import fused_embedding as fe
    import test_concurrency as tc
    {force_parallel}
    cases = tc.thread_inputs(np.random.default_rng({seed}))
    failures = tc.run_threads(lambda t, i, a, m: fe.embedding_mean(t, i, axis=a, mask_zero=m, backend="cpu"),
                              cases, calls_per_thread={calls})
    print("threading layer:", numba.threading_layer())
    assert not failures, failures[:3]
""")


def test_core_op_from_8_threads_under_numba_workqueue(rng):
    """Numba's workqueue layer aborts on concurrent launches: the cpu backend must serialise them."""
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    script = WORKQUEUE_SCRIPT.format(seed=int(rng.integers(2**32)), calls=50, force_parallel=FORCE_PARALLEL)
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=os.path.dirname(__file__),
                            capture_output=True, text=True, timeout=JOIN_TIMEOUT_S)
    assert result.returncode == 0, (f"exit status {result.returncode}\n"
                                    f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    assert "threading layer: workqueue" in result.stdout


@pytest.mark.slow
def test_tf_op_from_8_threads(rng, schedule):
    """The TF op, eagerly in four threads and through one shared tf.function in four.

    (Through the compiled kernel, these small calls run serial whatever the schedule:
    the test below covers its parallel launches.)"""
    tf = pytest.importorskip("tensorflow", reason="TensorFlow is not installed")
    try:
        import fused_embedding.tf as fused_tf
    except ImportError as exc:
        pytest.skip(f"fused_embedding.tf is not importable: {exc}")
    cases = thread_inputs(rng)
    tensors = [(tf.constant(table), tf.constant(ids)) for table, ids, *_ in cases]
    functions = {}
    for table, ids, axis, mask_zero, _ in cases:
        key = (axis, mask_zero)
        if key not in functions:
            functions[key] = tf.function(
                lambda t, i, axis=axis, mask_zero=mask_zero: fused_tf.embedding_mean(
                    t, i, axis=axis, mask_zero=mask_zero, backend="cpu"))
    by_identity = {id(cases[i][0]): (i, tensors[i]) for i in range(len(cases))}

    def call(table, ids, axis, mask_zero):
        index, (table_tensor, ids_tensor) = by_identity[id(table)]
        if index % 2:
            return functions[(axis, mask_zero)](table_tensor, ids_tensor).numpy()
        return fused_tf.embedding_mean(table_tensor, ids_tensor, axis=axis, mask_zero=mask_zero,
                                       backend="cpu").numpy()

    failures = run_threads(call, cases)
    assert not failures, failures[:3]


@pytest.mark.slow
def test_compiled_tf_kernel_from_8_threads_in_parallel(rng):
    """The TF op's compiled kernel (axis 1 in a graph) called from eight threads at once,
    every call large enough to launch Numba's thread team: the kernel's serial threshold
    is fixed when it compiles, so the ``schedule`` fixture can't lower it."""
    tf = pytest.importorskip("tensorflow", reason="TensorFlow is not installed")
    import fused_embedding.tf as fused_tf
    from fused_embedding import launch, tf_compiled
    if tf_compiled.op_module() is None:
        pytest.skip(f"the compiled kernel is not built here: {tf_compiled.unavailable_reason()}")
    cases = []
    for i, (table_dtype, id_dtype, _, mask_zero) in enumerate(THREAD_CASES):
        table, ids = random_inputs(rng, 700 + 37 * i, 16 + 5 * i, 64 + i, 80, table_dtype, id_dtype,
                                   padding_fraction=0.2 if mask_zero else 0.0)
        assert not launch.cpu_runs_serial(ids.size, table.shape[1] * table.itemsize)
        cases.append((table, ids, 1, mask_zero, embedding_mean_reference(table, ids, 1, mask_zero)))
    tensors = {id(table): (tf.constant(table), tf.constant(ids)) for table, ids, *_ in cases}
    graphs = {mask_zero: tf.function(lambda t, i, mask_zero=mask_zero: fused_tf.embedding_mean(
        t, i, mask_zero=mask_zero, backend="cpu")) for mask_zero in (False, True)}

    def call(table, ids, axis, mask_zero):
        return graphs[mask_zero](*tensors[id(table)]).numpy()

    failures = run_threads(call, cases, calls_per_thread=100)
    assert not failures, failures[:3]


FORK_SCRIPT = textwrap.dedent("""
    import multiprocessing, threading
    import numpy as np
    import fused_embedding as fe
    from fused_embedding.reference import embedding_mean_reference
    from fused_embedding.validation import compare, tolerance
    {force_parallel}

    def child(queue, table, ids):
        reports = []
        for axis in (1, 2):
            for mask_zero in (False, True):
                out = fe.embedding_mean(table, ids, axis=axis, mask_zero=mask_zero, backend="cpu")
                reports.append(compare(out, embedding_mean_reference(table, ids, axis, mask_zero),
                                       **tolerance(table.dtype)))
        queue.put([r for r in reports if r])

    if __name__ == "__main__":
        rng = np.random.default_rng({seed})
        table = rng.standard_normal((500, 24), dtype=np.float32)
        ids = rng.integers(0, 500, (40, 9))
        for axis in (1, 2):  # the parent has used the parallel kernels (and so its threading layer)
            fe.embedding_mean(table, ids, axis=axis, backend="cpu")
        import numba
        print("parent's threading layer:", numba.threading_layer())  # raises if nothing ran in parallel
        # A thread still calling the op while the fork happens: its lock must not stay held in the child.
        busy = threading.Thread(target=lambda: [fe.embedding_mean(table, ids, backend="cpu") for _ in range(2000)])
        busy.start()
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        workers = [context.Process(target=child, args=(queue, table, ids)) for _ in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join({timeout})
        busy.join()
        print("exit codes:", [worker.exitcode for worker in workers])
        print("reports:", [queue.get(timeout=5) for _ in workers])
""")


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["default", "workqueue"])
def test_forked_workers_after_the_parent_used_the_op(rng, layer):
    """multiprocessing's "fork" workers (Linux's default before Python 3.14) after the parent ran the op.

    Numba kills a child forked from a process that has used GNU OpenMP at its
    first parallel launch; the cpu backend runs serial kernels in such a child.
    """
    env = dict(os.environ)
    if layer != "default":
        env["NUMBA_THREADING_LAYER"] = layer
    script = FORK_SCRIPT.format(seed=int(rng.integers(2**32)), timeout=JOIN_TIMEOUT_S,
                                force_parallel=FORCE_PARALLEL)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=JOIN_TIMEOUT_S + 60)
    output = f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert result.returncode == 0, output
    assert "exit codes: [0, 0]" in result.stdout, output
    assert "reports: [[], []]" in result.stdout, output

