"""Keras' int8-quantized text classifier, fused and not: ``model.predict`` timed in one run.

    python benchmarks/bench_keras_quantized.py [--rounds 30] [--vocab 1000000]

The model: ``Embedding(V, D, mask_zero=True) -> GlobalAveragePooling1D -> Dense(4)``,
quantized by Keras (``model.quantize("int8")``: an int8 table, a float32 scale per row),
and ``fuse`` of it, whose pair is a ``QuantizedEmbeddingMean`` reading the same two
variables. Both timed at B=1024 L=64 D=128 on one batch, through
``predict`` (which sets up a tf.data pipeline each call) and ``predict_on_batch``:
one call of each per round, in a fresh random order, each round on the next of several
id sets (10% padding, one real id per bag) so no call finds the previous one's rows in
cache. Outputs are checked equal (float32 rounding) before timing. Prints medians (p20/p80)
and the ratio, with the machine, date and load, as a markdown block for RESULTS.md.

Bytes per call (the pooling's): ids B*L*4 + rows B*L*(D + 4) (int8 data, float32 scale)
+ out B*D*4.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import warnings

import numpy as np

from interleaved import add_shape_arguments, print_medians, time_interleaved  # benchmarks/interleaved.py


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from fused_embedding.cli import cpu_model
    from fused_embedding.keras import fuse

    rng = np.random.default_rng(0)
    ids_in = keras.Input((None,), dtype="int32", name="ids")
    embedding = keras.layers.Embedding(args.vocab, args.dim, mask_zero=True, name="embedding")
    pooling = keras.layers.GlobalAveragePooling1D(name="pool")
    dense = keras.layers.Dense(4, name="logits")
    stock = keras.Model(ids_in, dense(pooling(embedding(ids_in))))
    embedding.embeddings.assign(rng.standard_normal((args.vocab, args.dim), dtype=np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "InputLayer does not have a `quantize` method"
        stock.quantize("int8")
    fused = fuse(stock)  # the pair becomes a QuantizedEmbeddingMean on the same variables
    assert type(fused.get_layer("embedding")).__name__ == "QuantizedEmbeddingMean"
    # predict() on one batch (its tf.data set-up, ~70 ms here, in both) and predict_on_batch
    runners = {}
    for label, model in (("keras int8", stock), ("fused int8", fused)):
        runners[f"{label} predict"] = lambda ids, m=model: m.predict(ids, batch_size=len(ids), verbose=0)
        runners[f"{label} predict_on_batch"] = lambda ids, m=model: m.predict_on_batch(ids)

    id_sets = []
    for _ in range(args.id_sets):
        ids = rng.integers(1, args.vocab, (args.batch, args.length))
        ids[:, 1:][rng.random((args.batch, args.length - 1)) < 0.1] = 0
        id_sets.append(ids.astype(np.int32))
    expected = stock.predict(id_sets[0], batch_size=args.batch, verbose=0)  # first calls (tracing) untimed
    got = fused.predict(id_sets[0], batch_size=args.batch, verbose=0)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    load_before = os.getloadavg()
    times = time_interleaved(runners, id_sets, args.rounds, rng)
    load = os.getloadavg()

    bytes_per_call = args.batch * args.length * (4 + args.dim + 4) + args.batch * args.dim * 4
    print(f"\n### Keras int8 text classifier, predict, B={args.batch} L={args.length} D={args.dim} "
          f"V={args.vocab:,}, mask_zero\n")
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_model()}, {os.cpu_count()} "
          f"cores, load before {load_before[0]:.2f}, after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"{args.rounds} interleaved rounds, {args.id_sets} rotating id sets\n")
    medians = print_medians(times, bytes_per_call, "model", "call")
    for call in ("predict", "predict_on_batch"):
        ratio = medians[f"keras int8 {call}"] / medians[f"fused int8 {call}"]
        print(f"fused / keras int8 {call} speedup (medians): {ratio:.2f}x (goal >= 5x)  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
