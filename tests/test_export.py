"""Saving fused models: each way users save either reloads in a fresh process or fails when saving.

A tf.py_function body lives only in the process that traced it, so a SavedModel
holding one breaks when run after loading. Checked here:
  * ``model.save("m.keras")`` -> ``keras.models.load_model`` in a fresh process
    (which imports fused_embedding.keras, where the layer is registered);
  * ``model.export(dir)`` and ``tf.saved_model.save(module, signatures=...)`` ->
    ``tf.saved_model.load`` in a fresh process that cannot import this package;
  * a graph traced with the py_function and then saved fails at save time,
    naming the fix.
Two subprocesses in all (TensorFlow's import is slow).
"""
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import fused_embedding.tf as fused_tf  # noqa: E402
from fused_embedding.keras import EmbeddingMean  # noqa: E402
from fused_embedding.reference import embedding_mean_reference  # noqa: E402
from fused_embedding.semantics import Axis  # noqa: E402
from fused_embedding.validation import assert_close, random_inputs  # noqa: E402
from conftest import TEST_SEED  # noqa: E402

VOCAB, DIM, BATCH, LENGTH = 97, 13, 6, 9


def fused_model():
    """Two EmbeddingMean branches (masked channels_last, channels_first) -> Dense."""
    ids = keras.Input((LENGTH,), dtype="int32", name="ids")
    pooled = keras.layers.Concatenate()([
        EmbeddingMean(VOCAB, DIM, mask_zero=True, embeddings_initializer="normal", name="mean_masked")(ids),
        EmbeddingMean(VOCAB, DIM, data_format="channels_first", embeddings_initializer="normal",
                      name="mean_per_id")(ids)])
    return keras.Model(ids, keras.layers.Dense(4, name="classifier")(pooled))


