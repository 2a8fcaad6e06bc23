"""Exports the SavedModels tests/test_convert.py converts, with stock Keras and TF only.

Run in a fresh process (``python tests/convert_models.py OUT_DIR``): fused_embedding must not
be imported here, so the models are what anyone's Keras or TF writes. Each model goes to
OUT_DIR/<name>/, and OUT_DIR/<name>.npz holds the arrays its float64 reference needs.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

SEED = int(sys.argv[2]) if len(sys.argv) > 2 else 0


def _table(rng, vocab, dim, dtype=np.float32):
    return rng.standard_normal((vocab, dim), dtype=np.float32).astype(dtype)


def text_classifier(out, rng):
    """Embedding(mask_zero=True) -> GlobalAveragePooling1D -> Dense, exported by Keras."""
    import keras
    vocab, dim, classes = 500, 16, 4
    ids = keras.Input(shape=(None,), dtype="int32", name="ids")
    x = keras.layers.Embedding(vocab, dim, mask_zero=True, name="embedding")(ids)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    logits = keras.layers.Dense(classes, name="logits")(x)
    model = keras.Model(ids, logits)
    table, kernel, bias = _table(rng, vocab, dim), _table(rng, dim, classes), _table(rng, 1, classes)[0]
    model.get_layer("embedding").set_weights([table])
    model.get_layer("logits").set_weights([kernel, bias])
    model.export(os.path.join(out, "text_classifier"), verbose=False)
    np.savez(os.path.join(out, "text_classifier.npz"), table=table, kernel=kernel, bias=bias)


def two_branch(out, rng):
    """Two embeddings, one pooled over the sequence (channels_last), one over the features
    (channels_first, fixed L), concatenated into a Dense."""
    import keras
    words, positions, length = 300, 200, 12
    a = keras.Input(shape=(None,), dtype="int32", name="words")
    b = keras.Input(shape=(length,), dtype="int64", name="tags")
    xa = keras.layers.GlobalAveragePooling1D(name="pool_words")(keras.layers.Embedding(words, 8, name="emb_words")(a))
    xb = keras.layers.GlobalAveragePooling1D(data_format="channels_first", name="pool_tags")(
        keras.layers.Embedding(positions, 6, name="emb_tags")(b))
    y = keras.layers.Dense(2, name="head")(keras.layers.Concatenate()([xa, xb]))
    model = keras.Model([a, b], y)
    arrays = dict(words=_table(rng, words, 8), tags=_table(rng, positions, 6),
                  kernel=_table(rng, 8 + length, 2), bias=_table(rng, 1, 2)[0])
    model.get_layer("emb_words").set_weights([arrays["words"]])
    model.get_layer("emb_tags").set_weights([arrays["tags"]])
    model.get_layer("head").set_weights([arrays["kernel"], arrays["bias"]])
    model.export(os.path.join(out, "two_branch"), verbose=False)
    np.savez(os.path.join(out, "two_branch.npz"), **arrays)


def gather_mean(out, rng):
    """tf.Module: raw tf.gather + tf.reduce_mean; a float16 variable table (axis 1, int32 ids;
    axis 2, int64 ids; a hand-written masked mean, divide_no_nan) and a bfloat16 constant one."""
    half = _table(rng, 400, 8, np.float16)
    brain = _table(rng, 250, 4, np.float32)
    brain_bf16 = tf.constant(brain, tf.bfloat16)

    class GatherMean(tf.Module):
        def __init__(self):
            super().__init__()
            self.table = tf.Variable(half, name="table")

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="ids")])
        def sequence(self, ids):
            return {"pooled": tf.reduce_mean(tf.gather(self.table, ids), axis=1)}

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int64, name="ids")])
        def features(self, ids):
            return {"pooled": tf.reduce_mean(tf.gather(self.table, ids), axis=-1)}

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int64, name="ids")])
        def masked(self, ids):
            rows = tf.gather(self.table, ids)                                     # [B][L][D]
            mask = tf.cast(tf.not_equal(ids, 0), rows.dtype)[..., None]           # [B][L][1]
            return {"pooled": tf.math.divide_no_nan(tf.reduce_sum(rows * mask, 1), tf.reduce_sum(mask, 1))}

        @tf.function(input_signature=[tf.TensorSpec([None, 5], tf.int32, name="ids")])
        def constant(self, ids):
            pooled = tf.reduce_mean(tf.gather(brain_bf16, ids), axis=[1])
            return {"pooled": tf.cast(pooled, tf.float32) * 2.0}

    module = GatherMean()
    tf.saved_model.save(module, os.path.join(out, "gather_mean"), signatures={
        "serving_default": module.sequence, "features": module.features, "masked": module.masked,
        "constant": module.constant})
    np.savez(os.path.join(out, "gather_mean.npz"), half=half,
             brain=brain_bf16.numpy().astype(np.float32))


def sparse_lookup(out, rng):
    """tf.Module: tf.nn.embedding_lookup_sparse with the mean, sum and sqrtn combiners."""
    table = _table(rng, 300, 8)

    class Sparse(tf.Module):
        def __init__(self):
            super().__init__()
            self.table = tf.Variable(table, name="table")

        def lookup(self, indices, values, dense_shape, combiner):
            ids = tf.SparseTensor(indices, values, dense_shape)
            return {"pooled": tf.nn.embedding_lookup_sparse(self.table, ids, None, combiner=combiner)}

    spec = [tf.TensorSpec([None, 2], tf.int64, name="indices"), tf.TensorSpec([None], tf.int64, name="values"),
            tf.TensorSpec([2], tf.int64, name="dense_shape")]
    module = Sparse()
    signatures = {}
    for combiner in ("mean", "sum", "sqrtn"):
        fn = tf.function(lambda i, v, s, c=combiner: module.lookup(i, v, s, c), input_signature=spec)
        signatures["serving_default" if combiner == "mean" else combiner] = fn
    tf.saved_model.save(module, os.path.join(out, "sparse_lookup"), signatures=signatures)
    np.savez(os.path.join(out, "sparse_lookup.npz"), table=table)


def nothing_to_fuse(out, rng):
    """A Dense-only Keras model: no gather at all."""
    import keras
    x = keras.Input(shape=(6,), name="x")
    model = keras.Model(x, keras.layers.Dense(3)(x))
    model.export(os.path.join(out, "nothing_to_fuse"), verbose=False)


def left_alone(out, rng):
    """Gather-then-mean shapes that must not be fused: a mean over the batch axis, a gather with
    batch_dims=1, a gather whose rows also feed another output, a mask whose padding id is 1."""
    table = _table(rng, 100, 4)

    class LeftAlone(tf.Module):
        def __init__(self):
            super().__init__()
            self.table = tf.Variable(table, name="table")

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="ids")])
        def batch_mean(self, ids):
            return {"pooled": tf.reduce_mean(tf.gather(self.table, ids), axis=0)}

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.int32, name="ids")])
        def batch_dims(self, ids):
            per_row = tf.tile(self.table[None, :3], [tf.shape(ids)[0], 1, 1])       # [B][3][4]
            return {"pooled": tf.reduce_mean(tf.gather(per_row, ids % 3, batch_dims=1), axis=1)}

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="ids")])
        def padding_one(self, ids):
            rows = tf.gather(self.table, ids)
            mask = tf.cast(tf.not_equal(ids, 1), rows.dtype)[..., None]
            return {"pooled": tf.reduce_sum(rows * mask, 1) / tf.reduce_sum(mask, 1)}

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="ids")])
        def shared_rows(self, ids):
            rows = tf.gather(self.table, ids)
            return {"pooled": tf.reduce_mean(rows, axis=1), "first": rows[:, 0]}

    module = LeftAlone()
    tf.saved_model.save(module, os.path.join(out, "left_alone"), signatures={
        "serving_default": module.batch_mean, "batch_dims": module.batch_dims,
        "shared_rows": module.shared_rows, "padding_one": module.padding_one})
    np.savez(os.path.join(out, "left_alone.npz"), table=table)


MODELS = [text_classifier, two_branch, gather_mean, sparse_lookup, nothing_to_fuse, left_alone]

if __name__ == "__main__":
    target = sys.argv[1]
    os.makedirs(target, exist_ok=True)
    rng = np.random.default_rng(SEED)
    for export in MODELS:
        export(target, rng)
    assert "fused_embedding" not in sys.modules, "the test models must be exported without fused_embedding"
    print("exported", ", ".join(m.__name__ for m in MODELS))
