"""EmbeddingMean, fuse and unfuse against Keras' Embedding -> GlobalAveragePooling1D."""
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from fused_embedding.keras import EmbeddingMean, fuse, unfuse  # noqa: E402
from fused_embedding.reference import embedding_mean_reference  # noqa: E402
from fused_embedding.semantics import BFLOAT16, Axis  # noqa: E402
from fused_embedding.validation import assert_close, assert_close_to_framework, compare, random_inputs  # noqa: E402
from test_tf_op import keras_pooled  # noqa: E402

VOCAB, DIM, BATCH, LENGTH = 211, 19, 7, 11
FORMATS = ["channels_last", "channels_first"]
NP_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": BFLOAT16}


def text_classifier(data_format, mask_zero, dtype="float32"):
    """ids -> Embedding -> GlobalAveragePooling1D -> Dense(3): the pair fuse() looks for."""
    ids = keras.Input((LENGTH,), dtype="int32", name="ids")
    embedded = keras.layers.Embedding(VOCAB, DIM, mask_zero=mask_zero, dtype=dtype, name="embedding")(ids)
    pooled = keras.layers.GlobalAveragePooling1D(data_format=data_format, dtype=dtype)(embedded)
    return keras.Model(ids, keras.layers.Dense(3, dtype=dtype, name="classifier")(pooled))


def classifier_reference(model, ids, data_format, mask_zero):
    """The float64 reference pooled, then the model's Dense, for where Keras' own pooling fails."""
    table = model.get_layer("embedding").embeddings.numpy()
    dense = model.get_layer("classifier")
    axis = Axis.SEQUENCE if data_format == "channels_last" else Axis.EMBEDDING
    pooled = embedding_mean_reference(table, ids, axis, mask_zero)
    return pooled @ dense.kernel.numpy().astype(np.float64) + dense.bias.numpy()


def padded_ids(rng, mask_zero, batch=BATCH):
    _, ids = random_inputs(rng, VOCAB, 1, batch, LENGTH, padding_fraction=0.3 if mask_zero else 0.0)
    return ids


