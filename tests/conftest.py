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


def pytest_report_header(config):
    return f"fused-embedding test seed: {TEST_SEED} (set FUSED_EMBEDDING_TEST_SEED to replay)"


@pytest.fixture
def rng(request):
    """A generator per test, from the run's seed and the test's id."""
    return np.random.default_rng([TEST_SEED, zlib.crc32(request.node.nodeid.encode())])
