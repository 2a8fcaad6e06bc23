"""EmbeddingBag against keras-rs' EmbedReduce and the float64 reference.

Dense (B, L), (B,), ragged and sparse ids; every combiner, with and without weights;
eagerly and in a model's predict (tf.function); gradients of the table; .keras save and
load; bad ids. Weights are drawn in [0.1, 2) (positive: a mean's normaliser is then
never near 0, where float32 and float64 would part ways).
"""
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from fused_embedding.keras_bags import EmbeddingBag  # noqa: E402
from fused_embedding.reference import embedding_bag_reference  # noqa: E402
from fused_embedding.validation import assert_close, assert_close_to_framework  # noqa: E402

VOCAB, DIM, BATCH, LENGTH = 120, 12, 7, 5
COMBINERS = ["mean", "sum", "sqrtn"]
KINDS = ["dense", "vector", "ragged", "sparse"]


def bag_inputs(rng, kind, weighted):
    """(ids in the kind's form, weights in the same form or None, values [N], offsets [B + 1],
    flat weights [N] or None), the last three the CSR bags they mean."""
    if kind in ("dense", "vector"):
        shape = (BATCH, LENGTH) if kind == "dense" else (BATCH,)
        ids = rng.integers(0, VOCAB, size=shape).astype(np.int32)
        w = rng.uniform(0.1, 2.0, size=shape).astype(np.float32) if weighted else None
        length = LENGTH if kind == "dense" else 1
        offsets = np.arange(BATCH + 1, dtype=np.int64) * length
        return tf.constant(ids), None if w is None else tf.constant(w), ids.reshape(-1), offsets, \
            None if w is None else w.reshape(-1)
    lengths = rng.integers(0, LENGTH + 1, size=BATCH)
    lengths[0] = 0  # an empty bag: zeros
    values = rng.integers(0, VOCAB, size=int(lengths.sum())).astype(np.int64)
    w = rng.uniform(0.1, 2.0, size=values.shape[0]).astype(np.float32) if weighted else None
    ids = tf.RaggedTensor.from_row_lengths(values, lengths)
    weights = None if w is None else tf.RaggedTensor.from_row_lengths(w, lengths)
    if kind == "sparse":
        ids, weights = ids.to_sparse(), None if weights is None else weights.to_sparse()
    return ids, weights, values, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), w


def layer_pair(combiner):
    """EmbeddingBag and keras-rs' EmbedReduce on one table (None for the second without keras-rs)."""
    fused = EmbeddingBag(VOCAB, DIM, combiner=combiner)
    fused.build()
    try:
        from keras_rs.layers import EmbedReduce
    except ImportError:
        return fused, None
    native = EmbedReduce(VOCAB, DIM, combiner=combiner)
    native.build((None, None))
    native.embeddings.assign(fused.embeddings.numpy())
    return fused, native


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("combiner", COMBINERS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_matches_embed_reduce_and_reference(rng, kind, combiner, weighted):
    ids, weights, values, offsets, flat_weights = bag_inputs(rng, kind, weighted)
    fused, native = layer_pair(combiner)
    table = fused.embeddings.numpy()
    # EmbedReduce weighs (B,) ids only under "sum"; the reference is told the same.
    reference_weights = flat_weights if kind != "vector" or combiner == "sum" else None
    reference = embedding_bag_reference(table, values, offsets, reference_weights, combiner)
    out = fused(ids, weights) if weighted else fused(ids)
    assert out.shape == (BATCH, DIM)
    assert_close(out.numpy(), reference, np.float32)
    if native is not None:
        expected = native(ids, weights) if weighted else native(ids)
        assert_close_to_framework(out.numpy(), expected.numpy(), reference, np.float32)


@pytest.mark.parametrize("kind", ["dense", "ragged", "sparse"])
def test_in_a_model_predict_and_gradient(rng, kind):
    """A functional model on that kind of input: predict (tf.function) equals the reference,
    and the table's gradient equals the one through EmbedReduce."""
    ids, weights, values, offsets, flat_weights = bag_inputs(rng, kind, weighted=True)
    fused, native = layer_pair("sqrtn")
    spec = dict(ragged=True) if kind == "ragged" else dict(sparse=True) if kind == "sparse" else {}
    shape = (LENGTH,) if kind == "dense" else (None,)
    id_input = keras.Input(shape, dtype=ids.dtype, **spec)
    weight_input = keras.Input(shape, dtype="float32", **spec)
    model = keras.Model([id_input, weight_input], fused(id_input, weight_input))
    reference = embedding_bag_reference(fused.embeddings.numpy(), values, offsets, flat_weights, "sqrtn")
    assert_close(model.predict([ids, weights], verbose=0), reference, np.float32)
    if native is None:
        pytest.skip("keras-rs is not installed: the gradient is compared with EmbedReduce's")
    upstream = tf.constant(rng.standard_normal((BATCH, DIM)).astype(np.float32))
    grads = []
    for layer in (fused, native):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(ids, weights) * upstream)
        grads.append(tf.convert_to_tensor(tape.gradient(loss, layer.embeddings.value)).numpy())
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_keras_save_and_load(rng, tmp_path):
    ids, _, values, offsets, _ = bag_inputs(rng, "ragged", weighted=False)
    fused = EmbeddingBag(VOCAB, DIM, combiner="sum", name="bag")
    id_input = keras.Input((None,), dtype="int64", ragged=True)
    model = keras.Model(id_input, fused(id_input))
    path = tmp_path / "bags.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    layer = loaded.get_layer("bag")
    assert isinstance(layer, EmbeddingBag) and layer.combiner == "sum"
    np.testing.assert_array_equal(layer.embeddings.numpy(), fused.embeddings.numpy())
    reference = embedding_bag_reference(fused.embeddings.numpy(), values, offsets, None, "sum")
    assert_close(loaded(ids).numpy(), reference, np.float32)


