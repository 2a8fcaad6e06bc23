"""The backend registry: name -> availability probe -> launcher.

Each backend is a module with
    ``DEVICE``: "cpu" (host arrays) or "cuda" (device arrays),
    ``unavailable_reason() -> str | None``: None when it can run here,
    ``memory_limit_bytes() -> int``: the most an output may take on its device,
    ``embedding_mean(table, ids, axis, mask_zero, out=None) -> out``: validated
    inputs in, result out; raises ``out_of_range_error(...)`` for a bad id.
Backends trust the core's validation and do no argument checking of their own.
"""
from __future__ import annotations

import functools
import importlib
import logging
from types import ModuleType

import numpy as np

log = logging.getLogger("fused_embedding")

# Fastest first, per device. An auto-picked backend that fails to import falls
# through quietly; a forced one reports why it can't run.
REGISTRY = {
    "numba-cuda": "fused_embedding.backends.numba_cuda",
    "cupy": "fused_embedding.backends.cupy",
    "cpu": "fused_embedding.backends.cpu",
    "numpy": "fused_embedding.backends.numpy",
}

_modules: dict[str, ModuleType] = {}
_reasons: dict[str, str | None] = {}


def unavailable_reason(name: str) -> str | None:
    """None if backend ``name`` can run here, else why not (probed once)."""
    if name not in _reasons:
        try:
            module = importlib.import_module(REGISTRY[name])
            reason = module.unavailable_reason()
        except ImportError as exc:  # an optional dependency is missing
            module, reason = None, f"import failed: {exc}"
        except Exception as exc:  # a driver or runtime that is there but broken
            module, reason = None, f"{type(exc).__name__}: {exc}"
        if reason is None:
            _modules[name] = module
        _reasons[name] = reason
    return _reasons[name]


def get(name: str) -> ModuleType:
    """The launcher module of an available backend."""
    reason = unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available here: {reason}")
    return _modules[name]


_devices: dict[str, str] = {}


def device_of_backend(name: str) -> str:
    """The backend module's ``DEVICE``: "cpu" (host arrays) or "cuda"."""
    device = _devices.get(name)
    if device is None:  # a backend module imports only required packages (numba, numpy) at its top
        device = _devices[name] = importlib.import_module(REGISTRY[name]).DEVICE
    return device


def synchronize_deferred() -> None:
    """Wait for the GPU calls made with deferred bounds checks; raise the first bad id."""
    from . import gpu_staging
    gpu_staging.synchronize()


@functools.lru_cache(maxsize=None)  # fixed once numba is imported; asked on every GPU call
def cuda_simulated() -> bool:
    """True when Numba's CUDA target is its simulator (``NUMBA_ENABLE_CUDASIM=1`` before numba's import)."""
    from numba.core import config
    return bool(config.ENABLE_CUDASIM)


def available_backends() -> list[str]:
    """Names of the backends usable here, fastest first."""
    return [name for name in REGISTRY if unavailable_reason(name) is None]


class PreparedCall:
    """One GPU call with its device buffers in place: ``launch()`` enqueues the kernel
    (no sync), ``finish()`` reads the error flag, raises for a bad id, and returns the
    result. Split so the GPU check can time the kernel alone; the backends'
    ``embedding_mean`` does both.

    launch: a callable that enqueues the kernel, or None when there is nothing to run.
    """

    def __init__(self, launch, finish):
        self._launch, self._finish = launch, finish

    def launch(self):
        if self._launch is not None:
            self._launch()

    def finish(self):
        return self._finish()


# The GPU kernels' error flag on entry, "no bad id": above any flat position b * L + l a
# kernel can lower it to, with every byte 0x7F so one asynchronous memset writes it
# (CuPy's full() launched a fill kernel: 26 us of host time per call on an H200).
NO_BAD_POSITION_BYTE = 0x7F
NO_BAD_POSITION = int.from_bytes(bytes([NO_BAD_POSITION_BYTE]) * 8, "little")


# DLPack device types that live on an NVIDIA GPU (kDLCUDA, kDLCUDAHost is host).
_DLPACK_CUDA = 2
_DLPACK_CUDA_MANAGED = 13


def device_of(array) -> str:
    """"cuda" for GPU arrays (CUDA array interface or a CUDA DLPack device), else "cpu"."""
    if type(array) is np.ndarray:  # the common case, answered without attribute probes
        return "cpu"
    if hasattr(array, "__cuda_array_interface__"):
        return "cuda"
    dlpack_device = getattr(array, "__dlpack_device__", None)
    if dlpack_device is not None:
        try:
            kind = int(dlpack_device()[0])
        except Exception:
            return "cpu"
        if kind in (_DLPACK_CUDA, _DLPACK_CUDA_MANAGED):
            return "cuda"
    return "cpu"


class Bfloat16OnDevice:
    """uint16 bits on a GPU (a CuPy or Numba array) presented as a bfloat16 array: CuPy has
    no bfloat16. ``dtype`` says bfloat16 (what the core checks); ``__cuda_array_interface__``
    is the bits' own, which the GPU backends read as uint16 words anyway; ``bits`` the array."""

    def __init__(self, bits):
        from ..semantics import BFLOAT16
        self.bits = bits
        self.shape, self.ndim, self.dtype = tuple(bits.shape), bits.ndim, BFLOAT16

    @property
    def __cuda_array_interface__(self):
        return self.bits.__cuda_array_interface__


# Also filled in by the TF op's compiled kernel (tf_host_op.cc), which gets it at load.
OUT_OF_RANGE_MESSAGE = ("id {id} at ids[{row}, {col}] is out of range for a table of {vocab} rows "
                        "(expected 0 <= id < {vocab})")


def out_of_range_error(bad_id: int, row: int, col: int, vocab: int) -> IndexError:
    return IndexError(OUT_OF_RANGE_MESSAGE.format(id=bad_id, row=row, col=col, vocab=vocab))


# The CSR bags op's: a position in values, and the bag it falls in (tf_bags' graph checks too).
BAG_OUT_OF_RANGE_MESSAGE = ("id {id} at values[{position}] (bag {bag}) is out of range for a table "
                            "of {vocab} rows (expected 0 <= id < {vocab})")


# The sparse drop-ins' (tf_bags), from their Python body and the compiled kernel alike.
CANONICAL_ORDER_MESSAGE = "sp_ids must be in canonical row-major order (tf.sparse.reorder makes it so)"
ROW_OUTSIDE_MESSAGE = ("sp_ids has an id in row {row} (values[{position}]), outside its dense_shape's "
                       "{batch} rows")


def bag_out_of_range_error(values, offsets, position: int, vocab: int) -> IndexError:
    """The error for the id at ``values[position]`` (host arrays), naming it, its position,
    its bag and V."""
    position = int(position)
    bag = int(np.searchsorted(offsets, position, side="right")) - 1  # the bag with ids, not an empty one
    return IndexError(BAG_OUT_OF_RANGE_MESSAGE.format(id=int(values[position]), position=position,
                                                      bag=bag, vocab=vocab))


def raise_bad_id_at(flat_position: int, ids, vocab: int) -> None:
    """Raise for the id at ``flat_position`` (``b * L + l``) of host ids [B][L], as a
    kernel reported it: the first out-of-range id in row order."""
    row, col = divmod(int(flat_position), ids.shape[1])
    raise out_of_range_error(int(ids[row, col]), row, col, vocab)
