import os
import secrets
import shutil
import zlib

# Without a GPU, numba-cuda's kernels run under the CUDA simulator; the switch
# must be set before numba is first imported. CPU kernels are unaffected.
if "NUMBA_ENABLE_CUDASIM" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Fresh inputs every run; the seed is printed in the header so a failure replays
# with FUSED_EMBEDDING_TEST_SEED=<seed>.
TEST_SEED = int(os.environ.get("FUSED_EMBEDDING_TEST_SEED", secrets.randbits(32)))
# pytest-xdist's workers (`-n 2`) start from this process' environment: all of them
# draw from the one seed the header prints, so a failure on any worker replays.
os.environ["FUSED_EMBEDDING_TEST_SEED"] = str(TEST_SEED)


def pytest_configure(config):
    # `pytest -m "not slow"` is the quick development loop; the README's test command runs all.
    config.addinivalue_line("markers", "slow: takes more than ~10 s on a 2-core machine "
                                       "(subprocesses, builds, large tables)")


def pytest_report_header(config):
    return f"fused-embedding test seed: {TEST_SEED} (set FUSED_EMBEDDING_TEST_SEED to replay)"


@pytest.fixture
def rng(request):
    """A generator per test, from the run's seed and the test's id."""
    return np.random.default_rng([TEST_SEED, zlib.crc32(request.node.nodeid.encode())])


@pytest.fixture
def cpu_launches(monkeypatch):
    """Every kernel launch of the cpu backend during the test, in order, as (arguments, serial)."""
    from fused_embedding.backends import cpu as cpu_backend
    launches = []
    real = cpu_backend._launch

    def recorded(kernel, *args, serial=False):
        launches.append((args, serial))
        return real(kernel, *args, serial=serial)

    monkeypatch.setattr(cpu_backend, "_launch", recorded)
    return launches


# --- shared by the test modules (``from conftest import ...``) ---------------------------
from fused_embedding.conformance import ID_DTYPES, TABLE_DTYPES  # noqa: E402,F401  (for the test modules)


def backend_skip_reason(name):
    """Why backend ``name`` can't run here (for a skip), or None when it can."""
    from fused_embedding import backends
    reason = backends.unavailable_reason(name)
    return f"backend {name!r} unavailable: {reason}" if reason else None


def backend_param(name):
    """``name`` as a pytest parameter, skipped with the reason where the backend can't run."""
    reason = backend_skip_reason(name)
    return pytest.param(name, marks=[pytest.mark.skip(reason=reason)] if reason else [], id=name)


def run_backend(name, table, ids, axis, mask_zero):
    """The backend's launcher on a poisoned output (a host one, copied to a GPU backend's
    device first), so an unwritten element fails."""
    from fused_embedding import backends, conformance
    return conformance.run_poisoned(backends.get(name), table, ids, axis, mask_zero)


def numba_cuda_device_skip_reason(why_not_simulated: str):
    """Why a test needing numba-cuda on a real GPU can't run here, or None when it can."""
    from fused_embedding import backends
    reason = backends.unavailable_reason("numba-cuda")
    if reason is not None:
        return f"backend 'numba-cuda' unavailable: {reason}"
    if backends.cuda_simulated():
        return why_not_simulated
    return None