def test_bad_id_names_its_position_and_bag(rng):
    fused = EmbeddingBag(VOCAB, DIM)
    ids = tf.RaggedTensor.from_row_lengths(tf.constant([1, 2, VOCAB, 3], tf.int64), [2, 0, 2])
    with pytest.raises(tf.errors.InvalidArgumentError, match=rf"id {VOCAB} at values\[2\] \(bag 2\)"):
        fused(ids)


@pytest.mark.parametrize("arguments, error, message", [
    (dict(combiner="max"), ValueError, r"combiner must be one of \['mean', 'sum', 'sqrtn'\], got 'max'"),
    (dict(input_dim=0), ValueError, "input_dim must be a positive int, got 0"),
    (dict(mask_zero=1), TypeError, "mask_zero must be a bool"),
])
def test_bad_arguments(arguments, error, message):
    with pytest.raises(error, match=message):
        EmbeddingBag(**(dict(input_dim=VOCAB, output_dim=DIM) | arguments))


def test_weights_of_another_shape_are_refused():
    fused = EmbeddingBag(VOCAB, DIM)
    ids, weights = keras.Input((LENGTH,), dtype="int32"), keras.Input((1,), dtype="float32")
    with pytest.raises(ValueError, match=r"weights of the ids' shape \(None, 5\), got \(None, 1\)"):
        fused(ids, weights)


def test_fuse_swaps_embed_reduce_and_unfuse_brings_it_back(rng):
    """A functional model with an EmbedReduce on ragged ids and weights, and a Sequential one
    on dense ids: fuse gives EmbeddingBags sharing the table and the name, outputs equal;
    unfuse gives EmbedReduce back with the same outputs."""
    keras_rs = pytest.importorskip("keras_rs", reason="keras-rs is not installed: nothing to fuse")
    from fused_embedding.keras import fuse, unfuse
    ids, weights, values, offsets, flat_weights = bag_inputs(rng, "ragged", weighted=True)
    id_input = keras.Input((None,), dtype="int64", ragged=True)
    weight_input = keras.Input((None,), dtype="float32", ragged=True)
    reduce = keras_rs.layers.EmbedReduce(VOCAB, DIM, combiner="mean", name="bag")
    model = keras.Model([id_input, weight_input], keras.layers.Dense(3)(reduce(id_input, weight_input)))
    fused = fuse(model)
    layer = fused.get_layer("bag")
    assert isinstance(layer, EmbeddingBag) and layer.embeddings is reduce.embeddings
    expected = model([ids, weights]).numpy()
    assert_close(fused([ids, weights]).numpy(), expected, np.float32)
    back = unfuse(fused)
    assert type(back.get_layer("bag")) is keras_rs.layers.EmbedReduce
    assert_close(back([ids, weights]).numpy(), expected, np.float32)

    dense_ids = tf.constant(rng.integers(0, VOCAB, (BATCH, LENGTH)).astype(np.int32))
    sequential = keras.Sequential([keras.Input((LENGTH,), dtype="int32"),
                                   keras_rs.layers.EmbedReduce(VOCAB, DIM, combiner="sqrtn", name="seq_bag")])
    fused_sequential = fuse(sequential)
    assert isinstance(fused_sequential.get_layer("seq_bag"), EmbeddingBag)
    assert_close(fused_sequential(dense_ids).numpy(), sequential(dense_ids).numpy(), np.float32)


def test_lora_embed_reduce_is_left_native(caplog):
    """(keras-rs' EmbedReduce has no quantize() in this Keras: LoRA is the variant to leave.)"""
    keras_rs = pytest.importorskip("keras_rs", reason="keras-rs is not installed: nothing to fuse")
    from fused_embedding.keras import fuse
    id_input = keras.Input((LENGTH,), dtype="int32")
    reduce = keras_rs.layers.EmbedReduce(VOCAB, DIM, name="bag")
    model = keras.Model(id_input, reduce(id_input))
    reduce.enable_lora(2)
    with caplog.at_level("WARNING", logger="fused_embedding"):
        fused = fuse(model)
    assert fused.get_layer("bag") is reduce
    assert "left 'bag' as a native EmbedReduce: it has LoRA weights" in caplog.text


def test_fuse_turns_a_ragged_embedding_pooling_pair_into_a_bag(rng):
    """Embedding -> GlobalAveragePooling1D on ragged ids averages each row's own ids;
    fuse makes it an EmbeddingBag (mean) sharing the table, with the same outputs."""
    from fused_embedding.keras import fuse
    ids, _, values, offsets, _ = bag_inputs(rng, "ragged", weighted=False)
    id_input = keras.Input((None,), dtype="int64", ragged=True)
    embedding = keras.layers.Embedding(VOCAB, DIM, name="tokens")
    model = keras.Model(id_input, keras.layers.GlobalAveragePooling1D()(embedding(id_input)))
    fused = fuse(model)
    layer = fused.get_layer("tokens")
    assert isinstance(layer, EmbeddingBag) and layer.embeddings is embedding.embeddings
    reference = embedding_bag_reference(embedding.embeddings.numpy(), values, offsets, None, "mean")
    out, keras_out = fused(ids).numpy(), model(ids).numpy()
    filled = np.diff(offsets) > 0  # Keras gives NaN for an empty row, the fused op zeros (as for all-padding bags)
    assert np.isnan(keras_out[~filled]).all() and (out[~filled] == 0).all()
    assert_close_to_framework(out[filled], keras_out[filled], reference[filled], np.float32)
