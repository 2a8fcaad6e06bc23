"""BoundsCheck.DEFERRED: a GPU call returns without waiting for its error flag; the bad id
is raised by a later call once that kernel has finished, or by synchronize(); never dropped.

numba-cuda runs under the CUDA simulator here (conftest), where every launch and copy is
synchronous, so a deferred check has always landed by the next call; the queue's logic
(order, bound, waiting) is tested on its own with checks whose copies land when told.
The cupy backend runs on the host-built CUDA C through the NumPy stand-in of
test_gpu_simulator.py.
"""
import sys
import types

import numpy as np
import pytest

import fused_embedding as fe
from fused_embedding.backends import NO_BAD_POSITION, gpu_staging
from fused_embedding.reference import embedding_mean_reference
from fused_embedding.semantics import Axis
from fused_embedding.validation import assert_close, poisoned, random_inputs, unwritten

from test_gpu_simulator import requires_numba_cuda, stand_in_cupy, StandInArray  # noqa: F401 (fixture)

BAD = r"id 50 at ids\[4, 5\] is out of range for a table of 50 rows .*deferred bounds check"


@pytest.fixture(autouse=True)
def empty_queue():
    """Each test starts and ends with no deferred check queued (a leftover would raise elsewhere)."""
    gpu_staging._pending.clear()
    yield
    leftover = gpu_staging.pending_checks()
    gpu_staging._pending.clear()
    assert leftover == 0, f"{leftover} deferred checks were left unread"


def bad_inputs(rng):
    table, ids = random_inputs(rng, 50, 4, 6, 7, id_dtype=np.int64)
    ids[5, 0] = -3
    ids[4, 5] = 50  # the first bad id in row order
    return table, ids


@requires_numba_cuda
@pytest.mark.parametrize("axis", [1, 2])
def test_numba_cuda_bad_id_raises_at_the_next_call(rng, axis):
    table, ids = bad_inputs(rng)
    fe.embedding_mean(table, ids, axis=axis, backend="numba-cuda", bounds_check="deferred")  # returns
    assert gpu_staging.pending_checks() == 1
    good_table, good_ids = random_inputs(rng, 30, 8, 3, 4)
    with pytest.raises(IndexError, match=BAD):
        fe.embedding_mean(good_table, good_ids, backend="numba-cuda")  # any later call, either mode
    assert gpu_staging.pending_checks() == 0
    # Reported once: the next call runs.
    assert_close(fe.embedding_mean(good_table, good_ids, backend="numba-cuda"),
                 embedding_mean_reference(good_table, good_ids), np.float32)


@requires_numba_cuda
def test_numba_cuda_bad_id_raises_at_synchronize(rng):
    table, ids = bad_inputs(rng)
    fe.embedding_mean(table, ids, backend="numba-cuda", bounds_check="deferred")
    with pytest.raises(IndexError, match=BAD):
        fe.synchronize()
    fe.synchronize()  # read once: nothing left


@requires_numba_cuda
@pytest.mark.parametrize("axis", [1, 2])
@pytest.mark.parametrize("mask_zero", [False, True])
def test_numba_cuda_deferred_results_match_the_reference(rng, axis, mask_zero):
    from fused_embedding import backends
    table, ids = random_inputs(rng, 40, 16, 3, 5, np.float16, padding_fraction=0.3 if mask_zero else 0.0)
    out = poisoned(((3, 16) if axis == 1 else (3, 5)), np.float16)
    backends.get("numba-cuda").embedding_mean(table, ids, Axis(axis), mask_zero, out=out,
                                              bounds_check=gpu_staging_deferred())
    fe.synchronize()
    assert not unwritten(out).any()
    assert_close(out, embedding_mean_reference(table, ids, axis, mask_zero), np.float16)


def gpu_staging_deferred():
    from fused_embedding.spec import BoundsCheck
    return BoundsCheck.DEFERRED


def test_host_backends_check_every_call_at_once(rng):
    table, ids = bad_inputs(rng)
    for backend in ("cpu", "numpy"):
        with pytest.raises(IndexError, match=r"id 50 at ids\[4, 5\]"):
            fe.embedding_mean(table, ids, backend=backend, bounds_check="deferred")


def test_unknown_bounds_check_is_refused(rng):
    table, ids = random_inputs(rng, 10, 4, 2, 3)
    with pytest.raises(ValueError, match=r"bounds_check must be one of \['raise', 'deferred'\], got 'later'"):
        fe.embedding_mean(table, ids, bounds_check="later")


