"""fuse / unfuse / EmbeddingMean.from_layers keep every setting of the pair they rewrite.

Each setting is checked through fuse, unfuse, from_layers and a ``.keras`` save +
``keras.models.load_model``; a pair whose settings EmbeddingMean cannot express is
left native (same layer objects), with a warning that says why, and the rest fuse.
"""
import logging

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from fused_embedding.keras import EmbeddingMean, fuse, unfuse  # noqa: E402
from fused_embedding.reference import embedding_mean_reference  # noqa: E402
from fused_embedding.validation import assert_close, random_inputs  # noqa: E402

VOCAB, DIM, BATCH, LENGTH = 37, 5, 4, 6


def pair_model(embedding=None, pooling=None, head=True, name="embedding"):
    """ids (B, L) int32 -> Embedding(**embedding) -> GlobalAveragePooling1D(**pooling) [-> Dense(2)]."""
    ids = keras.Input((LENGTH,), dtype="int32", name="ids")
    embedded = keras.layers.Embedding(VOCAB, DIM, name=name, **(embedding or {}))(ids)
    pooled = keras.layers.GlobalAveragePooling1D(name="pool", **(pooling or {}))(embedded)
    return keras.Model(ids, keras.layers.Dense(2, name="head")(pooled) if head else pooled)


def batch(rng, padding_fraction=0.0):
    return random_inputs(rng, VOCAB, 1, BATCH, LENGTH, padding_fraction=padding_fraction)[1]  # [B][L] int32


def fused_layers(model):
    return [layer for layer in model.layers if isinstance(layer, EmbeddingMean)]


def saved_and_loaded(model, tmp_path, name="model.keras"):
    path = tmp_path / name
    model.save(path)
    return keras.models.load_model(path)


def total_loss(model, ids):
    """The model's added losses (activity and weight regularizers) after one eager call, float64."""
    model(ids)
    return np.float64(sum(float(loss) for loss in model.losses))


def assert_same_outputs(model, other, ids, dtype=np.float32):
    assert_close(other.predict(ids, verbose=0), model.predict(ids, verbose=0), dtype, against="keras")


# --- 6: trainable=False --------------------------------------------------------------------------

def test_frozen_table_stays_frozen_through_fuse_from_layers_save_and_unfuse(rng, tmp_path):
    model = pair_model(embedding=dict(trainable=False))
    table = model.get_layer("embedding").embeddings
    fused = fuse(model)
    (layer,) = fused_layers(fused)
    assert layer.trainable is False and layer.get_config()["trainable"] is False
    assert all(w is not table for w in fused.trainable_weights)
    assert len(fused.trainable_weights) == len(model.trainable_weights) == 2  # the head's kernel, bias
    direct = EmbeddingMean.from_layers(model.get_layer("embedding"), model.get_layer("pool"))
    assert direct.trainable is False and direct.trainable_weights == []

    loaded = saved_and_loaded(fused, tmp_path)
    (loaded_layer,) = fused_layers(loaded)
    assert loaded_layer.trainable is False and loaded_layer.trainable_weights == []
    assert len(loaded.trainable_weights) == 2

    for native in (unfuse(fused), unfuse(loaded)):
        (embedding,) = [la for la in native.layers if isinstance(la, keras.layers.Embedding)]
        assert embedding.trainable is False and not embedding.embeddings.trainable
        assert len(native.trainable_weights) == 2
    ids = batch(rng)
    for other in (fused, loaded, unfuse(fused)):
        assert_same_outputs(model, other, ids)


def test_unfreezing_the_fused_layer_unfreezes_its_table():
    """As for an Embedding: layer.trainable = True after fuse makes the (shared) table trainable."""
    model = pair_model(embedding=dict(trainable=False))
    (layer,) = fused_layers(fuse(model))
    layer.trainable = True
    assert [w.path for w in layer.trainable_weights] == [model.get_layer("embedding").embeddings.path]


