"""The TF op on quantized tables (tf_quantized.py): eager, tf.function and the export twin,
against the float64 dequantize-then-pool reference and Keras' own int8 Embedding."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fused_embedding as fe
from fused_embedding.reference import dequantized_rows, embedding_mean_reference
from fused_embedding.validation import FLOAT32_UNIT_ROUNDOFF, compare, quantized_term_sizes

from conftest import ID_DTYPES
from test_quantized import MODES, bag_bound, dense_as_csr, make_table

tf = pytest.importorskip("tensorflow")
import fused_embedding.tf as fused_tf  # noqa: E402

FORMS = ("eager", "graph", "native")


def run(form, qtable, ids, **kwargs):
    """The op on ``ids`` in one of its forms: eager, a tf.function in this process, or the
    native twin a SavedModel holds (traced under native_ops())."""
    if form == "eager":
        return fused_tf.embedding_mean(qtable, ids, **kwargs).numpy()
    fn = tf.function(lambda i: fused_tf.embedding_mean(qtable, i, **kwargs))
    if form == "native":
        with fused_tf.native_ops():
            return fn(tf.constant(ids)).numpy()
    return fn(tf.constant(ids)).numpy()


def as_tf(qtable):
    """The same table held by TF: its data and parameters as tf.Variables."""
    return fused_tf.TFQuantizedTable(qtable.format, tf.Variable(np.ascontiguousarray(qtable.data)),
                                     tf.Variable(np.ascontiguousarray(qtable.params)))


def bound(qtable, ids, axis, mask_zero):
    """The float32 result's error bound against the float64 reference: the bags bound for
    axis 1 (a mean of L dequantized values); for axis 2 a mean over D values, each with up
    to two roundings, summed in float32: (D + 4) u of their mean size."""
    if axis == 1:
        values, offsets = dense_as_csr(ids, mask_zero)
        return bag_bound(qtable, values, offsets, None, "mean")
    size = quantized_term_sizes(qtable)[ids].mean(axis=2)
    if qtable.biases is not None:
        size += np.abs(qtable.biases.astype(np.float64))[ids]
    return np.where(mask_zero & (ids == 0), 0.0, (qtable.shape[1] + 4) * FLOAT32_UNIT_ROUNDOFF * size)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("axis", [1, 2])
@pytest.mark.parametrize("mask_zero", [False, True])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("held_by", ["numpy", "tf"])
def test_forms_match_the_reference(rng, mode, axis, mask_zero, form, held_by):
    qtable = make_table(rng, mode, 40, 22)  # 22: int4 data of 11 bytes a row
    ids = rng.integers(0, 40, (6, 9)).astype(ID_DTYPES[rng.integers(len(ID_DTYPES))])
    ids[rng.random(ids.shape) < 0.3] = 0
    ids[1] = 0  # a bag of padding only under mask_zero: zeros
    table = qtable if held_by == "numpy" else as_tf(qtable)
    out = run(form, table, ids, axis=axis, mask_zero=mask_zero)
    assert out.dtype == np.float32 and out.shape == ((6, 22) if axis == 1 else (6, 9))
    report = compare(out, embedding_mean_reference(qtable, ids, axis, mask_zero), rtol=0.0,
                     atol=bound(qtable, ids, axis, mask_zero))
    assert report is None, report
    if mask_zero and axis == 1:
        assert not out[1].any()


@pytest.mark.slow  # builds a Keras layer
@pytest.mark.parametrize("form", FORMS)
def test_keras_int8_embedding_read_as_it_is(rng, form):
    """Keras' quantized Embedding -> GlobalAveragePooling1D, and the op on its own variables."""
    import keras
    layer = keras.layers.Embedding(60, 24)
    layer.build((None,))
    layer.quantize("int8")
    ids = rng.integers(1, 60, (5, 8)).astype(np.int32)
    theirs = keras.layers.GlobalAveragePooling1D()(layer(ids)).numpy().astype(np.float64)
    table = fused_tf.TFQuantizedTable.from_keras_int8(layer._embeddings, layer.embeddings_scale)
    ours = run(form, table, ids)
    qtable = fe.QuantizedTable.from_keras_int8(np.asarray(layer._embeddings), np.asarray(layer.embeddings_scale))
    size = np.abs(dequantized_rows(qtable, ids)).mean(axis=1)  # both within (L + 4) u of the exact mean
    report = compare(ours, theirs, rtol=0.0, atol=2 * (ids.shape[1] + 4) * FLOAT32_UNIT_ROUNDOFF * size)
    assert report is None, report


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("axis", [1, 2])
def test_bad_ids_raise_in_every_form(rng, form, axis):
    qtable = make_table(rng, "int8", 30, 8)
    ids = rng.integers(0, 30, (3, 4)).astype(np.int64)
    ids[2, 1] = 30
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"id 30 at ids\[2, 1\] is out of range for a table of 30 rows"):
        run(form, as_tf(qtable), ids, axis=axis)


