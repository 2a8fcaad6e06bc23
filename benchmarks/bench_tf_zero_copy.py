"""The TF op never copies the table: a 2 GB table through tf.function vs the core op vs a per-call copy.

    python benchmarks/bench_tf_zero_copy.py [--rounds 20] [--vocab 8000000]

Shape: V=8,000,000, D=64 (a 2 GB float32 table), B=256, L=32, axis 1. Rows timed
(medians of ``--rounds``, each call on the next of several fresh id sets):
  * core op      ``fused_embedding.embedding_mean`` on NumPy views of the same TF buffers;
  * tf op        ``fused_embedding.tf.embedding_mean`` inside tf.function (on the
                 host its compiled kernel on TF's buffers, into TF's output);
  * copy per call  a py_function calling the core op with ``tensor.numpy()`` of the
                 table: the copy the op avoids.
Also the two conversions alone. Prints a markdown block (machine, date, numbers)
for RESULTS.md. Memory: the 2 GB table once, plus 2 GB transiently for the copy rows.

    python benchmarks/bench_tf_zero_copy.py --fixed-cost [--batch 1 --length 16 --dim 64]

instead times what the op costs beyond its kernel at a small batch (V=1,000,000):
the core op, an empty tf.numpy_function and an empty tf.py_function (same inputs, a
constant output), a tf.function of one cheap native op (TF's own cost of a call), the
op in tf.function, the op with its numpy_function body (as where its compiled kernel
can't be built) and the unfused TF path, interleaved call by call (medians of 300).

    python benchmarks/bench_tf_zero_copy.py --crossover [--length 16 --dim 64 --rounds 40]

times the core op, the op in tf.function and the unfused TF path over a sweep of B
(16 to 8192, V=1,000,000), each path in its own block of ``--rounds`` calls on rotated
id sets, and reports the B from which the op beats the unfused path.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from unittest import mock

import numpy as np


def median_ms(fn, rounds: int) -> float:
    fn(0)  # warm-up: compilation, tracing
    times = []
    for k in range(rounds):
        start = time.perf_counter()
        fn(k + 1)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def machine_line(tf) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, TF {tf.__version__}, {date}"


def fixed_cost(args) -> str:
    """Interleaved medians at a small batch: what TF's Python-function round trip adds to the kernel."""
    import tensorflow as tf

    import fused_embedding as fe
    import fused_embedding.tf as fe_tf
    vocab, dim, batch, length = 1_000_000, args.dim, args.batch, args.length
    table = tf.random.uniform((vocab, dim), dtype=tf.float32)      # [V][D]
    table_view = np.asarray(table)
    rng = np.random.default_rng()
    id_sets = [rng.integers(0, vocab, (batch, length), dtype=np.int32) for _ in range(16)]  # [B][L] each
    id_tensors = [tf.constant(ids) for ids in id_sets]
    constant_out = np.zeros((batch, dim), np.float32)
    empty_numpy_function = tf.function(
        lambda t, ids: tf.numpy_function(lambda a, b: constant_out, [t, ids], tf.float32))
    empty_py_function = tf.function(
        lambda t, ids: tf.py_function(lambda a, b: constant_out, [t, ids], tf.float32))
    empty_graph = tf.function(lambda t, ids: ids[:1, :1])  # one cheap native op: TF's own call cost
    fused_op = tf.function(lambda t, ids: fe_tf.embedding_mean(t, ids))
    # The op as it is where its compiled kernel can't be built: traced with that kernel ruled out.
    numpy_function_op = tf.function(lambda t, ids: fe_tf.embedding_mean(t, ids))
    with mock.patch.object(fe_tf, "_uses_compiled_kernel", lambda *args: False):
        numpy_function_op.get_concrete_function(table, id_tensors[0])
    unfused = tf.function(lambda t, ids: tf.reduce_mean(tf.gather(t, ids), axis=1))  # writes [B][L][D]
    paths = {
        "core op": lambda k: fe.embedding_mean(table_view, id_sets[k]),
        "empty tf.numpy_function": lambda k: empty_numpy_function(table, id_tensors[k]),
        "empty tf.py_function": lambda k: empty_py_function(table, id_tensors[k]),
        "empty tf.function (one native op)": lambda k: empty_graph(table, id_tensors[k]),
        "tf op in tf.function": lambda k: fused_op(table, id_tensors[k]),
        "tf op, numpy_function body": lambda k: numpy_function_op(table, id_tensors[k]),
        "unfused TF (gather + reduce_mean)": lambda k: unfused(table, id_tensors[k]),
    }
    for run in paths.values():
        run(0)
    times = {name: [] for name in paths}
    for k in range(300):  # interleaved: load from elsewhere falls on every path alike
        for name, run in paths.items():
            start = time.perf_counter()
            run(k % len(id_sets))
            times[name].append(time.perf_counter() - start)
    lines = [f"### TF op: fixed cost at B={batch}, L={length}, D={dim}", "",
             f"{machine_line(tf)}; V={vocab:,}, float32, axis 1; interleaved, medians of 300.", "",
             "| path | ms |", "| --- | --- |"]
    lines += [f"| {name} | {statistics.median(t) * 1e3:.3f} |" for name, t in times.items()]
    block = "\n".join(lines)
    print(block)
    return block