def test_optimizer_state_reloads_with_a_frozen_table(rng, tmp_path):
    """Keras skips an optimizer's saved state when its variable count changed on load."""
    fused = fuse(pair_model(embedding=dict(trainable=False)))
    fused.compile(optimizer=keras.optimizers.Adam(learning_rate=0.01), loss="mse")
    ids = batch(rng)
    fused.fit(ids, rng.standard_normal((BATCH, 2)).astype(np.float32), batch_size=BATCH, verbose=0)
    loaded = saved_and_loaded(fused, tmp_path)
    saved_state = [v.numpy() for v in fused.optimizer.variables]
    loaded_state = [v.numpy() for v in loaded.optimizer.variables]
    assert int(loaded.optimizer.iterations.numpy()) == 1
    assert len(loaded_state) == len(saved_state)
    for got, expected in zip(loaded_state, saved_state):
        np.testing.assert_array_equal(got, expected)


# --- 7: activity regularizers --------------------------------------------------------------------

def test_pooling_activity_regularizer_is_carried_over(rng, tmp_path):
    model = pair_model(pooling=dict(activity_regularizer=keras.regularizers.L2(0.1)))
    fused = fuse(model)
    (layer,) = fused_layers(fused)
    assert isinstance(layer.activity_regularizer, keras.regularizers.L2)
    direct = EmbeddingMean.from_layers(model.get_layer("embedding"), model.get_layer("pool"))
    assert isinstance(direct.activity_regularizer, keras.regularizers.L2)
    loaded = saved_and_loaded(fused, tmp_path)
    native = unfuse(loaded)
    (pooling,) = [la for la in native.layers if isinstance(la, keras.layers.GlobalAveragePooling1D)]
    assert pooling.activity_regularizer.get_config() == {"l2": pytest.approx(0.1)}
    ids = batch(rng)
    expected = total_loss(model, ids)
    assert expected > 0
    for other in (fused, loaded, native):
        assert_close(total_loss(other, ids), expected, np.float32)
        assert_same_outputs(model, other, ids)


def test_embedding_activity_regularizer_leaves_its_pair_native(rng, caplog):
    """Its loss is on the (B, L, D) rows, which the fused layer never makes: that pair stays, the rest fuse."""
    ids = keras.Input((LENGTH,), dtype="int32")
    regularized = keras.layers.Embedding(VOCAB, DIM, activity_regularizer=keras.regularizers.L1(0.01),
                                         name="regularized")
    plain = keras.layers.Embedding(VOCAB, DIM, name="plain")
    regularized_pool = keras.layers.GlobalAveragePooling1D()
    pooled = [regularized_pool(regularized(ids)), keras.layers.GlobalAveragePooling1D()(plain(ids))]
    model = keras.Model(ids, keras.layers.Dense(2)(keras.layers.Concatenate()(pooled)))
    with caplog.at_level(logging.WARNING, logger="fused_embedding"):
        fused = fuse(model)
    assert fused.get_layer("regularized") is regularized
    assert [layer.name for layer in fused_layers(fused)] == ["plain"]
    assert "'regularized'" in caplog.text and "activity_regularizer" in caplog.text
    with pytest.raises(ValueError, match="activity_regularizer"):
        EmbeddingMean.from_layers(regularized, regularized_pool)
    values = batch(rng)
    assert_close(total_loss(fused, values), total_loss(model, values), np.float32)
    assert_same_outputs(model, fused, values)


# --- 8: quantized and LoRA Embeddings ------------------------------------------------------------

def four_pair_model():
    """One ids input into four Embedding -> GAP1D pairs: int8-quantized, int4-quantized, LoRA, plain."""
    ids = keras.Input((LENGTH,), dtype="int32")
    names = ("int8", "int4", "lora", "plain")
    embeddings = [keras.layers.Embedding(VOCAB, 2 * DIM, name=name) for name in names]  # int4: D even
    pooled = [keras.layers.GlobalAveragePooling1D()(embedding(ids)) for embedding in embeddings]
    model = keras.Model(ids, keras.layers.Dense(2)(keras.layers.Concatenate()(pooled)))
    model.get_layer("int8").quantize("int8")
    model.get_layer("int4").quantize("int4")
    model.get_layer("lora").enable_lora(2)
    return model


