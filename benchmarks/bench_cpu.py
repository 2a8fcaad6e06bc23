"""CPU benchmarks: the fused op against TF, Keras and PyTorch, grouped per shape.

    pytest benchmarks/bench_cpu.py --benchmark-only

Each group is one (B, L, D, V, dtype, axis) case; its rows are the providers of
``fused_embedding.providers`` (the ones ``fused-embedding bench`` times). Every
call takes the next of several fresh id sets so the rows come from DRAM, not
the last-level cache. Each provider's output is checked against the float64
reference on the benchmark's own shape before it is timed. ``extra_info`` holds
the bytes model's traffic and the GB/s at the median; the "copy baseline" group
times the 256 MiB copy the command compares bandwidth with, and the "read
baseline" group a parallel read of 256 MiB: the fastest this machine streams
memory that is only read, as the gathered rows are (benchmarks/NOTES.md).

The headline shape (B=1024, L=64, D=128, V=1,000,000, fp32, uniform ids) is the
first group; targets for ``fused[cpu]`` there (and at D=16, D=512, L=1, L=512): at
least as fast as ``torch-embedding-bag`` and within 2x of the floor (the bytes model
over the copy baseline's bandwidth).
"""
import numpy as np
import pytest

from fused_embedding import providers as P
from fused_embedding.bytes_model import copy_bytes
from fused_embedding.reference import embedding_mean_reference
from fused_embedding.semantics import Axis
from fused_embedding.validation import compare, tolerance

# (B, L, D, V, table dtype, axis), ordered by table so each table is made once.
# The headline shape, its float16/bfloat16 and axis-2 twins, B=1, and the other
# shapes the CPU targets name (L=1, L=512, D=16, D=512).
CASES = [
    (1024, 64, 128, 1_000_000, "fp32", 1),
    (1024, 64, 128, 1_000_000, "fp32", 2),
    (1, 16, 128, 1_000_000, "fp32", 1),
    (32768, 1, 128, 1_000_000, "fp32", 1),
    (128, 512, 128, 1_000_000, "fp32", 1),
    (1024, 64, 128, 1_000_000, "fp16", 1),
    (1024, 64, 128, 1_000_000, "bf16", 1),
    (8192, 64, 16, 1_000_000, "fp32", 1),
    (512, 32, 512, 250_000, "fp32", 1),
]
ROUNDS = 20
CPU_PROVIDERS = [p for p in P.providers_for("cpu")]


def case_id(case):
    batch, length, dim, vocab, dtype, axis = case
    return f"B{batch}-L{length}-D{dim}-V{vocab}-{dtype}-axis{axis}"


@pytest.mark.parametrize("provider", CPU_PROVIDERS, ids=lambda p: p.name)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_provider(benchmark, tables, rng, case, provider):
    batch, length, dim, vocab, dtype_key, axis = case
    axis = Axis(axis)
    dtype = P.DTYPE_NAMES[dtype_key]
    reason = provider.unavailable_reason() or provider.supports(axis, dtype)
    if reason:
        pytest.skip(f"{provider.name}: {reason}")
    table, cache = tables(vocab, dim, dtype)
    n_sets = P.id_set_count(batch, length, dim, dtype)
    inputs = P.Inputs(table, P.random_id_sets(rng, vocab, batch, length, n_sets), axis, cache)
    run = provider.prepare(inputs)

    # Correct on this very shape before it is timed.
    expected = embedding_mean_reference(table, inputs.id_sets[0], axis)
    report = compare(P.to_numpy(run(0), dtype), expected,
                     **tolerance(dtype, "reference" if provider.exact else "keras"))
    assert report is None, f"{provider.name} disagrees with the reference:\n{report}"

    calls = iter(range(1, 10**9))

    def next_id_set():
        return (next(calls) % n_sets,), {}

    benchmark.group = case_id(case)
    benchmark.pedantic(run, setup=next_id_set, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    nbytes = P.case_bytes(inputs)
    benchmark.extra_info.update(bytes=nbytes, id_sets=n_sets,
                                gb_per_s=P.gb_per_s(nbytes, benchmark.stats.stats.median))


def test_copy_baseline(benchmark):
    """The memory bandwidth the GB/s above are compared with: a 256 MiB np.copyto."""
    src = np.ones(P.COPY_BYTES // 4, dtype=np.float32)
    dst = np.empty_like(src)
    benchmark.group = "copy baseline"
    benchmark.pedantic(np.copyto, args=(dst, src), rounds=10, warmup_rounds=2, iterations=1)
    nbytes = copy_bytes(P.COPY_BYTES)
    benchmark.extra_info.update(bytes=nbytes, gb_per_s=P.gb_per_s(nbytes, benchmark.stats.stats.median))


def test_read_baseline(benchmark):
    """A read-only stream of 256 MiB on every thread: the bandwidth reads alone reach (GB/s = bytes / time)."""
    run, nbytes = P.read_baseline(P.COPY_BYTES)
    benchmark.group = "read baseline"
    benchmark.pedantic(run, rounds=10, warmup_rounds=2, iterations=1)
    benchmark.extra_info.update(bytes=nbytes, gb_per_s=P.gb_per_s(nbytes, benchmark.stats.stats.median))
