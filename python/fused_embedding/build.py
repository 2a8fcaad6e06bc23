"""Ahead-of-time build (``fused-embedding build``) and the notice of a compile on first use.

A fresh installation compiles on its first call: Numba compiles the cpu backend's
kernels for the call's argument types (seconds per signature, tens of seconds for a
first call on a 2-core machine), and the TF op's C++ library is built (about 10 s).
Both are cached on disk, so the cost is paid once per installation, but a serving
replica started from a fresh image pays it on its first request. ``build()`` pays it
ahead, e.g. while the image is built:

- every signature the cpu backend launches (``kernel_signatures()``): float32 and
  16-bit (float16 / bfloat16 bits) tables, int32 and int64 ids, writable and
  read-only arrays (TF's eager tensors and frozen tables are read-only), both axes
  (masks are a runtime flag, not a signature), the row-means path of axis 2, the
  CSR bags kernel, the quantized tables' pooling and row-means kernels (int8 / int4
  row-wise rows as views into one buffer, Keras' int8 as two C arrays), each in its
  parallel and serial entry points; then the TF op's
  C launcher (``backends/cpu_cfunc.py``); all into Numba's cache: ``$NUMBA_CACHE_DIR``
  when set, else ``__pycache__`` beside the kernels' sources;
- the TF op's library through ``tf_compiled.op_module()`` when TensorFlow imports,
  into ``tf_compiled.cache_dir()`` (``$FUSED_EMBEDDING_CACHE_DIR``).

A table that is not C-contiguous (a column slice, a transposed array) still compiles
on first use: its layout is a signature of its own, rare enough not to build ahead.

Numba only uses a cache folder it can write to (it checks by writing a temporary
file there): a deployment whose files are read-only sets ``NUMBA_CACHE_DIR`` to a
writable folder holding what the build wrote. The TF library's folder is only read.

``announce_compiles()`` (called by the cpu backend when it first loads its kernels)
logs one warning on the ``fused_embedding`` logger when Numba starts compiling one of
them in this process, that is, when its disk cache did not hold the signature; a warm
cache loads without a word.
"""
from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("fused_embedding")

BUILD_COMMAND = "fused-embedding build"
NUMBA_CACHE_ENV_VAR = "NUMBA_CACHE_DIR"

# Functions whose compile the notice reports: the cpu backend's kernels, the launch
# heuristics compiled into the TF op's launcher, and that launcher. (Not the GPU
# kernels, which numba-cuda compiles apart, nor the bench's own helpers.)
_NOTICE_MODULES = ("fused_embedding.kernels.cpu", "fused_embedding.kernels.cpu_quant", "fused_embedding.launch",
                   "fused_embedding.backends.cpu_cfunc")

_notice_lock = threading.Lock()
_notice_listener = None   # installed once per process
_notice_given = False


