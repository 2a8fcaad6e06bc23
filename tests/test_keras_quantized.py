"""``QuantizedEmbeddingMean`` (keras_quantized.py) against Keras' own int8-quantized
Embedding -> GlobalAveragePooling1D: outputs, .keras save/load, export, and the way back."""
from __future__ import annotations

import numpy as np
import pytest

import fused_embedding as fe
from fused_embedding.reference import dequantized_rows
from fused_embedding.validation import FLOAT32_UNIT_ROUNDOFF, compare

pytestmark = pytest.mark.slow  # Keras models: a few seconds each on the 2-core machine
keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")
from fused_embedding.keras_quantized import QuantizedEmbeddingMean  # noqa: E402

VOCAB, DIM = 80, 24


def quantized_pair(rng, mask_zero, data_format="channels_last"):
    """(model, embedding, pooling): ids -> Embedding -> GAP1D -> Dense(3), quantized by Keras to int8."""
    # channels_first pools to (B, L): the Dense after it needs L known (random_ids' 9)
    ids = keras.Input((9 if data_format == "channels_first" else None,), dtype="int32", name="ids")
    embedding = keras.layers.Embedding(VOCAB, DIM, mask_zero=mask_zero, name="words")
    pooling = keras.layers.GlobalAveragePooling1D(data_format=data_format, name="pool")
    model = keras.Model(ids, keras.layers.Dense(3, name="logits")(pooling(embedding(ids))))
    embedding.embeddings.assign(rng.standard_normal((VOCAB, DIM)).astype(np.float32))
    with pytest.warns(UserWarning, match="does not have a `quantize` method"):  # the Input and the pooling
        model.quantize("int8")
    return model, embedding, pooling


def random_ids(rng, mask_zero, batch=6, length=9):
    ids = rng.integers(1 if mask_zero else 0, VOCAB, (batch, length)).astype(np.int32)
    if mask_zero:
        ids[:, 1:][rng.random((batch, length - 1)) < 0.3] = 0  # padding; one real id per bag
    return ids


def bound(embedding, ids, mask_zero):
    """Keras' pair and the fused layer each err from the exact mean by at most (L + 4) u of
    the mean |value| (a float32 quotient a value, a float32 sum, a division)."""
    qtable = fe.QuantizedTable.from_keras_int8(np.asarray(embedding._embeddings),
                                               np.asarray(embedding.embeddings_scale))
    size = np.abs(dequantized_rows(qtable, ids)).mean(axis=1)
    return 2 * (ids.shape[1] + 4) * FLOAT32_UNIT_ROUNDOFF * size


def keras_pooled(embedding, pooling, ids):
    rows = embedding(ids)
    return pooling(rows, mask=embedding.compute_mask(ids)).numpy()


@pytest.mark.parametrize("mask_zero", [False, True])
def test_from_layers_gives_keras_means(rng, mask_zero):
    _, embedding, pooling = quantized_pair(rng, mask_zero)
    layer = QuantizedEmbeddingMean.from_layers(embedding, pooling)
    assert layer.name == "words" and layer.embeddings is embedding._embeddings
    assert not layer.trainable_weights and layer.embeddings.dtype == "int8"
    ids = random_ids(rng, mask_zero)
    ours = layer(ids).numpy()
    report = compare(ours, keras_pooled(embedding, pooling, ids), rtol=0.0,
                     atol=bound(embedding, ids, mask_zero)[:, None] * np.ones((1, DIM)))
    assert report is None, report


def test_channels_first_is_each_ids_mean(rng):
    _, embedding, pooling = quantized_pair(rng, False, "channels_first")
    layer = QuantizedEmbeddingMean.from_layers(embedding, pooling)
    ids = random_ids(rng, False)
    ours = layer(ids).numpy()
    assert ours.shape == ids.shape
    theirs = keras_pooled(embedding, pooling, ids)
    size = np.abs(embedding(ids).numpy()).mean(axis=2)
    report = compare(ours, theirs, rtol=0.0, atol=2 * (DIM + 4) * FLOAT32_UNIT_ROUNDOFF * size)
    assert report is None, report


def test_saves_loads_and_exports(rng, tmp_path):
    _, embedding, pooling = quantized_pair(rng, True)
    ids_in = keras.Input((None,), dtype="int32", name="ids")
    model = keras.Model(ids_in, QuantizedEmbeddingMean.from_layers(embedding, pooling)(ids_in))
    ids = random_ids(rng, True)
    expected = model.predict(ids, verbose=0)

    model.save(tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    assert isinstance(reloaded.get_layer("words"), QuantizedEmbeddingMean)
    assert np.array_equal(reloaded.predict(ids, verbose=0), expected)

    model.export(str(tmp_path / "export"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "export")).signatures["serve"]
    graph = served.graph.as_graph_def()
    ops = {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
    assert "PyFunc" not in ops and "EagerPyFunc" not in ops, ops  # the native twin, no Python body
    out = served(ids=tf.constant(ids))["output_0"].numpy()
    report = compare(out, expected, rtol=0.0, atol=bound(embedding, ids, True)[:, None] * np.ones((1, DIM)))
    assert report is None, report


def test_to_layers_is_keras_own_pair(rng):
    _, embedding, pooling = quantized_pair(rng, True)
    layer = QuantizedEmbeddingMean.from_layers(embedding, pooling)
    native, native_pooling = layer.to_layers()
    assert native.quantization_mode == "int8" and native.name == "words"
    assert np.array_equal(np.asarray(native._embeddings), np.asarray(embedding._embeddings))
    ids = random_ids(rng, True)
    assert np.array_equal(keras_pooled(native, native_pooling, ids), keras_pooled(embedding, pooling, ids))


def test_bad_ids_and_layers_say_what_was_expected(rng):
    _, embedding, pooling = quantized_pair(rng, False)
    layer = QuantizedEmbeddingMean.from_layers(embedding, pooling)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"id 80 at ids\[0, 2\] is out of range"):
        layer(np.array([[1, 2, 80]], np.int32))
    plain = keras.layers.Embedding(5, 4)
    plain.build((None,))
    with pytest.raises(ValueError, match="quantized to 'int8', got Embedding with quantization_mode None"):
        QuantizedEmbeddingMean.from_layers(plain, pooling)
    with pytest.raises(TypeError, match="takes int32 or int64 ids, got float32"):
        layer(keras.Input((None,), dtype="float32"))