@pytest.fixture
def deferred_cupy(stand_in_cupy, monkeypatch):  # noqa: F811 (the fixture imported above)
    """The stand-in CuPy with what a deferred check uses: streams, events, pinned arrays."""
    cupy = sys.modules["cupy"]

    class Event:
        def __init__(self, **_):
            self.done = False

        def record(self, stream=None):
            self.done = True  # the stand-in ran the kernel and the copy already

        def synchronize(self):
            pass

    monkeypatch.setattr(cupy.cuda, "get_current_stream", lambda: None, raising=False)
    monkeypatch.setattr(cupy.cuda, "Event", Event, raising=False)
    monkeypatch.setitem(sys.modules, "cupyx", types.SimpleNamespace(
        empty_pinned=lambda n, dtype: np.empty(n, dtype)))
    real_get = StandInArray.get
    monkeypatch.setattr(StandInArray, "get", lambda self, out=None, stream=None, blocking=True:
                        real_get(self, out=out))
    stand_in_cupy._host_slots._free.clear()
    yield stand_in_cupy
    stand_in_cupy._host_slots._free.clear()


@pytest.mark.parametrize("axis", [1, 2])
def test_cupy_bad_id_raises_at_the_next_call(rng, deferred_cupy, axis):
    from fused_embedding.spec import BoundsCheck
    table, ids = bad_inputs(rng)
    out = poisoned((6, 4) if axis == 1 else (6, 7), np.float32)
    deferred_cupy.embedding_mean(table, ids, Axis(axis), False, out=out, bounds_check=BoundsCheck.DEFERRED)
    assert gpu_staging.pending_checks() == 1
    good_table, good_ids = random_inputs(rng, 50, 4, 6, 7, id_dtype=np.int64)
    with pytest.raises(IndexError, match=BAD):
        deferred_cupy.embedding_mean(good_table, good_ids, Axis(axis), False)
    out = poisoned((6, 4) if axis == 1 else (6, 7), np.float32)
    deferred_cupy.embedding_mean(good_table, good_ids, Axis(axis), False, out=out,
                                 bounds_check=BoundsCheck.DEFERRED)
    fe.synchronize()  # a good deferred call reports nothing
    assert not unwritten(out).any()
    assert_close(out, embedding_mean_reference(good_table, good_ids, axis), np.float32)


# --- the queue on its own -------------------------------------------------------------------

class Landing:
    """A deferred check whose flag copy lands when the test says so (or when waited for)."""

    def __init__(self, first_bad=NO_BAD_POSITION, name="call"):
        self.flag = np.array([NO_BAD_POSITION], np.int64)
        self.value, self.landed, self.waited = first_bad, False, False
        ids = np.full((2, 3), 7, np.int64)
        self.check = gpu_staging.PendingCheck(
            self.flag, lambda: self.landed, self.wait, 6,
            gpu_staging.dense_error_at(lambda r, c: ids[r, c] + 100 * len(name), 3, 5))

    def land(self):
        self.flag[0], self.landed = self.value, True

    def wait(self):
        self.waited = True
        self.land()


def test_a_check_still_in_flight_is_not_read_and_keeps_the_later_ones_queued():
    first, second = Landing(first_bad=4, name="a"), Landing(first_bad=1, name="bb")
    gpu_staging.defer(first.check)
    gpu_staging.defer(second.check)
    second.land()
    gpu_staging.raise_finished()  # the oldest has not landed: nothing read yet, nothing lost
    assert gpu_staging.pending_checks() == 2
    first.land()
    with pytest.raises(IndexError, match=r"id 107 at ids\[1, 1\] .* table of 5 rows"):
        gpu_staging.raise_finished()  # both read; the older call's bad id is the one raised
    assert gpu_staging.pending_checks() == 0


def test_the_queue_is_bounded_by_waiting_for_the_oldest(monkeypatch):
    monkeypatch.setattr(gpu_staging, "MAX_PENDING", 2)
    calls = [Landing() for _ in range(3)]
    for call in calls:
        gpu_staging.defer(call.check)
    assert calls[0].waited and not calls[1].waited and gpu_staging.pending_checks() == 2
    gpu_staging.synchronize()
    assert all(call.waited for call in calls[1:]) and gpu_staging.pending_checks() == 0


def test_synchronize_waits_for_every_check_and_raises_the_first_bad_one():
    calls = [Landing(), Landing(first_bad=5, name="a"), Landing(first_bad=0, name="bb")]
    for call in calls:
        gpu_staging.defer(call.check)
    with pytest.raises(IndexError, match=r"id 107 at ids\[1, 2\]"):
        gpu_staging.synchronize()
    assert all(call.waited for call in calls) and gpu_staging.pending_checks() == 0