def kernel_signatures() -> list[tuple[object, list[tuple]]]:
    """[(dispatcher, [argument types, ...])]: every signature the cpu backend's host
    code (``backends/cpu.py``, ``bags.py``) launches on C-contiguous arrays, for each
    parallel kernel and its serial entry point alike.

    Types as the launchers build them: table and out as float32, or as uint16 bits for
    float16 / bfloat16 (``backends.cpu._bits``); Python ints and bools as int64 and
    boolean; ids and offsets made C-contiguous (``np.ascontiguousarray`` keeps a
    read-only array read-only); outputs and row means freshly allocated (writable).
    """
    from numba import types

    from .kernels import cpu, cpu_bags, cpu_quant

    def array(dtype, ndim, readonly=False):
        return types.Array(dtype, ndim, "C", readonly=readonly)

    flag, integer = types.boolean, types.int64
    elements = (types.float32, types.uint16)   # float32 tables; float16 / bfloat16 bits
    id_types = (types.int32, types.int64)
    read_only = (False, True)
    dense, means_in, means_out, bags = [], [], [], []
    for element, id_type, table_ro, ids_ro in itertools.product(elements, id_types, read_only, read_only):
        table, ids, out = array(element, 2, table_ro), array(id_type, 2, ids_ro), array(element, 2)
        # (table, ids, mask_zero, fmt, bags_per_chunk, rows_ahead, out)
        dense.append((table, ids, flag, integer, integer, integer, out))
        # (means, ids, mask_zero, fmt, bags_per_chunk, means_ahead, out): means are ours
        means_out.append((array(types.float32, 1), ids, flag, integer, integer, integer, out))
    for element, table_ro in itertools.product(elements, read_only):
        means_in.append((array(element, 2, table_ro), integer, array(types.float32, 1)))  # (table, fmt, means)
    for element, id_type, inputs_ro, weighted in itertools.product(elements, id_types, read_only,
                                                                   (False, True)):
        # (table, values, offsets, weights, weighted, combiner, fmt, n_chunks, rows_ahead, out):
        # the inputs come together, all writable (NumPy, tf.numpy_function) or all read-only
        # (TF's eager tensors); no weights is bags.py's own empty (writable) array. (The
        # parallel bags kernel takes 10 s a signature to compile here: mixed flags are left
        # to first use.)
        bags.append((array(element, 2, inputs_ro), array(id_type, 1, inputs_ro),
                     array(types.int64, 1, inputs_ro), array(types.float32, 1, inputs_ro and weighted),
                     flag, integer, integer, integer, integer, array(element, 2)))
    means_out, bags = list(dict.fromkeys(means_out)), list(dict.fromkeys(bags))  # repeats dropped
    # Quantized tables (quantized.py's launchers): the row-wise formats' data and parameters
    # are strided views into one row buffer ("A" layout), Keras' int8 two C arrays; the TF
    # op's (tf_quantized.py) are read-only C arrays, uint8 or int8, and its ids writable;
    # ids as the dense path passes them (offsets b * L) or as CSR; the output is float32.
    quantized_pool, quantized_means = [], []
    for data, params in ((types.Array(types.uint8, 2, "A"), types.Array(types.float32, 2, "A")),
                         (array(types.int8, 2), array(types.float32, 2)),
                         (array(types.uint8, 2, True), array(types.float32, 2, True)),
                         (array(types.int8, 2, True), array(types.float32, 2, True))):
        for id_type in id_types:
            # (data, params, values, offsets, weights, weighted, padding_id, combiner, fmt,
            #  bags_per_chunk, rows_ahead, out): no weights is quantized.py's own empty array
            quantized_pool.append((data, params, array(id_type, 1), array(types.int64, 1),
                                   array(types.float32, 1), flag) + (integer,) * 5 + (array(types.float32, 2),))
            # (data, params, ids, padding_id, fmt, bags_per_chunk, rows_ahead, out)
            quantized_means.append((data, params, array(id_type, 2)) + (integer,) * 4 + (array(types.float32, 2),))
    plan = []
    for parallel, signatures in ((cpu.gather_mean_sequence, dense), (cpu.gather_mean_embedding, dense),
                                 (cpu.row_means, means_in), (cpu.gather_row_means, means_out)):
        plan += [(parallel, signatures), (cpu.SERIAL[parallel], signatures)]
    plan += [(cpu_quant.pool_quantized, quantized_pool), (cpu_quant.pool_quantized_serial, quantized_pool),
             (cpu_quant.gather_quantized_means, quantized_means),
             (cpu_quant.gather_quantized_means_serial, quantized_means)]
    return plan + [(cpu_bags.embedding_bag, bags), (cpu_bags.embedding_bag_serial, bags)]


def _compile_launcher():
    """Import (so compile, or load from the cache) the TF op's C launcher; its module."""
    from .backends import cpu_cfunc
    return cpu_cfunc


def _tf_op() -> tuple[str | None, str | None]:
    """(where the TF op's library is, None) once it is built and loaded, or (None, why not);
    (None, None) without TensorFlow."""
    try:
        from . import tf_compiled
    except ImportError as exc:
        if "tensorflow" not in str(exc):
            raise
        return None, None
    reason = tf_compiled.unavailable_reason()   # builds the library when none is cached
    return (str(tf_compiled.cache_dir()), None) if reason is None else (None, reason)


def _tf_cache_env_var() -> str | None:
    """The TF library's folder variable (``tf_compiled.CACHE_ENV_VAR``), None without TensorFlow."""
    try:
        from .tf_compiled import CACHE_ENV_VAR
    except ImportError as exc:
        if "tensorflow" not in str(exc):
            raise
        return None
    return CACHE_ENV_VAR


def use_cache_dir(folder: str | os.PathLike) -> dict[str, str]:
    """Point Numba's cache (``folder/numba``) and, with TensorFlow, the TF library
    (``folder/tf-op``) there for this process: {environment variable: folder}. Numba's
    must be chosen before the kernels are imported (their caches are located then)."""
    if "fused_embedding.kernels.cpu" in sys.modules:
        raise RuntimeError("the cache folder must be chosen before the kernels are loaded in this "
                           "process; run `fused-embedding build --cache-dir DIR` in a fresh process")
    root = Path(folder).resolve()
    chosen = {NUMBA_CACHE_ENV_VAR: str(root / "numba")}
    tf_variable = _tf_cache_env_var()
    if tf_variable is not None:
        chosen[tf_variable] = str(root / "tf-op")
    os.environ.update(chosen)
    import numba
    numba.config.reload_config()  # numba reads its environment at import, which may be past
    return chosen