class TableModule(tf.Module):
    """The raw op in a tf.Module, saved with an explicit serving signature."""

    def __init__(self, table):
        super().__init__()
        self.table = tf.Variable(table)

    @tf.function(input_signature=[tf.TensorSpec([None, LENGTH], tf.int32)])
    def pooled(self, ids):
        return fused_tf.embedding_mean(self.table, ids, mask_zero=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    rng = np.random.default_rng([TEST_SEED, zlib.crc32(b"test_export.saved")])  # replayable from the seed
    path = tmp_path_factory.mktemp("saved")
    table, ids = random_inputs(rng, VOCAB, DIM, BATCH, LENGTH, padding_fraction=0.3)
    ids[1] = 0  # an all-padding bag: zeros in the fused op and in its exported twin
    model = fused_model()
    expected = model.predict(ids, verbose=0)
    model.save(path / "model.keras")
    model.export(str(path / "export"), verbose=False)
    module = TableModule(table)
    expected_module = module.pooled(ids).numpy()
    tf.saved_model.save(module, str(path / "module"), signatures={"pooled": module.pooled})
    np.savez(path / "inputs.npz", ids=ids)
    return dict(path=path, ids=ids, table=table, model=model, expected=expected,
                expected_module=expected_module)


def run_fresh(script, path):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"fresh process failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_keras_file_reloads_in_a_fresh_process(saved):
    run_fresh("""
        import sys, numpy as np
        import keras
        import fused_embedding.keras  # registers EmbeddingMean
        path = sys.argv[1]
        model = keras.models.load_model(f"{path}/model.keras")
        assert [type(l).__name__ for l in model.layers].count("EmbeddingMean") == 2
        np.save(f"{path}/keras_reloaded.npy", model.predict(np.load(f"{path}/inputs.npz")["ids"], verbose=0))
    """, saved["path"])
    assert_close(np.load(saved["path"] / "keras_reloaded.npy"), saved["expected"], np.float32)


@pytest.mark.slow
def test_savedmodels_serve_in_a_fresh_process_without_this_package(saved):
    result = run_fresh("""
        import importlib.abc, sys, numpy as np

        class NoFusedEmbedding(importlib.abc.MetaPathFinder):
            def find_spec(self, name, *args):
                if name.split(".")[0] == "fused_embedding":
                    raise ImportError("this process must not import fused_embedding")

        sys.meta_path.insert(0, NoFusedEmbedding())
        import tensorflow as tf
        path = sys.argv[1]
        ids = np.load(f"{path}/inputs.npz")["ids"]
        exported = tf.saved_model.load(f"{path}/export")
        module = tf.saved_model.load(f"{path}/module")
        served = exported.serve(ids)
        pooled = module.signatures["pooled"](ids=tf.constant(ids))
        np.savez(f"{path}/served.npz", served=served.numpy(), pooled=list(pooled.values())[0].numpy(),
                 pooled_method=module.pooled(ids).numpy())
        bad = ids.copy(); bad[2, 3] = 10**6
        try:
            exported.serve(bad)
        except tf.errors.InvalidArgumentError as exc:
            print("bad id refused:", " ".join(exc.message.split()))
        assert not any(name.startswith("fused_embedding") for name in sys.modules)
    """, saved["path"])
    served = np.load(saved["path"] / "served.npz")
    assert_close(served["served"], saved["expected"], np.float32)
    assert_close(served["pooled"], saved["expected_module"], np.float32)
    assert_close(served["pooled_method"], saved["expected_module"], np.float32)
    assert_close(served["pooled"], embedding_mean_reference(saved["table"], saved["ids"], Axis.SEQUENCE, True),
                 np.float32)
    np.testing.assert_array_equal(served["pooled"][1], 0.0)
    assert (f"id 1000000 at ids[2, 3] is out of range for a table of {VOCAB} rows "
            f"(expected 0 <= id < {VOCAB})") in result.stdout.split("bad id refused:")[1]


def test_saving_a_traced_py_function_fails_at_save_time(saved, tmp_path):
    """A graph traced to run here and handed to the saver as is is refused while saving, with the fix.

    (tf.saved_model.save retraces tf.functions it is given, in its save context,
    and so gets the native twin; a ConcreteFunction traced before is saved as is.)
    """
    module = TableModule(saved["table"])
    traced = module.pooled.get_concrete_function()  # traced outside any export: holds the py_function
    with pytest.raises(AssertionError, match=r"fused_embedding\.keras\.unfuse\(model\)"):
        tf.saved_model.save(module, str(tmp_path / "module"), signatures={"pooled": traced})
    assert not (tmp_path / "module" / "saved_model.pb").exists()

    archive = keras.export.ExportArchive()
    archive.track(saved["model"])
    serve = tf.function(lambda ids: saved["model"](ids),
                        input_signature=[tf.TensorSpec([None, LENGTH], tf.int32)])
    serve.get_concrete_function()  # traced here, before the archive: the archive reuses this trace
    archive.add_endpoint("serve", serve)
    with pytest.raises(AssertionError, match=r"fused_embedding\.keras\.unfuse\(model\)"):
        archive.write_out(str(tmp_path / "archive"), verbose=False)
    assert not (tmp_path / "archive" / "saved_model.pb").exists()


def test_native_ops_twin_matches_the_reference(rng):
    """The export-time graph (gather + masked mean) keeps the package's semantics."""
    table, ids = random_inputs(rng, VOCAB, DIM, BATCH, LENGTH, np.float16, padding_fraction=0.3)
    ids[0] = 0
    for axis in (1, 2):
        for mask_zero in (False, True):
            with fused_tf.native_ops():
                out = tf.function(lambda t, i: fused_tf.embedding_mean(t, i, axis=axis, mask_zero=mask_zero))(
                    table, ids)
            assert out.dtype == tf.float16
            assert_close(np.asarray(out), embedding_mean_reference(table, ids, axis, mask_zero), np.float16)

@pytest.mark.parametrize("id_dtype", [np.int32, np.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("bad_id", [-3, VOCAB, VOCAB + 7])
def test_native_ops_twin_names_the_first_bad_id_its_position_and_vocab(rng, bad_id, id_dtype):
    """As every other form of the op does, not TF's assertion dump of the whole ids tensor."""
    table, ids = random_inputs(rng, VOCAB, DIM, BATCH, LENGTH, id_dtype=id_dtype)
    ids[2, 1] = bad_id
    ids[3, 0] = -1  # a later one in row order is not the one named
    expected = (rf"id {bad_id} at ids\[2, 1\] is out of range for a table of {VOCAB} rows "
                rf"\(expected 0 <= id < {VOCAB}\)")
    with fused_tf.native_ops():
        graph_fn = tf.function(lambda t, i: fused_tf.embedding_mean(t, i))
        with pytest.raises(tf.errors.InvalidArgumentError, match=expected):
            graph_fn(table, ids)
    ids[2, 1], ids[3, 0] = 0, 0
    assert_close(np.asarray(graph_fn(table, ids)), embedding_mean_reference(table, ids), np.float32)