CROSSOVER_BATCHES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def crossover_sentence(wins) -> str:
    """Where the op wins, from [(B, op faster), ...] in increasing B: from which B on it
    always wins, and any smaller B where it also won (medians of a noisy machine)."""
    losses = [batch for batch, won in wins if not won]
    always = [batch for batch, won in wins if won and (not losses or batch > losses[-1])]
    if not always:
        return f"The op does not beat the unfused path at B={wins[-1][0]}, the largest tried."
    earlier = [batch for batch, won in wins if won and batch < always[0]]
    also = (f" (it also won at B={', '.join(map(str, earlier))}, and lost between)"
            if earlier else "")
    return f"The op beats the unfused path at every B from {always[0]} on{also}."


def crossover(args) -> str:
    """Block-timed medians over B: where the op (its round trip's fixed cost included) starts to win."""
    import tensorflow as tf

    import fused_embedding as fe
    import fused_embedding.tf as fe_tf
    from fused_embedding import providers
    vocab, dim, length = 1_000_000, args.dim, args.length
    table = tf.constant(providers.random_table(np.random.default_rng(), vocab, dim, np.float32))  # [V][D]
    table_view = np.asarray(table)
    rng = np.random.default_rng()
    fused_op = tf.function(lambda t, ids: fe_tf.embedding_mean(t, ids))
    unfused = tf.function(lambda t, ids: tf.reduce_mean(tf.gather(t, ids), axis=1))  # writes [B][L][D]
    lines = [f"### TF op against the unfused path over B (L={length}, D={dim})", "",
             f"{machine_line(tf)}; V={vocab:,}, float32, axis 1; each path in its own block, "
             f"medians of {args.rounds}.", "",
             "| B | core op ms | tf op ms | unfused TF ms | unfused / tf op |", "| --- | --- | --- | --- | --- |"]
    wins = []  # (B, op faster than the unfused path)
    for batch in CROSSOVER_BATCHES:
        n_sets = providers.id_set_count(batch, length, dim, np.float32)
        id_sets = [rng.integers(0, vocab, (batch, length), dtype=np.int32) for _ in range(n_sets)]  # [B][L]
        id_tensors = [tf.constant(ids) for ids in id_sets]
        core = median_ms(lambda k: fe.embedding_mean(table_view, id_sets[k % n_sets]), args.rounds)
        op = median_ms(lambda k: fused_op(table, id_tensors[k % n_sets]), args.rounds)
        base = median_ms(lambda k: unfused(table, id_tensors[k % n_sets]), args.rounds)
        wins.append((batch, op < base))
        lines.append(f"| {batch} | {core:.3f} | {op:.3f} | {base:.3f} | {base / op:.2f}x |")
    lines += ["", crossover_sentence(wins)]
    block = "\n".join(lines)
    print(block)
    return block


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=8_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--copy-rounds", type=int, default=5, help="rounds for the 2 GB copy rows")
    parser.add_argument("--fixed-cost", action="store_true",
                        help="time the op's cost beyond the kernel at a small batch instead "
                             "(defaults there: B=1, L=16, D=64)")
    parser.add_argument("--crossover", action="store_true",
                        help="time the op against the unfused path over B instead (defaults there: "
                             "L=16, D=64, 40 rounds)")
    args = parser.parse_args(argv)
    if args.crossover:
        for name, value in (("length", 16), ("rounds", 40)):
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
        return crossover(args)
    if args.fixed_cost:
        for name, small in (("batch", 1), ("length", 16), ("dim", 64)):
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, small)
        return fixed_cost(args)

    import tensorflow as tf

    import fused_embedding as fe
    import fused_embedding.tf as fe_tf
    from fused_embedding import bytes_model
    from fused_embedding.reference import embedding_mean_reference
    from fused_embedding.validation import assert_close

    vocab, dim, batch, length = args.vocab, args.dim, args.batch, args.length
    table = tf.random.uniform((vocab, dim), dtype=tf.float32)    # [V][D], made by TF, held once
    table_view = np.asarray(table)                                # the same buffer, no copy
    rng = np.random.default_rng()
    n_sets = max(args.rounds, args.copy_rounds) + 1
    id_sets = [rng.integers(0, vocab, (batch, length), dtype=np.int32) for _ in range(n_sets)]  # [B][L] each
    id_tensors = [tf.constant(ids) for ids in id_sets]

    fused_op = tf.function(lambda t, ids: fe_tf.embedding_mean(t, ids))

    def copying_body(t, ids):
        return fe.embedding_mean(t.numpy(), np.asarray(ids))  # the trap: .numpy() copies all 2 GB

    copying_op = tf.function(lambda t, ids: tf.py_function(copying_body, [t, ids], tf.float32))

    # Correct before timed (a few bags against the float64 reference).
    got = np.asarray(fused_op(table, id_tensors[0]))
    assert_close(got[:8], embedding_mean_reference(table_view, id_sets[0][:8]), np.float32)

    rows = [
        ("core op on np.asarray views", median_ms(lambda k: fe.embedding_mean(table_view, id_sets[k]), args.rounds)),
        ("tf op in tf.function", median_ms(lambda k: fused_op(table, id_tensors[k]), args.rounds)),
        ("py_function with table.numpy() per call", median_ms(lambda k: copying_op(table, id_tensors[k]),
                                                             args.copy_rounds)),
        ("np.asarray(table) alone", median_ms(lambda k: np.asarray(table), args.rounds)),
        ("table.numpy() alone", median_ms(lambda k: table.numpy(), args.copy_rounds)),
    ]
    core_ms = rows[0][1]
    nbytes = bytes_model.fused_bytes(batch, length, dim, np.float32, np.int32)
    lines = [
        f"### TF op: zero copy on a {vocab * dim * 4 / 1e9:.2f} GB table",
        "",
        f"{machine_line(tf)}; V={vocab:,}, D={dim}, B={batch}, L={length}, float32, axis 1; medians of "
        f"{args.rounds} ({args.copy_rounds} for the copy rows).",
        "",
        "| path | ms | vs core op |",
        "| --- | --- | --- |",
    ]
    for name, ms in rows:
        lines.append(f"| {name} | {ms:.3f} | {ms - core_ms:+.3f} ms |")
    lines += ["", f"Core op: {bytes_model.gb_per_s(nbytes, core_ms / 1e3):.1f} GB/s of the bytes model's "
                  f"{nbytes / 1e6:.1f} MB per call."]
    block = "\n".join(lines)
    print(block)
    return block


if __name__ == "__main__":
    main()