def test_int8_pairs_fuse_quantized_and_int4_and_lora_stay_native(rng, caplog):
    from fused_embedding.keras_quantized import QuantizedEmbeddingMean
    model = four_pair_model()
    with caplog.at_level(logging.WARNING, logger="fused_embedding"):
        fused = fuse(model)
    assert fused.get_layer("int4") is model.get_layer("int4")
    assert fused.get_layer("lora") is model.get_layer("lora")
    assert [layer.name for layer in fused_layers(fused)] == ["plain"]
    quantized = fused.get_layer("int8")
    assert isinstance(quantized, QuantizedEmbeddingMean)
    assert quantized.embeddings is model.get_layer("int8")._embeddings  # shared, not copied
    assert "'int4'" in caplog.text and "quantized (int4)" in caplog.text and "'lora'" in caplog.text
    assert "'int8'" not in caplog.text
    assert_same_outputs(model, fused, batch(rng))
    with pytest.raises(ValueError, match="quantized"):  # the float layer, asked for explicitly, refuses
        EmbeddingMean.from_layers(model.get_layer("int8"), keras.layers.GlobalAveragePooling1D())
    native = unfuse(fused)
    assert native.get_layer("int8").quantization_mode == "int8"
    assert_same_outputs(model, native, batch(rng))


def test_int8_pair_in_a_sequential_model_fuses_quantized(rng):
    model = keras.Sequential([keras.Input((LENGTH,), dtype="int32"), keras.layers.Embedding(VOCAB, DIM),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2)])
    model.layers[0].quantize("int8")
    fused = fuse(model)
    assert [type(layer).__name__ for layer in fused.layers] == ["QuantizedEmbeddingMean", "Dense"]
    assert_same_outputs(model, fused, batch(rng))
    assert [type(layer).__name__ for layer in unfuse(fused).layers] == ["Embedding", "GlobalAveragePooling1D",
                                                                         "Dense"]


# --- 9: names ------------------------------------------------------------------------------------

def test_fused_layer_is_found_by_the_embeddings_name(rng, tmp_path):
    model = pair_model(name="words")
    fused = fuse(model)
    assert isinstance(fused.get_layer("words"), EmbeddingMean)
    assert fused.get_layer("words").embeddings is model.get_layer("words").embeddings
    assert EmbeddingMean.from_layers(model.get_layer("words"), model.get_layer("pool")).name == "words"
    loaded = saved_and_loaded(fused, tmp_path)
    assert isinstance(loaded.get_layer("words"), EmbeddingMean)
    native = unfuse(loaded)
    assert isinstance(native.get_layer("words"), keras.layers.Embedding)
    assert isinstance(fuse(native).get_layer("words"), EmbeddingMean)  # and again
    np.testing.assert_array_equal(native.get_layer("words").embeddings.numpy(),
                                  model.get_layer("words").embeddings.numpy())
    ids = batch(rng)
    for other in (fused, loaded, native):
        assert_same_outputs(model, other, ids)


def test_sequential_fused_layer_keeps_the_embeddings_name():
    model = keras.Sequential([keras.Input((LENGTH,), dtype="int32"), keras.layers.Embedding(VOCAB, DIM, name="words"),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2)])
    fused = fuse(model)
    assert isinstance(fused.get_layer("words"), EmbeddingMean)
    assert isinstance(unfuse(fused).get_layer("words"), keras.layers.Embedding)


def test_unfuse_names_do_not_clash_with_the_models_layers():
    ids = keras.Input((LENGTH,), dtype="int32")
    pooled = EmbeddingMean(VOCAB, DIM, name="words")(ids)
    model = keras.Model(ids, keras.layers.Dense(2, name="words_pooling")(pooled))
    native = unfuse(model)
    names = [layer.name for layer in native.layers]
    assert len(set(names)) == len(names) and "words" in names and "words_pooling" in names


def test_sequential_without_input_message_names_the_users_layer(rng):
    model = keras.Sequential([keras.layers.Embedding(VOCAB, DIM, name="words"),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2)])
    model.predict(batch(rng), verbose=0)  # built on Keras' default float32 input
    with pytest.raises(TypeError, match=r"cannot fuse 'words': its ids are float32") as error:
        fuse(model)
    assert "embedding_mean" not in str(error.value) and "keras.Input" in str(error.value)


