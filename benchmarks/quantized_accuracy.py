"""How far a quantized table's pooled output is from the float32 table's, per format.

    python benchmarks/quantized_accuracy.py [--seed 0]

Two tables, each pooled (mean over L, axis 1) by the package's cpu kernels from its
float32 form and from each quantized form: "int8" and "int4"
(``fused_embedding.quantize_table``, row-wise asymmetric) and "keras_int8" (Keras' own
``Embedding.quantize("int8")``, read with ``QuantizedTable.from_keras_int8``):

1. random normal rows: V=100,000, D=128, N(0, 1), B=1024 bags of L=64 uniform ids;
2. a trained embedding: the text classifier of the tests (ids -> Embedding(mask_zero=True)
   -> GlobalAveragePooling1D -> Dense), V=5,000 D=64 L=32, trained for 3 epochs on a
   synthetic task (the label says whether a sequence has more ids from the first half of
   the vocabulary than from the second), then evaluated on 2,048 held-out sequences:
   the pooled error, and how many of the classifier's decisions change.

Errors are against the float32 table's pooled output computed in float64 (the
quantization's error, not the kernel's summation): relative RMS = ||q - f|| / ||f|| over
all outputs, the largest absolute error, and the smallest cosine similarity of a bag's
pooled vector to the float32 one.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform

import numpy as np

import fused_embedding as fe
from fused_embedding.reference import embedding_mean_reference

FORMATS = ("int8", "int4", "keras_int8")


def keras_int8(table: np.ndarray) -> fe.QuantizedTable:
    """Keras' own int8 quantization of ``table`` (Embedding.quantize), read as Keras keeps it."""
    import keras
    layer = keras.layers.Embedding(*table.shape)
    layer.build((None,))
    layer.embeddings.assign(table)
    layer.quantize("int8")
    return fe.QuantizedTable.from_keras_int8(layer._embeddings.numpy(), layer.embeddings_scale.numpy())


def quantized_forms(table: np.ndarray) -> dict:
    return {"int8": fe.quantize_table(table, "int8"), "int4": fe.quantize_table(table, "int4"),
            "keras_int8": keras_int8(table)}


def pooled_errors(table, forms, ids, mask_zero) -> dict:
    """{format: (relative RMS, max abs, min cosine)} of the pooled output against float32's."""
    exact = embedding_mean_reference(table, ids, 1, mask_zero)                 # [B][D] float64
    rows = {}
    for name, qtable in forms.items():
        pooled = fe.embedding_mean(qtable, ids, mask_zero=mask_zero, backend="cpu").astype(np.float64)
        error = pooled - exact
        norms = np.linalg.norm(pooled, axis=1) * np.linalg.norm(exact, axis=1)
        kept = norms > 0  # an all-padding bag pools to zeros in both
        cosine = np.sum(pooled * exact, axis=1)[kept] / norms[kept]
        rows[name] = (np.linalg.norm(error) / np.linalg.norm(exact), np.abs(error).max(), cosine.min())
    return rows


def print_rows(title, rows, extra=None):
    print(f"\n{title}")
    header = "| format | relative RMS error | max abs error | min cosine |" + (" decisions changed |" if extra else "")
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for name, (rms, worst, cosine) in rows.items():
        line = f"| {name} | {rms:.2e} | {worst:.2e} | {cosine:.6f} |"
        print(line + (f" {extra[name]} |" if extra else ""))


def random_rows(rng):
    table = rng.standard_normal((100_000, 128), dtype=np.float32)
    ids = rng.integers(0, table.shape[0], (1024, 64)).astype(np.int32)
    return pooled_errors(table, quantized_forms(table), ids, mask_zero=False)


def synthetic_task(rng, vocab, length, n):
    """Sequences of ids in [1, V) with some padding (0) at the end; label 1 when more of the
    ids are in the first half of the vocabulary."""
    ids = rng.integers(1, vocab, (n, length)).astype(np.int32)
    lengths = rng.integers(length // 4, length + 1, n)
    ids[np.arange(length)[None, :] >= lengths[:, None]] = 0
    first_half = np.sum((ids > 0) & (ids < vocab // 2), axis=1)
    second_half = np.sum(ids >= vocab // 2, axis=1)
    return ids, (first_half > second_half).astype(np.float32)


def trained_classifier(rng):
    import keras
    vocab, dim, length = 5_000, 64, 32
    keras.utils.set_random_seed(int(rng.integers(2**31)))
    ids_in = keras.Input((length,), dtype="int32")
    embedded = keras.layers.Embedding(vocab, dim, mask_zero=True, name="embedding")(ids_in)
    pooled = keras.layers.GlobalAveragePooling1D()(embedded)
    model = keras.Model(ids_in, keras.layers.Dense(1, name="classifier")(pooled))
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True), metrics=["accuracy"])
    train_ids, train_labels = synthetic_task(rng, vocab, length, 20_000)
    test_ids, test_labels = synthetic_task(rng, vocab, length, 2_048)
    model.fit(train_ids, train_labels, batch_size=256, epochs=3, verbose=0)
    accuracy = model.evaluate(test_ids, test_labels, verbose=0)[1]
    table = model.get_layer("embedding").embeddings.numpy()
    kernel, bias = (w.numpy().astype(np.float64) for w in model.get_layer("classifier").weights)
    forms = quantized_forms(table)
    rows = pooled_errors(table, forms, test_ids, mask_zero=True)
    decisions = embedding_mean_reference(table, test_ids, 1, True) @ kernel + bias > 0
    changed = {}
    for name, qtable in forms.items():
        logits = fe.embedding_mean(qtable, test_ids, mask_zero=True, backend="cpu").astype(np.float64) @ kernel + bias
        flips = int(np.sum((logits > 0) != decisions))
        changed[name] = f"{flips} of {len(test_ids)}"
    return rows, changed, accuracy


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    load = os.getloadavg()
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
          f"{os.cpu_count()} cores, load {load[0]:.1f}; seed {args.seed}")
    print_rows("Random normal rows: V=100,000 D=128, N(0, 1); B=1024 L=64 uniform ids, no padding",
               random_rows(rng))
    rows, changed, accuracy = trained_classifier(rng)
    print_rows(f"Trained text classifier: V=5,000 D=64 L=32, mask_zero; 2,048 held-out sequences "
               f"(float32 model's accuracy {accuracy:.3f})", rows, changed)


if __name__ == "__main__":
    main()