def test_arguments_say_what_was_expected(rng):
    with pytest.raises(TypeError, match="int8 table's data must be a 2-D uint8 tensor, got int32"):
        fused_tf.TFQuantizedTable("int8", tf.zeros((3, 4), tf.int32), tf.zeros((3, 2)))
    with pytest.raises(TypeError, match="keras_int8 table's params must be float32 of rank 1 or 2"):
        fused_tf.TFQuantizedTable("keras_int8", tf.zeros((3, 4), tf.int8), tf.zeros((3, 1, 1)))
    with pytest.raises(ValueError, match="quantization mode must be one of"):
        fused_tf.TFQuantizedTable("int2", tf.zeros((3, 4), tf.uint8), tf.zeros((3, 2)))
    qtable = make_table(rng, "int4", 10, 4)
    with pytest.raises(TypeError, match="float32"):
        fused_tf.embedding_mean(qtable, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="runs on the 'cpu' and 'numpy' backends so far"):
        fused_tf.embedding_mean(qtable, np.zeros((2, 3), np.int32), backend="cupy")


def test_the_numpy_backend_is_the_reference(rng):
    qtable = make_table(rng, "keras_int8", 30, 6)
    ids = rng.integers(0, 30, (4, 5)).astype(np.int32)
    for form in FORMS[:2]:
        out = run(form, as_tf(qtable), ids, mask_zero=True, backend="numpy")
        assert np.array_equal(out, embedding_mean_reference(qtable, ids, 1, True).astype(np.float32))


# A fresh process with TF alone (no fused_embedding) serves the exported twin.
SERVE = """
import sys
import numpy as np, tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
ids = np.load(sys.argv[2])
np.save(sys.argv[3], loaded.mean(tf.constant(ids)).numpy())
assert "fused_embedding" not in sys.modules
"""


@pytest.mark.slow  # a fresh process
def test_export_writes_the_twin_tf_alone_serves(rng, tmp_path):
    qtable = make_table(rng, "int4", 50, 16)
    table = as_tf(qtable)
    module = tf.Module()
    module.data, module.params = table.data, table.params
    module.mean = tf.function(lambda i: fused_tf.embedding_mean(table, i, mask_zero=True),
                              input_signature=[tf.TensorSpec([None, None], tf.int32)])
    tf.saved_model.save(module, str(tmp_path / "model"))
    ids = rng.integers(0, 50, (7, 5)).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(SERVE), str(tmp_path / "model"),
                           str(tmp_path / "ids.npy"), str(tmp_path / "out.npy")],
                          capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = compare(np.load(tmp_path / "out.npy"), embedding_mean_reference(qtable, ids, 1, True), rtol=0.0,
                     atol=bound(qtable, ids, 1, True))
    assert report is None, report


def test_a_graph_with_the_python_body_refuses_to_be_saved(rng, tmp_path):
    table = as_tf(make_table(rng, "int8", 20, 8))
    module = tf.Module()
    module.data, module.params = table.data, table.params
    traced = tf.function(lambda i: fused_tf.embedding_mean(table, i),
                         input_signature=[tf.TensorSpec([None, None], tf.int32)])
    module.mean = traced.get_concrete_function()  # traced here, in process: the numpy_function body
    with pytest.raises(AssertionError, match="native_ops"):
        tf.saved_model.save(module, str(tmp_path / "model"))