@pytest.mark.parametrize("table_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("mask_zero", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("data_format", FORMATS)
def test_layer_matches_keras_pair(rng, data_format, mask_zero, table_dtype):
    table, ids = random_inputs(rng, VOCAB, DIM, BATCH, LENGTH, NP_DTYPES[table_dtype],
                               padding_fraction=0.3 if mask_zero else 0.0)
    layer = EmbeddingMean(VOCAB, DIM, data_format=data_format, mask_zero=mask_zero, dtype=table_dtype)
    layer.build((None, LENGTH))
    layer.embeddings.assign(table)
    out = layer(ids)
    assert out.dtype == table_dtype
    # Judged against Keras' own error (it pools float16 and bfloat16 in that dtype).
    axis = 1 if data_format == "channels_last" else 2
    assert_close_to_framework(np.asarray(out), keras_pooled(table, ids, data_format, mask_zero),
                              embedding_mean_reference(table, ids, axis, mask_zero), NP_DTYPES[table_dtype])


@pytest.mark.parametrize("table_dtype", ["float32", "float16"])
@pytest.mark.parametrize("mask_zero", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("data_format", FORMATS)
def test_fuse_text_classifier_gives_the_same_outputs(rng, data_format, mask_zero, table_dtype):
    model = text_classifier(data_format, mask_zero, table_dtype)
    fused = fuse(model)
    assert [type(layer).__name__ for layer in fused.layers] == ["InputLayer", "EmbeddingMean", "Dense"]
    assert fused.get_layer("classifier") is model.get_layer("classifier")  # reused, untouched
    assert fused.layers[1].embeddings is model.get_layer("embedding").embeddings  # shared, not copied
    ids = padded_ids(rng, mask_zero)
    got = fused.predict(ids, verbose=0)
    if mask_zero and data_format == "channels_first":
        # Keras' pooling cannot take this mask (fails unless L == D): the reference decides.
        expected = classifier_reference(model, ids, data_format, mask_zero)
        against = "reference"
    else:
        expected = model.predict(ids, verbose=0)
        against = "keras"
    assert_close(got, expected, np.dtype(table_dtype), against=against)


def test_all_padding_bag_gives_zeros_where_keras_gives_nan(rng):
    model = text_classifier("channels_last", mask_zero=True)
    ids = padded_ids(rng, True)
    ids[2] = 0
    keras_out = model.predict(ids, verbose=0)
    fused_out = fuse(model).predict(ids, verbose=0)
    assert np.isnan(keras_out[2]).all()
    np.testing.assert_allclose(fused_out[2], model.get_layer("classifier").bias.numpy(), rtol=1e-6)
    keep = np.arange(BATCH) != 2
    assert_close(fused_out[keep], keras_out[keep], np.float32, against="keras")


def two_branch_model():
    """Two id inputs, each Embedding -> GAP1D (one masked, one channels_first), plus two unfusable Embeddings."""
    words = keras.Input((LENGTH,), dtype="int32", name="words")
    tags = keras.Input((LENGTH,), dtype="int64", name="tags")
    word_pool = keras.layers.GlobalAveragePooling1D()(
        keras.layers.Embedding(VOCAB, DIM, mask_zero=True, name="word_embedding")(words))
    tag_pool = keras.layers.GlobalAveragePooling1D(data_format="channels_first")(
        keras.layers.Embedding(VOCAB // 2, DIM, name="tag_embedding")(tags))
    # A pooling that keeps its time axis gives (B, 1, D): not a pair, it stays.
    kept = keras.layers.Flatten()(keras.layers.GlobalAveragePooling1D(keepdims=True)(
        keras.layers.Embedding(VOCAB, 3, name="kept_embedding")(tags)))
    # This Embedding's output also feeds a Flatten: it is not a pair, it stays.
    shared = keras.layers.Embedding(VOCAB, 4, name="shared_embedding")(words)
    shared_pool = keras.layers.GlobalAveragePooling1D()(shared)
    shared_flat = keras.layers.Flatten()(shared)
    merged = keras.layers.Concatenate()([word_pool, tag_pool, shared_pool, shared_flat, kept])
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(merged)
    return keras.Model({"words": words, "tags": tags}, keras.layers.Dense(2, name="classifier")(hidden))


def test_fuse_two_branch_model(rng):
    model = two_branch_model()
    fused = fuse(model)
    names = [type(layer).__name__ for layer in fused.layers]
    assert names.count("EmbeddingMean") == 2 and names.count("Embedding") == 2
    assert fused.get_layer("shared_embedding") is model.get_layer("shared_embedding")
    assert fused.get_layer("kept_embedding") is model.get_layer("kept_embedding")
    assert fused.get_layer("hidden") is model.get_layer("hidden")
    inputs = {"words": padded_ids(rng, True),
              "tags": rng.integers(0, VOCAB // 2, (BATCH, LENGTH)).astype(np.int64)}
    assert_close(fused.predict(inputs, verbose=0), model.predict(inputs, verbose=0), np.float32,
                 against="keras")
    roundtrip = unfuse(fused)
    assert not any(isinstance(layer, EmbeddingMean) for layer in roundtrip.layers)
    assert_close(roundtrip.predict(inputs, verbose=0), model.predict(inputs, verbose=0), np.float32,
                 against="keras")


def test_sequential_fuse_and_unfuse(rng):
    model = keras.Sequential([keras.Input((LENGTH,), dtype="int32"), keras.layers.Embedding(VOCAB, DIM),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(4)])
    fused = fuse(model)
    assert [type(layer).__name__ for layer in fused.layers] == ["EmbeddingMean", "Dense"]
    ids = padded_ids(rng, False)
    assert_close(fused.predict(ids, verbose=0), model.predict(ids, verbose=0), np.float32, against="keras")
    native = unfuse(fused)
    assert [type(layer).__name__ for layer in native.layers] == ["Embedding", "GlobalAveragePooling1D", "Dense"]
    assert_close(native.predict(ids, verbose=0), model.predict(ids, verbose=0), np.float32, against="keras")


def test_layer_in_sequential_and_functional_models_has_static_shapes(rng):
    ids = keras.Input((LENGTH,), dtype="int32")
    for data_format, width in (("channels_last", DIM), ("channels_first", LENGTH)):
        pooled = EmbeddingMean(VOCAB, DIM, data_format=data_format)(ids)
        assert tuple(pooled.shape) == (None, width)
    model = keras.Sequential([keras.Input((LENGTH,), dtype="int64"), EmbeddingMean(VOCAB, DIM),
                              keras.layers.Dense(2)])
    assert model.output_shape == (None, 2)
    assert model.predict(padded_ids(rng, False).astype(np.int64), verbose=0).shape == (BATCH, 2)


def test_output_shape_of_ids_that_are_not_2d_is_refused():
    layer = EmbeddingMean(VOCAB, DIM)
    assert layer.compute_output_shape((None, LENGTH)) == (None, DIM)
    with pytest.raises(ValueError, match=r"ids of shape \(batch, length\), got shape \(2, 3, 4\)"):
        layer.compute_output_shape((2, 3, 4))


def test_float_ids_refused_when_the_model_is_built():
    with pytest.raises(TypeError, match="int32 or int64 ids, got float32"):
        EmbeddingMean(VOCAB, DIM)(keras.Input((LENGTH,)))
    model = keras.Sequential([keras.Input((LENGTH,)), keras.layers.Embedding(VOCAB, DIM),
                              keras.layers.GlobalAveragePooling1D()])
    with pytest.raises(TypeError, match="keras.Input"):
        fuse(model)


def test_config_roundtrip_and_registration():
    layer = EmbeddingMean(VOCAB, DIM, data_format="channels_first", mask_zero=True,
                          embeddings_initializer="normal", name="pool")
    config = layer.get_config()
    clone = EmbeddingMean.from_config(config)
    assert clone.get_config() == config
    assert keras.saving.get_registered_name(EmbeddingMean) == "fused_embedding>EmbeddingMean"
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, EmbeddingMean) and restored.get_config() == config


def test_from_layers_needs_a_built_pair():
    with pytest.raises(ValueError, match="not built"):
        EmbeddingMean.from_layers(keras.layers.Embedding(VOCAB, DIM), keras.layers.GlobalAveragePooling1D())
    with pytest.raises(TypeError, match="GlobalAveragePooling1D"):
        EmbeddingMean.from_layers(keras.layers.Embedding(VOCAB, DIM), keras.layers.Dense(2))


def test_unfuse_refuses_what_keras_cannot_express():
    ids = keras.Input((LENGTH,), dtype="int32")
    model = keras.Model(ids, EmbeddingMean(VOCAB, DIM, data_format="channels_first", mask_zero=True)(ids))
    with pytest.raises(ValueError, match="no native equivalent"):
        unfuse(model)


def test_training_step_matches_keras_pair(rng):
    """fit() runs (no XLA on the py_function) and moves the weights as the native pair's gradient does."""
    model = text_classifier("channels_last", mask_zero=True)
    fused = fuse(keras.models.clone_model(model))  # independent weights...
    fused.set_weights(model.get_weights())          # ...with the same values
    ids = padded_ids(rng, True)
    targets = rng.standard_normal((BATCH, 3)).astype(np.float32)
    table_before = model.get_layer("embedding").embeddings.numpy().copy()
    for m in (model, fused):
        m.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5), loss="mse")
        m.fit(ids, targets, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    # The step must move the table by more than the tolerance, or the comparison proves nothing.
    assert compare(model.get_layer("embedding").embeddings.numpy(), table_before, rtol=1e-3, atol=1e-4)
    for native_weight, fused_weight in zip(model.get_weights(), fused.get_weights()):
        assert_close(fused_weight, native_weight, np.float32, against="keras")


def test_layer_reads_its_variable_in_place(monkeypatch, rng):
    """predict() hands the core the variable's own buffer: no per-call copy (nor cast) of the
    table. (Traced with the numpy_function body, whose arrays the core can be seen to get;
    the compiled kernel's graph is checked in the next test.)"""
    import fused_embedding.api as api
    import fused_embedding.tf as fused_tf
    monkeypatch.setattr(fused_tf, "_uses_compiled_kernel", lambda *args: False)
    layer = EmbeddingMean(VOCAB, DIM, dtype="mixed_float16")  # float32 table, float16 compute
    ids = keras.Input((LENGTH,), dtype="int32")
    model = keras.Model(ids, layer(ids))
    seen = []
    core = api._embedding_mean  # what the TF op calls

    def spy(table_array, ids_array, *args, **kwargs):
        seen.append((table_array.ctypes.data, table_array.dtype))
        return core(table_array, ids_array, *args, **kwargs)

    monkeypatch.setattr(api, "_embedding_mean", spy)
    batch = padded_ids(rng, False)
    out = model.predict(batch, verbose=0)
    stored = np.asarray(tf.convert_to_tensor(layer.embeddings))  # a read aliases the buffer
    assert seen == [(stored.ctypes.data, np.dtype(np.float32))]
    assert out.dtype == np.float16
    expected = embedding_mean_reference(layer.embeddings.numpy(), batch)
    assert_close(out, expected.astype(np.float16), np.float16)


def test_compiled_kernel_reads_the_variable_uncast(rng):
    """In the graph predict() runs, the compiled kernel's table input is the variable's
    read itself (through Identity ops only): no Cast, no copy of the table per call."""
    import fused_embedding.tf_compiled as tf_compiled
    if tf_compiled.op_module() is None or tf.config.list_logical_devices("GPU"):
        pytest.skip(f"the compiled TF kernel is not used here ({tf_compiled.unavailable_reason() or 'a GPU'})")
    layer = EmbeddingMean(VOCAB, DIM, dtype="mixed_float16")  # float32 table, float16 compute
    inputs = keras.Input((LENGTH,), dtype="int32")
    model = keras.Model(inputs, layer(inputs))
    batch = padded_ids(rng, False)
    graph = tf.function(lambda i: model(i, training=False)).get_concrete_function(
        tf.TensorSpec([None, LENGTH], tf.int32)).graph
    (kernel,) = [op for op in graph.get_operations() if op.type == "FusedEmbeddingMean"]
    source = kernel.inputs[0].op
    while source.type == "Identity":
        source = source.inputs[0].op
    assert source.type == "ReadVariableOp" and kernel.inputs[0].dtype == tf.float32
    out = model.predict(batch, verbose=0)
    assert out.dtype == np.float16
    assert_close(out, embedding_mean_reference(layer.embeddings.numpy(), batch).astype(np.float16),
                 np.float16)
