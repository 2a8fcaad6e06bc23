"""GPU timing shared by the bench and ``benchmarks/gpu_check.py``: CUDA-event timing, a
device-to-device copy (the roof every GPU figure is a percentage of), and a view of any
framework's GPU buffer as a table the backends take.

Imports no GPU framework until asked, and never TensorFlow (the GPU test machine has none).
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from .bytes_model import copy_bytes, gb_per_s

# Timing policy for one measurement: WARMUP untimed calls, then up to MAX_SAMPLES samples
# of CALLS_PER_SAMPLE calls each, stopping after SECONDS_PER_MEASUREMENT once
# MIN_SAMPLES are in. A sample times several calls back to back between two events, so
# Python's launch overhead overlaps the previous call's work (as it does in a model)
# instead of adding idle GPU time to every sample.
WARMUP = 3
CALLS_PER_SAMPLE = 5
MIN_SAMPLES = 5
MAX_SAMPLES = 20
SECONDS_PER_MEASUREMENT = 2.5
COPY_BYTES = 1 << 30


class DeviceTable:
    """A GPU buffer seen as an array of a NumPy dtype (bfloat16 included) through the CUDA
    array interface: how a torch tensor reaches the backends (torch's bfloat16 has no
    NumPy name; the interface carries its bits as uint16, labelled by ``dtype``).

    ``owner`` keeps the buffer alive as long as the view."""

    def __init__(self, pointer: int, shape, dtype, owner):
        self.shape, self.dtype, self.owner, self.ndim = tuple(shape), np.dtype(dtype), owner, len(shape)
        bits = np.dtype(np.uint16) if self.dtype.kind not in "fiu" else self.dtype
        self.__cuda_array_interface__ = {"shape": self.shape, "typestr": bits.str, "data": (pointer, False),
                                         "strides": None, "version": 3}

    @classmethod
    def of_torch(cls, tensor, dtype) -> "DeviceTable":
        return cls(tensor.data_ptr(), tensor.shape, dtype, tensor)


class EventTimer:
    """CUDA events on the legacy default stream, which numba, CuPy and PyTorch all launch on.

    Events come from the first of numba-cuda, CuPy, PyTorch that works here (pass the
    modules already imported, or None); ``name`` is None when none does.
    """

    def __init__(self, torch=None, cupy=None):
        self.name = None
        for name, make in (("numba-cuda", self._numba), ("cupy", lambda: self._cupy(cupy)),
                           ("torch", lambda: self._torch(torch))):
            try:
                make()
                self.event()  # raises where the framework has no working GPU
                self.name = name
                return
            except Exception:
                continue

    def _numba(self):
        from numba import cuda
        self.event = lambda: cuda.event(timing=True)
        self.synchronize = cuda.synchronize
        self.elapsed_ms = cuda.event_elapsed_time

    def _cupy(self, cupy):
        self.event = cupy.cuda.Event
        self.synchronize = cupy.cuda.runtime.deviceSynchronize
        self.elapsed_ms = cupy.cuda.get_elapsed_time

    def _torch(self, torch):
        self.event = lambda: torch.cuda.Event(enable_timing=True)
        self.synchronize = torch.cuda.synchronize
        self.elapsed_ms = lambda start, end: start.elapsed_time(end)

    def measure(self, fn, budget_s: float = SECONDS_PER_MEASUREMENT) -> tuple[float, int]:
        """(median ms per call, calls timed) of ``fn(i)``, i counting the calls (to rotate
        id sets); the timing policy above."""
        for i in range(WARMUP):
            fn(i)
        self.synchronize()
        per_call = []
        stop_at = time.monotonic() + budget_s
        call = 0
        for _ in range(MAX_SAMPLES):
            start, end = self.event(), self.event()
            start.record()
            for _ in range(CALLS_PER_SAMPLE):
                fn(call)
                call += 1
            end.record()
            end.synchronize()
            per_call.append(self.elapsed_ms(start, end) / CALLS_PER_SAMPLE)
            if time.monotonic() > stop_at and len(per_call) >= MIN_SAMPLES:
                break
        return statistics.median(per_call), call


def device_copy(timer: EventTimer, torch=None, cupy=None, nbytes: int = COPY_BYTES) -> dict:
    """A device-to-device copy of ``nbytes``, timed with ``timer``, in the timer's own
    framework: {"what", "ms", "calls", "gb_per_s" (read + write, bytes_model.copy_bytes)}."""
    if timer.name == "numba-cuda":
        from numba import cuda
        source = cuda.device_array(nbytes // 4, np.float32)
        target = cuda.device_array(nbytes // 4, np.float32)
        ms, calls = timer.measure(lambda i: target.copy_to_device(source))
    elif timer.name == "cupy":
        source = cupy.zeros(nbytes // 4, cupy.float32)
        target = cupy.empty_like(source)
        ms, calls = timer.measure(lambda i: cupy.copyto(target, source))
    elif timer.name == "torch":
        source = torch.zeros(nbytes // 4, device="cuda")
        target = torch.empty_like(source)
        ms, calls = timer.measure(lambda i: target.copy_(source))
    else:
        raise RuntimeError("no framework here records CUDA events (numba-cuda, CuPy, PyTorch)")
    return dict(what=f"{timer.name} device-to-device copy of {nbytes / 2**20:.0f} MiB", ms=ms, calls=calls,
                gb_per_s=gb_per_s(copy_bytes(nbytes), ms / 1e3))
