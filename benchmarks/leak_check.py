"""Leak check: thousands of calls of the TF op keep the process' resident memory flat.

    python benchmarks/leak_check.py [--calls 10000] [--warmup 1000] [--bound-mb 20] [--paths eager,tf.function,core]

For each path, the op runs ``--warmup`` times (tracing, compilation, allocator
pools), the resident set size (RSS, psutil) is read once it has settled, then
the op runs ``--calls`` more times, RSS read every 1000 calls. The figure is the
growth from the settled RSS to the last reading (and the largest reading).
Exits 1 if any path grows by more than ``--bound-mb`` MB, or if a result is not
the float64 reference's within the table dtype's tolerance.

Paths:
  eager        ``fused_embedding.tf.embedding_mean`` called eagerly;
  tf.function  the same inside a ``tf.function`` (its numpy_function body here, py_function
               where TF has a GPU);
  core         ``fused_embedding.embedding_mean`` on NumPy arrays (no TF).
Shape: V=100,000, D=64 float32 table, B=64, L=32 ids, axis 1 and 2 alternating,
with and without the mask: a new id set every call.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import numpy as np

PATHS = ("eager", "tf.function", "core")
SAMPLE_EVERY = 1000
VOCAB, DIM, BATCH, LENGTH = 100_000, 64, 64, 32
ID_SETS = 16  # fresh ids each call, from a fixed pool so the pool itself doesn't grow


def rss_mb() -> float:
    import psutil
    return psutil.Process(os.getpid()).memory_info().rss / 1e6


def make_call(path, table, tf):
    """A function (ids, axis, mask_zero) -> NumPy result for one path."""
    import fused_embedding as fe
    if path == "core":
        return lambda ids, axis, mask_zero: fe.embedding_mean(table, ids, axis=axis, mask_zero=mask_zero,
                                                               backend="cpu")
    import fused_embedding.tf as fused_tf
    table_tensor = tf.constant(table)
    if path == "eager":
        return lambda ids, axis, mask_zero: fused_tf.embedding_mean(
            table_tensor, tf.constant(ids), axis=axis, mask_zero=mask_zero, backend="cpu").numpy()
    functions = {(axis, mask_zero): tf.function(
        lambda t, i, axis=axis, mask_zero=mask_zero: fused_tf.embedding_mean(
            t, i, axis=axis, mask_zero=mask_zero, backend="cpu"))
        for axis in (1, 2) for mask_zero in (False, True)}
    return lambda ids, axis, mask_zero: functions[(axis, mask_zero)](table_tensor, tf.constant(ids)).numpy()


def check_path(path, table, id_sets, expected, calls, warmup, tf):
    """(settled RSS, last RSS, largest RSS) in MB over ``calls`` calls after ``warmup``; raises on a wrong result."""
    from fused_embedding.validation import compare, tolerance
    call = make_call(path, table, tf)

    def run(n):
        ids = id_sets[n % ID_SETS]
        axis, mask_zero = (1, 2)[n % 2], bool((n // 2) % 2)
        return call(ids, axis, mask_zero), (n % ID_SETS, axis, mask_zero)

    for n in range(warmup):
        run(n)
    gc.collect()
    settled = rss_mb()
    samples = []
    for n in range(calls):
        result, key = run(warmup + n)
        if n % SAMPLE_EVERY == 0 or n == calls - 1:
            report = compare(result, expected[key], **tolerance(table.dtype))
            if report:
                raise AssertionError(f"{path}: call {n} gave a wrong result:\n{report}")
        if (n + 1) % SAMPLE_EVERY == 0 or n == calls - 1:
            samples.append(rss_mb())
    gc.collect()
    samples.append(rss_mb())
    return settled, samples[-1], max(samples)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--bound-mb", type=float, default=20.0)
    parser.add_argument("--paths", default=",".join(PATHS),
                        help=f"comma-separated, from {', '.join(PATHS)}")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    paths = [p for p in args.paths.split(",") if p]
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        parser.error(f"unknown path(s) {unknown}; expected some of {list(PATHS)}")

    from fused_embedding.reference import embedding_mean_reference
    from fused_embedding.validation import random_inputs
    tf = None
    if any(p != "core" for p in paths):
        try:
            import tensorflow as tf
        except ImportError:
            print("TensorFlow is not installed: checking the core op only")
            paths = [p for p in paths if p == "core"]

    rng = np.random.default_rng(args.seed)
    table, _ = random_inputs(rng, VOCAB, DIM, 1, 1)
    id_sets = [random_inputs(rng, VOCAB, 1, BATCH, LENGTH, padding_fraction=0.1)[1] for _ in range(ID_SETS)]
    expected = {(k, axis, mask_zero): embedding_mean_reference(table, id_sets[k], axis, mask_zero)
                for k in range(ID_SETS) for axis in (1, 2) for mask_zero in (False, True)}

    print(f"{args.calls} calls per path after {args.warmup} warm-up calls; "
          f"table ({VOCAB}, {DIM}) float32, ids ({BATCH}, {LENGTH}); bound {args.bound_mb:g} MB")
    failed = False
    for path in paths:
        settled, last, largest = check_path(path, table, id_sets, expected, args.calls, args.warmup, tf)
        growth = last - settled
        ok = growth <= args.bound_mb and largest - settled <= args.bound_mb
        failed |= not ok
        print(f"{path:12s} RSS settled {settled:8.1f} MB, after {args.calls} calls {last:8.1f} MB "
              f"(largest {largest:8.1f} MB): growth {growth:+6.1f} MB  {'ok' if ok else 'OVER THE BOUND'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
