"""Run seed-dependent tests over many seeds once, outside CI: a test that holds for one
seed but not another is flaky, and pytest's one seed per run finds that only by luck.

    python benchmarks/seed_sweep.py tests/test_core.py::test_channels_last_matches_keras --seeds 3000

Each parametrisation of the named test is called as pytest would call it, with the
``rng`` fixture built from each seed the way tests/conftest.py builds it
(``default_rng([seed, crc32(node id)])``). Prints the failing (seed, case) pairs and
exits 1 if there are any.
"""
from __future__ import annotations

import argparse
import os
import sys
import zlib

import numpy as np
import pytest


class _Collector:
    def __init__(self):
        self.items = []

    def pytest_collection_modifyitems(self, items):
        self.items = list(items)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tests", nargs="+", help="pytest node ids (file::test, parametrisations included)")
    parser.add_argument("--seeds", type=int, default=1000)
    parser.add_argument("--first-seed", type=int, default=0)
    args = parser.parse_args(argv)
    collector = _Collector()
    pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *args.tests], plugins=[collector])
    items = [item for item in collector.items if "rng" in getattr(item, "fixturenames", ())]
    if not items:
        print("no collected test takes the rng fixture", file=sys.stderr)
        return 2
    failures = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for item in items:
            rng = np.random.default_rng([seed, zlib.crc32(item.nodeid.encode())])
            kwargs = {name: item.callspec.params[name] for name in getattr(item, "callspec", None).params} \
                if hasattr(item, "callspec") else {}
            kwargs = {k: v for k, v in kwargs.items() if k in item.fixturenames}
            try:
                item.function(rng=rng, **kwargs)
            except AssertionError as exc:
                failures.append((seed, item.nodeid, str(exc).splitlines()[0]))
                print(f"FAIL seed={seed} {item.nodeid}: {str(exc).splitlines()[0]}", flush=True)
    print(f"{len(items)} cases x {args.seeds} seeds (from {args.first_seed}): "
          f"{len(failures)} failures", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    sys.exit(main())