# --- the other settings: regularizer, constraint, mask_zero, dtype policy ------------------------

def test_regularizer_constraint_and_mask_survive_every_rewrite(rng, tmp_path):
    model = pair_model(embedding=dict(mask_zero=True, embeddings_regularizer=keras.regularizers.L2(0.01),
                                      embeddings_constraint=keras.constraints.NonNeg()))
    fused = fuse(model)
    loaded = saved_and_loaded(fused, tmp_path)
    direct = EmbeddingMean.from_layers(model.get_layer("embedding"), model.get_layer("pool"))
    for layer in (*fused_layers(fused), *fused_layers(loaded), direct):
        assert layer.mask_zero is True
        assert isinstance(layer.embeddings_regularizer, keras.regularizers.L2)
        assert isinstance(layer.embeddings.regularizer, keras.regularizers.L2)
        assert isinstance(layer.embeddings.constraint, keras.constraints.NonNeg)
    native = unfuse(loaded)
    embedding = native.get_layer("embedding")
    assert embedding.mask_zero is True and isinstance(embedding.embeddings.constraint, keras.constraints.NonNeg)
    ids = batch(rng, padding_fraction=0.3)
    ids[:, 0] = 1  # no all-padding bag: Keras gives NaN there, the fused layer zeros
    expected = total_loss(model, ids)
    assert expected > 0
    for other in (fused, loaded, native):
        assert_close(total_loss(other, ids), expected, np.float32)
        assert_same_outputs(model, other, ids)


def test_mixed_precision_policy_survives_every_rewrite(rng, tmp_path):
    model = pair_model(embedding=dict(dtype="mixed_float16"), pooling=dict(dtype="mixed_float16"), head=False)
    fused = fuse(model)
    loaded = saved_and_loaded(fused, tmp_path)
    native = unfuse(loaded)
    for layer in (*fused_layers(fused), *fused_layers(loaded), native.get_layer("embedding"),
                  native.get_layer("embedding_pooling")):
        assert layer.dtype_policy.name == "mixed_float16"
    ids = batch(rng)
    table = model.get_layer("embedding").embeddings.numpy()  # float32 variable, float16 compute
    reference = embedding_mean_reference(table, ids).astype(np.float16)
    for other in (fused, loaded):
        out = other.predict(ids, verbose=0)
        assert out.dtype == np.float16
        assert_close(out, reference, np.float16)
    keras_out = model.predict(ids, verbose=0)
    native_out = native.predict(ids, verbose=0)
    assert native_out.dtype == np.float16
    np.testing.assert_array_equal(native_out, keras_out)  # both Keras' own pair, same weights


def test_pair_whose_pooling_computes_in_another_dtype_stays_native(rng, caplog):
    """Embedding(float16) -> GAP1D(float32) gives float32; one EmbeddingMean has one compute dtype."""
    model = pair_model(embedding=dict(dtype="float16"), head=False)
    with caplog.at_level(logging.WARNING, logger="fused_embedding"):
        fused = fuse(model)
    assert fused_layers(fused) == [] and fused.get_layer("embedding") is model.get_layer("embedding")
    assert "float16" in caplog.text and "float32" in caplog.text
    ids = batch(rng)
    assert fused.predict(ids, verbose=0).dtype == np.float32
    assert_same_outputs(model, fused, ids)


def test_sequential_pair_whose_pooling_computes_in_another_dtype_stays_native(rng, caplog):
    model = keras.Sequential([keras.Input((LENGTH,), dtype="int32"),
                              keras.layers.Embedding(VOCAB, DIM, dtype="float16", name="words"),
                              keras.layers.GlobalAveragePooling1D(name="pool")])
    with caplog.at_level(logging.WARNING, logger="fused_embedding"):
        fused = fuse(model)
    assert [type(layer).__name__ for layer in fused.layers] == ["Embedding", "GlobalAveragePooling1D"]
    assert "'words' -> 'pool'" in caplog.text and "float16" in caplog.text
    ids = batch(rng)
    assert fused.predict(ids, verbose=0).dtype == np.float32
    assert_same_outputs(model, fused, ids)
