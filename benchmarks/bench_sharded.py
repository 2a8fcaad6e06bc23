"""A table sharded over 2 parameter servers: the fused op vs tf.nn.embedding_lookup + reduce_mean.

    python benchmarks/bench_sharded.py [--rounds 15] [--vocab 4000000] [--batch 4096]
                                       [--length 64] [--dim 128] [--id-sets 4]

An in-process cluster on localhost (tests/local_cluster.py: 2 parameter servers and 1
worker, gRPC on 127.0.0.1; this process the coordinator of a ParameterServerStrategy
with FixedShardsPartitioner(2)), so the table is one ShardedVariable of V x D float32
(V=4,000,000, D=128: 2 GB, 1 GB a server), each shard initialised on its own server
(a partition-aware initializer: nothing of it is made on the coordinator).

Timed end to end, per call: ``ClusterCoordinator.schedule(fn, ids).fetch()`` of a
tf.function on the worker, for
  * fused    ``fused_embedding.tf.embedding_mean(table, ids, axis=1)``: each shard
             pools its ids' rows on its server, [B][D] partial sums cross;
  * fused-tf-ops  the same routing with TF's gather + segment sum on each shard
             instead of the compiled kernel (what runs where it can't be built);
  * unfused  ``tf.reduce_mean(tf.nn.embedding_lookup(table, ids), axis=1)``: each
             shard gathers its rows, all [B*L][D] of them cross, the worker pools.
Interleaved call by call (fused, unfused, fused, ...), each call on the next of
``--id-sets`` fresh (B, L) int32 id sets (uniform over V), after two warm-up calls of
each; medians (and minima) of ``--rounds``.

Beside the times, the bytes sent from the parameter servers per call, from the shapes
of the tensors that cross: fused ``S * (B*D*4 + B*4)`` (each shard's [B][D] float32
partial and, as the op is usually described, [B] counts; this implementation computes
the counts on the worker from the ids, so only the B*D*4 cross), unfused ``B*L*D*4``
(the gathered rows, all shards together). What goes to the servers is the same order
for both: the ids each shard holds (fused: local ids and B + 1 row splits).

All of it runs in one process on this machine's cores (servers, worker, coordinator):
loopback gRPC, no network card. Prints the machine, the date and the load average.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")


def _load() -> str:
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except (OSError, AttributeError):
        return "unknown"


def _megabytes(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--vocab", type=int, default=4_000_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--id-sets", type=int, default=4)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    shards, (vocab, batch, length, dim) = 2, (args.vocab, args.batch, args.length, args.dim)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")

    sys.path.insert(0, TESTS)
    import local_cluster
    import tensorflow as tf
    strategy, coordinator, _ = local_cluster.start(
        num_ps=shards, num_workers=1,
        partitioner=tf.distribute.experimental.partitioners.FixedShardsPartitioner(shards))
    import fused_embedding
    import fused_embedding.tf as fused_tf
    from fused_embedding import tf_compiled, tf_sharded
    from fused_embedding.cli import cpu_model

    def shard_rows_init(partition_shape=None, partition_offset=None):
        """A shard's rows, made on its own server (the strategy asks per partition), seeded
        by its first row."""
        first = partition_offset[0] if partition_offset else 0
        return tf.random.stateless_uniform(partition_shape or (vocab, dim), seed=[seed % 2**31, first],
                                           minval=-1.0, maxval=1.0)

    load_before = _load()
    started = time.perf_counter()
    with strategy.scope():
        table = tf.Variable(shard_rows_init, shape=(vocab, dim), dtype=tf.float32, name="table")
    made_s = time.perf_counter() - started
    shard_rows = [int(s.shape[0]) for s in table.variables]

    spec = tf.TensorSpec([batch, length], tf.int32)
    fused = tf.function(lambda ids: fused_tf.embedding_mean(table, ids, axis=1))
    fused.get_concrete_function(spec)
    # The same routing with TF's gather + segment sum on each shard (what the op runs where
    # the compiled kernel can't be built): traced once with the kernel switched off.
    fused_tf_ops = tf.function(lambda ids: fused_tf.embedding_mean(table, ids, axis=1))
    with mock.patch.object(tf_sharded, "_uses_compiled_kernel", lambda: False):
        fused_tf_ops.get_concrete_function(spec)
    unfused = tf.function(lambda ids: tf.reduce_mean(tf.nn.embedding_lookup(table, ids), axis=1))
    providers = {"fused": fused, "fused-tf-ops": fused_tf_ops, "unfused": unfused}
    if tf_compiled.op_module() is None:
        del providers["fused-tf-ops"]  # the same graph as "fused" there
    rng = np.random.default_rng(seed)
    id_sets = [tf.constant(rng.integers(0, vocab, (batch, length), dtype=np.int32))
               for _ in range(args.id_sets)]

    def call(fn, ids):
        return coordinator.schedule(fn, args=(ids,)).fetch()

    theirs = call(unfused, id_sets[0])
    max_diff = max(float(np.abs(call(fn, id_sets[0]) - theirs).max()) for fn in providers.values())
    for fn in providers.values():  # warm-up: traces, first transfers
        call(fn, id_sets[1 % len(id_sets)])
    times = {name: [] for name in providers}
    for r in range(args.rounds):
        for name, fn in providers.items():
            ids = id_sets[(len(providers) * r + list(providers).index(name)) % len(id_sets)]
            t0 = time.perf_counter()
            call(fn, ids)
            times[name].append(time.perf_counter() - t0)
    load_after = _load()

    from_servers = {"fused": shards * (batch * dim * 4 + batch * 4), "unfused": batch * length * dim * 4}
    from_servers["fused-tf-ops"] = from_servers["fused"]
    partials_only = shards * batch * dim * 4
    print(f"fused-embedding {fused_embedding.__version__} bench_sharded on {cpu_model()} "
          f"({os.cpu_count()} cores), {platform.python_implementation()} {platform.python_version()}, "
          f"TensorFlow {tf.__version__}")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; load average (1, 5, 15 min): "
          f"before {load_before}, after {load_after}; seed {seed}")
    print(f"cluster: in-process on localhost (gRPC on 127.0.0.1), {shards} parameter servers, 1 worker, "
          f"this process the coordinator; shards' kernel: "
          f"{'compiled FusedEmbeddingBag' if tf_compiled.op_module() is not None else 'TF gather + segment sum'}")
    print(f"table: ShardedVariable V={vocab:,} D={dim} float32 ({vocab * dim * 4 / 2**30:.2f} GiB), shards "
          f"{shard_rows} rows, made on the servers in {made_s:.1f} s")
    print(f"calls: B={batch} L={length}, axis 1, {args.id_sets} rotating uniform int32 id sets, "
          f"interleaved, {args.rounds} rounds after 2 warm-up calls each; "
          f"end to end: schedule on the worker + fetch of the (B, D) result")
    print(f"check: max |fused - unfused| = {max_diff:.2e}")
    print()
    print("| provider | median ms | min ms | bytes from the parameter servers per call |")
    print("| --- | ---: | ---: | --- |")
    fused_bytes = (f"S*(B*D*4 + B*4) = {_megabytes(from_servers['fused'])} "
                   f"(partials alone, counts made on the worker: {_megabytes(partials_only)})")
    formulas = {"fused": fused_bytes, "fused-tf-ops": fused_bytes,
                "unfused": f"B*L*D*4 = {_megabytes(from_servers['unfused'])}"}
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"| {name} | {medians[name] * 1e3:,.1f} | {min(t) * 1e3:,.1f} | {formulas[name]} |")
    print()
    for name in providers:
        if name != "unfused":
            print(f"speed-up of {name} (median unfused / median {name}): "
                  f"{medians['unfused'] / medians[name]:.2f}x")
    print(f"bytes from the servers: {from_servers['unfused'] / from_servers['fused']:.1f}x fewer "
          f"(L/S = {length / shards:g}: each of the S shards sends one [B][D] partial)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
