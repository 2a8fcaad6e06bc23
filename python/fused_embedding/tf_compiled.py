"""The TF op's compiled CPU kernel: ``tf_host_op.cc``, built on first use, cached on disk.

On the host the op's axis-1 path runs as its own compiled TF op (``FusedEmbeddingMean``),
and the sparse lookups' bags as ``FusedEmbeddingBag``, instead of a Python-function op, so a call costs what TF's own ops cost to
dispatch, not a round trip into Python (benchmarks/NOTES.md). Exported SavedModels hold
these ops in every form (tf.py: axis 2 as ``FusedEmbeddingMean(axis=2)``, or
``FusedEmbeddingMeanOfRows`` on a frozen table's row means); a process serves them once
``load_ops()`` (``fused_embedding.tf.load_ops``) has loaded and configured the library. The library is
compiled once with the C++ compiler (``$CXX``, else ``c++``) against the installed
TF's headers, into ``cache_dir()``: ``$FUSED_EMBEDDING_CACHE_DIR``, else
``$XDG_CACHE_HOME/fused_embedding`` or ``~/.cache/fused_embedding``, else (home not
writable) a folder in the temporary directory. The file is named by a hash of the
source, TF's version and the build command (the compiler's path among it), so a new
TF, a changed source or another compiler builds anew; a compiler upgraded in place
at the same path does not (delete the file to rebuild). Beside it, ``<name>.sha256``
holds its digest, written once the library is in place and checked before every load:
a library that doesn't match it, or has none (a truncated or damaged file, which
``tf.load_op_library`` would crash on with SIGBUS or SIGSEGV), is built anew. A build
is announced once, as a warning on the ``fused_embedding`` logger. Where that can't be
done (no compiler, no TF headers, a Numba threading layer that isn't thread-safe) the
op keeps its Python body; ``unavailable_reason()`` says why. Setting
``FUSED_EMBEDDING_COMPILED_TF_OP=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import tensorflow as tf

from . import c_interface, memory
from .semantics import TABLE_FORMATS

log = logging.getLogger("fused_embedding")

SOURCE = Path(__file__).with_name("tf_host_op.cc")
ENABLE_ENV_VAR = "FUSED_EMBEDDING_COMPILED_TF_OP"
CACHE_ENV_VAR = "FUSED_EMBEDDING_CACHE_DIR"
BUILD_TIMEOUT_S = 600
BUILD_COMMAND = "fused-embedding build"  # builds the library ahead of first use

_lock = threading.Lock()
_module = None         # the loaded op library (tf.load_op_library's module)
_reason = None         # why it can't be used, once that is known
_tried = False
_library = None        # the same library through ctypes, for its C entry points


def cache_dir() -> Path:
    """``$FUSED_EMBEDDING_CACHE_DIR``, else ``fused_embedding`` in the user's cache folder,
    else (a home that can't be written) in the temporary folder."""
    explicit = os.environ.get(CACHE_ENV_VAR)
    if explicit:
        return Path(explicit)
    base = Path(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"))
    existing = next((folder for folder in (base / "fused_embedding", base, *base.parents) if folder.exists()),
                    None)
    if existing is not None and os.access(existing, os.W_OK):
        return base / "fused_embedding"
    return Path(tempfile.gettempdir()) / f"fused_embedding-{os.getuid()}"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def _build_command(compiler: str, output: Path, include_dir: Path) -> list[str]:
    """``include_dir`` holds the generated C interface header (c_interface.HEADER_NAME)."""
    return ([compiler, "-shared", "-fPIC", "-O2", "-Wno-deprecated-declarations", f"-I{include_dir}",
             str(SOURCE), "-o", str(output)]
            + tf.sysconfig.get_compile_flags() + tf.sysconfig.get_link_flags())


def library_path(compiler: str) -> Path:
    """Where the library built from this source and C interface, for this TF and compiler, is kept."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(c_interface.header_text().encode())
    key.update(tf.__version__.encode())
    key.update(" ".join(_build_command(compiler, Path("-"), Path("-"))).encode())
    return cache_dir() / f"tf_host_op-{key.hexdigest()[:16]}.so"


def digest_path(path: Path) -> Path:
    """The file beside the library ``path`` that holds its SHA-256 (``sha256sum`` format)."""
    return path.with_name(path.name + ".sha256")


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def why_rebuild(path: Path) -> str | None:
    """None when the cached library at ``path`` can be loaded (it matches the digest
    beside it), else why it has to be built."""
    if not path.exists():
        return "none is cached yet"
    try:
        recorded = digest_path(path).read_text().split()[0]
    except (OSError, IndexError, UnicodeDecodeError):
        return (f"{path.name} has no readable digest beside it ({digest_path(path).name}), "
                "so it may be half-copied or damaged")
    actual = _file_digest(path)
    if actual != recorded:
        return (f"{path.name} does not match its digest ({actual[:12]}... against {recorded[:12]}... "
                f"in {digest_path(path).name}): a damaged file")
    return None


def _private_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.partial")


def _build(compiler: str, path: Path) -> None:
    """Compile into a private file, rename it into place, then write its digest beside
    it (through a private file and a rename too): processes building at once each
    write their own files, and a reader never sees half a library or half a digest.
    Two processes that build at once may leave one's library beside the other's
    digest; they match when the compiler's output is deterministic, and otherwise the
    next process to load it builds it once more."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial, partial_digest = _private_name(path), _private_name(digest_path(path))
    try:
        with tempfile.TemporaryDirectory(prefix="fused_embedding_include-") as include_dir:
            (Path(include_dir) / c_interface.HEADER_NAME).write_text(c_interface.header_text())
            done = subprocess.run(_build_command(compiler, partial, Path(include_dir)), capture_output=True,
                                  text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        partial_digest.write_text(f"{_file_digest(partial)}  {path.name}\n")
        os.replace(partial, path)
        os.replace(partial_digest, digest_path(path))
    finally:
        partial.unlink(missing_ok=True)
        partial_digest.unlink(missing_ok=True)


def ensure_library(compiler: str) -> Path:
    """The verified library for ``compiler``: the cached one if it matches its digest,
    else built now (announced once, as a warning, with the reason). Raises what
    ``_build`` raises where it can't be built."""
    path = library_path(compiler)
    reason = why_rebuild(path)
    if reason is not None:
        log.warning("fused_embedding: building the TF op's compiled kernel into %s (about 10 s, "
                    "once; `%s` builds it ahead of time): %s", path, BUILD_COMMAND, reason)
        _build(compiler, path)
    return path




def _output_too_large(rows: int, cols: int, dtype: int, message: int, capacity: int) -> int:
    """The compiled kernel's memory check, before it allocates a (rows, cols) output of
    TF DataType ``dtype``: 0 when it fits the cpu backend's bound (the one the core op
    checks), else the length of the core op's MemoryError message, written
    NUL-terminated at address ``message`` (``capacity`` bytes)."""
    try:
        from .backends import cpu
        np_dtype = np.dtype(tf.as_dtype(dtype).as_numpy_dtype)
        out_bytes = rows * cols * np_dtype.itemsize
        limit = cpu.memory_limit_bytes()
        if out_bytes <= limit:
            return 0
        text = str(memory.output_too_large_error((rows, cols), np_dtype, out_bytes, limit, "cpu"))
        encoded = text.encode()[:capacity - 1]
        ctypes.memmove(message, encoded + b"\0", len(encoded) + 1)
        return max(len(encoded), 1)
    except Exception:  # an exception can't cross into C++: the output is then not checked
        log.exception("fused_embedding: the compiled kernel's memory check failed")
        return 0


_output_check = c_interface.OUTPUT_CHECK.ctypes_functype()(_output_too_large)  # kept alive: the library holds its address


def _configure(library: ctypes.CDLL, launcher_address: int | None = None) -> None:
    """Hand the library the launcher (the cpu backend's, unless a test gives another
    C function of the same signature), Numba's team size, the bad-id message and the
    memory check for outputs of ``api.MEMORY_CHECK_MIN_BYTES`` or more."""
    import numba

    from .api import MEMORY_CHECK_MIN_BYTES
    from .backends import OUT_OF_RANGE_MESSAGE, cpu_cfunc
    dtypes = [tf.as_dtype(dtype).as_datatype_enum for dtype in TABLE_FORMATS]
    formats = list(TABLE_FORMATS.values())
    configure = c_interface.CONFIGURE.bind(library)
    if launcher_address is None:
        launcher_address = cpu_cfunc.launch_sequence_mean.address
    status = configure(launcher_address, numba.config.NUMBA_NUM_THREADS,
                       OUT_OF_RANGE_MESSAGE.encode(), len(dtypes),
                       (ctypes.c_int * len(dtypes))(*dtypes), (ctypes.c_int * len(formats))(*formats),
                       ctypes.cast(_output_check, ctypes.c_void_p), MEMORY_CHECK_MIN_BYTES)
    if status != 0:
        raise RuntimeError(f"the library refused the table dtypes' TF enum values {dtypes}: it "
                           "takes values from 0 to 31 (kDataTypes in tf_host_op.cc)")
    _configure_bags(library)


def _configure_bags(library: ctypes.CDLL) -> None:
    """Hand the library the cpu backend's bags launcher and the bags op's messages (the
    core op's bad-id message; the sparse drop-ins' row-order and row-range ones)."""
    from .backends import BAG_OUT_OF_RANGE_MESSAGE, CANONICAL_ORDER_MESSAGE, ROW_OUTSIDE_MESSAGE, cpu_bags_cfunc
    configure_bags = c_interface.CONFIGURE_BAGS.bind(library)
    configure_bags(cpu_bags_cfunc.launch_bags.address, BAG_OUT_OF_RANGE_MESSAGE.encode(),
                   CANONICAL_ORDER_MESSAGE.encode(), ROW_OUTSIDE_MESSAGE.encode())


def _load():
    if os.environ.get(ENABLE_ENV_VAR, "1") == "0":
        raise RuntimeError(f"turned off by {ENABLE_ENV_VAR}=0")
    import numba

    from .backends import cpu
    if not cpu.parallel_launches_thread_safe():
        raise RuntimeError(f"Numba's {numba.threading_layer()!r} threading layer can't take "
                           "launches from several threads at once, as TF's executor makes them")
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    path = ensure_library(compiler)
    module = tf.load_op_library(str(path))
    library = ctypes.CDLL(str(path))  # the handle tf.load_op_library opened: the same globals
    _configure(library)
    set_serial_only = c_interface.SET_SERIAL_ONLY.bind(library)
    set_serial_only(int(cpu.runs_serial_only()))
    cpu.on_serial_only(lambda: set_serial_only(1))
    return module, library


# Not converted by AutoGraph when first called while a tf.function traces: its converted
# copy mishandles the ``global`` assignment of the pair below and left ``_library`` None.
@tf.autograph.experimental.do_not_convert
def op_module():
    """The loaded library's op module (``.fused_embedding_mean``), or None where it can't be used."""
    global _module, _library, _reason, _tried
    if _tried:
        return _module
    with _lock:
        if not _tried:
            try:
                _module, _library = _load()
            except Exception as exc:  # any failure leaves the Python body in place
                _reason = f"{type(exc).__name__}: {exc}"
                log.warning("fused_embedding: the TF op keeps its Python body (%s)", _reason)
            _tried = True
    return _module


def poison_outputs(value: float | None) -> None:
    """For tests: fill every output of the compiled kernel with ``value`` before the kernel
    writes it (None: stop), so an element it skips shows. Needs the library loaded."""
    poison = c_interface.POISON_OUTPUTS.bind(_library)
    poison(int(value is not None), 0.0 if value is None else float(value))


def unavailable_reason() -> str | None:
    """None when the compiled kernel is in use, else why not (tries to load it first)."""
    op_module()
    return _reason


def embedding_bag(table, values, segments, batch, weights, pooling_code: int, weighted: bool, sparse: bool,
                  prune_ids: bool, prune_weights: bool) -> tf.Tensor:
    """(B, D) CSR bags through the compiled kernel (``FusedEmbeddingBag``); ``op_module()``
    must have returned a module. ``segments``: row_splits [B + 1] (ragged) or a
    SparseTensor's indices [N][2] (``sparse``, then ``batch`` is B); ``weights`` [N]
    float32, or an empty float32 tensor when not ``weighted``."""
    return _module.fused_embedding_bag(table, values, segments, batch, weights, pooling=pooling_code,
                                       weighted=weighted, sparse=sparse, prune_ids=prune_ids,
                                       prune_weights=prune_weights)


def embedding_mean_sequence(table: tf.Tensor, ids: tf.Tensor, mask_zero: bool) -> tf.Tensor:
    """(B, D) mean over the sequence axis through the compiled kernel; ``op_module()`` must
    have returned a module. Inputs checked by the caller (dtypes, ranks)."""
    return _module.fused_embedding_mean(table, ids, mask_zero=mask_zero)


def embedding_mean_per_id(table: tf.Tensor, ids: tf.Tensor, mask_zero: bool) -> tf.Tensor:
    """(B, L): the mean of each id's row of ``table`` (V, D), read from the rows (axis 2 on a
    table that may change, a tf.Variable); ``op_module()`` must have returned a module."""
    return _module.fused_embedding_mean(table, ids, mask_zero=mask_zero, axis=2)


def mean_of_rows(row_means: tf.Tensor, ids: tf.Tensor, dtype: tf.DType, mask_zero: bool) -> tf.Tensor:
    """(B, L) of ``dtype``: ``row_means`` [V] float32 (a frozen table's, computed once) at each
    id, padding (mask_zero) 0, bad ids refused as by the other forms."""
    return _module.fused_embedding_mean_of_rows(row_means, ids, T=dtype, mask_zero=mask_zero)


def load_ops():
    """Build the library if needed, load it into TF and configure it; returns the op module.
    Raises RuntimeError saying why where it can't be (``unavailable_reason()``)."""
    module = op_module()
    if module is None:
        raise RuntimeError(f"fused_embedding's TF ops can't be loaded here: {_reason}. A SavedModel "
                           "holding FusedEmbedding* ops needs them; export one with "
                           "`with fused_embedding.tf.native_ops():` to serve it with TF alone")
    return module


def write_serving_sources(folder) -> list[Path]:
    """Write the op's C++ source and its generated C interface header into ``folder``, for a
    server that links the op in (TF Serving: a ``cc_library(alwayslink=1)``); returns the paths.

    Linked in without Python, the kernels run their plain C++ loops (tf_host_op.cc's header)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source, header = folder / SOURCE.name, folder / c_interface.HEADER_NAME
    source.write_text(SOURCE.read_text())
    header.write_text(c_interface.header_text())
    return [source, header]
