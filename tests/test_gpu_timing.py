"""The GPU timing the bench and gpu_check share (fused_embedding.gpu_timing), on a stand-in
event framework: the timing policy, the choice of framework, the table view."""
import types

import numpy as np
import pytest

from fused_embedding import gpu_timing
from fused_embedding.semantics import BFLOAT16


def fake_cupy(sample_ms):
    """A stand-in for CuPy's event API whose i-th elapsed time is sample_ms(i)."""
    calls = {"synchronize": 0, "elapsed": 0}

    class Event:
        def record(self):
            pass

        def synchronize(self):
            pass

    def elapsed(start, end):
        calls["elapsed"] += 1
        return sample_ms(calls["elapsed"] - 1)

    def synchronize():
        calls["synchronize"] += 1

    cuda = types.SimpleNamespace(Event=Event, get_elapsed_time=elapsed,
                                 runtime=types.SimpleNamespace(deviceSynchronize=synchronize))
    return types.SimpleNamespace(cuda=cuda), calls


def test_no_framework_with_events_gives_no_timer_and_no_copy(monkeypatch):
    monkeypatch.setattr(gpu_timing.EventTimer, "_numba", lambda self: 1 / 0)
    timer = gpu_timing.EventTimer(torch=None, cupy=None)
    assert timer.name is None
    with pytest.raises(RuntimeError, match="no framework here records CUDA events"):
        gpu_timing.device_copy(timer)


def test_measure_warms_up_then_reports_the_median_per_call(monkeypatch):
    monkeypatch.setattr(gpu_timing.EventTimer, "_numba", lambda self: 1 / 0)
    samples = [50.0, 10.0, 20.0, 30.0, 40.0] * 4  # ms per sample of CALLS_PER_SAMPLE calls
    cupy, calls = fake_cupy(lambda i: samples[i])
    timer = gpu_timing.EventTimer(torch=None, cupy=cupy)
    assert timer.name == "cupy"
    seen = []
    ms, timed = timer.measure(seen.append, budget_s=1e9)
    assert timed == gpu_timing.MAX_SAMPLES * gpu_timing.CALLS_PER_SAMPLE
    # warm-up calls first, then the timed calls counted from 0
    assert seen == list(range(gpu_timing.WARMUP)) + list(range(timed))
    assert ms == pytest.approx(np.median(samples[:gpu_timing.MAX_SAMPLES]) / gpu_timing.CALLS_PER_SAMPLE)
    assert calls["synchronize"] == 1  # the warm-up is finished before the first event


def test_measure_stops_after_its_budget_once_it_has_enough_samples(monkeypatch):
    monkeypatch.setattr(gpu_timing.EventTimer, "_numba", lambda self: 1 / 0)
    cupy, _ = fake_cupy(lambda i: 5.0)
    ms, timed = gpu_timing.EventTimer(cupy=cupy).measure(lambda i: None, budget_s=0.0)
    assert timed == gpu_timing.MIN_SAMPLES * gpu_timing.CALLS_PER_SAMPLE
    assert ms == pytest.approx(5.0 / gpu_timing.CALLS_PER_SAMPLE)


@pytest.mark.parametrize("dtype, typestr", [(np.float32, "<f4"), (np.int64, "<i8"), (BFLOAT16, "<u2")])
def test_device_table_presents_the_buffer_as_its_dtype(dtype, typestr):
    owner = object()
    view = gpu_timing.DeviceTable(1234, (7, 3), dtype, owner)
    assert (view.shape, view.ndim, view.dtype, view.owner) == ((7, 3), 2, np.dtype(dtype), owner)
    assert view.__cuda_array_interface__ == {"shape": (7, 3), "typestr": typestr, "data": (1234, False),
                                             "strides": None, "version": 3}