def build(report=print) -> int:
    """Compile every kernel signature, the TF op's launcher and its library, saying what
    was done and where through ``report(line)``. Returns the exit status: 0 when all of it
    is cached, 1 when TensorFlow is installed but its op could not be built."""
    global _notice_given
    _notice_given = True  # this process compiles on purpose: no notice
    started = time.perf_counter()
    plan = kernel_signatures()
    total = sum(len(signatures) for _, signatures in plan)
    report(f"Numba CPU kernels: {total} signatures of {len(plan)} entry points "
           f"(a few seconds each when not cached yet) ...")
    compiled = loaded = 0
    for dispatcher, signatures in plan:
        hits = sum(dispatcher.stats.cache_hits.values())
        for signature in signatures:
            dispatcher.compile(signature)
        new_hits = sum(dispatcher.stats.cache_hits.values()) - hits
        loaded += new_hits
        compiled += len(signatures) - new_hits
        report(f"  {dispatcher.py_func.__qualname__}: {len(signatures)} signatures "
               f"({time.perf_counter() - started:.0f} s so far)")
    launcher = _compile_launcher().launch_sequence_mean
    report(f"  the TF op's C launcher: {'loaded from the cache' if launcher.cache_hits else 'compiled'}")
    folders = sorted({str(dispatcher.stats.cache_path) for dispatcher, _ in plan}
                     | {str(launcher._cache.cache_path)})
    report(f"Numba's cache: {compiled} signatures compiled, {loaded} already cached, in "
           + ", ".join(folders))
    library_dir, reason = _tf_op()
    status = 0
    if library_dir is not None:
        report(f"TF op's compiled kernel: in place and verified against its digest, in {library_dir}")
    elif reason is None:
        report("TF op's compiled kernel: skipped (TensorFlow is not installed)")
    else:
        report(f"TF op's compiled kernel: NOT built ({reason}); the op runs its Python body")
        status = 0 if "turned off by" in reason else 1
    report(f"done in {time.perf_counter() - started:.0f} s")
    names = [NUMBA_CACHE_ENV_VAR] + ([_tf_cache_env_var()] if library_dir is not None else [])
    set_here = [f"{name}={os.environ[name]}" for name in names if os.environ.get(name)]
    unset = [name for name in names if not os.environ.get(name)]
    report("A deployment finds them with " + " and ".join(
        ([" ".join(set_here) + " set"] if set_here else [])
        + ([" and ".join(unset) + " unset (the default folders above)"] if unset else [])) + ".")
    report("Numba reads a cache only from a folder it can write to: keep it writable by the "
           "serving user (a read-only image: point NUMBA_CACHE_DIR at a writable copy).")
    return status


def _notice_compile(event) -> None:
    """On Numba's "numba:compile" event, which fires when a signature is compiled and never
    when it is loaded from the disk cache (the honest sign of a cold cache): the first one
    of a cpu kernel in this process logs the notice."""
    global _notice_given
    if _notice_given or not event.is_start:
        return
    function = getattr(event.data.get("dispatcher"), "py_func", None)
    if not (getattr(function, "__module__", None) or "").startswith(_NOTICE_MODULES):
        return
    with _notice_lock:
        if _notice_given:
            return
        _notice_given = True
    log.warning("fused_embedding: Numba is compiling the cpu backend's kernels (%s was not in its "
                "disk cache): tens of seconds on a first call, once per signature; `%s` compiles "
                "them all ahead of time", function.__qualname__, BUILD_COMMAND)


def announce_compiles() -> None:
    """Install, once per process, the listener that logs the first compile of a cpu kernel
    (``_notice_compile``); the cpu backend calls this before it first imports its kernels."""
    global _notice_listener
    if _notice_listener is not None:
        return
    from numba.core import event

    class CompileNotice(event.Listener):
        def on_start(self, ev):
            _notice_compile(ev)

        def on_end(self, ev):
            pass

    with _notice_lock:
        if _notice_listener is None:
            _notice_listener = CompileNotice()
            event.register("numba:compile", _notice_listener)
