"""pytest-benchmark set-up for ``benchmarks/``: collect ``bench_*.py``, share tables and id sets.

Run ``pytest benchmarks/ --benchmark-only``: one group per shape, so the providers
(``fused_embedding.providers``, the same ones ``fused-embedding bench`` times)
sit side by side in each group's table.
"""
import secrets

import numpy as np
import pytest

from fused_embedding import providers as P

SEED = secrets.randbits(32)


def pytest_collect_file(file_path, parent):
    # bench_*.py rather than test_*.py: `pytest tests` never picks these up.
    # A file named on the command line is collected by pytest itself already.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_report_header(config):
    return f"fused-embedding benchmark seed: {SEED}"


@pytest.fixture(scope="session")
def tables():
    """(V, D, dtype) -> Inputs-sharable (table, conversion cache); only the latest table is kept.

    The parametrisation orders cases by table, so a 512 MB table is made once and
    each framework converts it once.
    """
    held = {}
    rng = np.random.default_rng(SEED)

    def get(vocab, dim, dtype):
        key = (vocab, dim, np.dtype(dtype).str)
        if key not in held:
            held.clear()  # free the previous table (and every framework's copy) first
            held[key] = (P.random_table(rng, vocab, dim, dtype), {})
        return held[key]

    return get


@pytest.fixture
def rng():
    return np.random.default_rng(secrets.randbits(64))
