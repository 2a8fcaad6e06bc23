"""Interleaved timing for the benchmark scripts that compare whole calls (SavedModels, Keras models).

Every round calls every runner once, in a fresh random order, on the next of the rotating
inputs, so that no runner always goes first or finds the previous call's rows in cache;
the medians of the rounds are what the scripts report (p20-p80 beside them).
"""
from __future__ import annotations

import statistics
import time


def add_shape_arguments(parser, rounds=30):
    """The options every such script takes: rounds, V, B, L, D and how many id sets rotate."""
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--vocab", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--id-sets", type=int, default=8)


def time_interleaved(runners: dict, inputs: list, rounds: int, rng) -> dict[str, list[float]]:
    """{name: [ms per round]}: ``runners[name](inputs[r % len(inputs)])`` once each round."""
    times = {name: [] for name in runners}
    for r in range(rounds):
        value = inputs[r % len(inputs)]
        for name in rng.permutation(list(runners)):
            started = time.perf_counter()
            runners[name](value)
            times[name].append((time.perf_counter() - started) * 1e3)
    return times


def print_medians(times: dict, bytes_per_call: int, what: str, call: str) -> dict[str, float]:
    """A markdown table (``what``, ``call`` median ms, p20-p80, GB/s of ``bytes_per_call``);
    returns {name: median ms}."""
    print(f"| {what} | {call} median ms | p20-p80 ms | GB/s (pooling bytes) |")
    print("| --- | --- | --- | --- |")
    medians = {}
    for name, values in times.items():
        q = statistics.quantiles(values, n=5)
        medians[name] = statistics.median(values)
        print(f"| {name} | {medians[name]:.2f} | {q[0]:.2f}-{q[3]:.2f} | {bytes_per_call / medians[name] / 1e6:.1f} |")
    print()
    return medians
