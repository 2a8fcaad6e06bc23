"""Saving fused models: the default export serves the compiled ops in a fresh process; the
native twin loads with TF alone; nothing that can't load is ever written.

Checked here:
  * ``model.export(dir)`` of Keras models (``EmbeddingMean`` layers in float32, float16
    and bfloat16, and a stock model made fused by ``fused_embedding.keras.fuse``; both
    axes, mask_zero) and ``tf.saved_model.save`` of a ``tf.Module`` (``embedding_mean``
    on a tf.Variable, a tf.constant and a ``frozen_table``; the sparse drop-ins, every
    combiner, weights, pruning, ``default_id``) -> reloaded in a fresh process that
    does ``import fused_embedding.tf; load_ops()``: outputs within the dtype's tolerance
    of the float64 reference and of the in-process model, every output written (the
    kernels' outputs are poisoned first), the graphs hold ``FusedEmbedding*`` ops and no
    Python op (axis 2 on a frozen table: the row-means op; on a variable: the rows, and
    an assignment after loading is seen), a bad id is an InvalidArgumentError naming
    the id, its position and V;
  * a fresh process without this package: loading a fused SavedModel fails with TF's
    "Op type not registered"; the native twins (``native_ops()``, ``keras.unfuse``)
    load and serve; the op library loaded by ``tf.load_op_library`` alone (no Python
    configuring it, as in TF Serving) serves the fused SavedModels through its C++ loops;
  * a fresh process whose op library cache is empty rebuilds it and serves (slow);
  * ``model.save("m.keras")`` -> ``keras.models.load_model`` in a fresh process;
  * a graph traced with a Python body and handed to the saver as is fails at save time,
    naming the fix; one traced with the compiled op saves;
  * where the compiled ops can't be built, export writes the native twin, with a warning.
Fresh processes share one saved set (module fixture) and do many checks each
(TensorFlow's import costs ~10 s here).
"""
import inspect
import json
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import fused_embedding.tf as fused_tf  # noqa: E402
from fused_embedding import frozen_table, tf_compiled  # noqa: E402
from fused_embedding.keras import EmbeddingMean, fuse, unfuse  # noqa: E402
from fused_embedding.reference import embedding_bag_reference, embedding_mean_reference  # noqa: E402
from fused_embedding.semantics import BFLOAT16, Axis  # noqa: E402
from fused_embedding.validation import POISON, assert_close, exact_weights, random_inputs  # noqa: E402
from conftest import TEST_SEED  # noqa: E402

VOCAB, DIM, BATCH, LENGTH = 97, 13, 6, 9
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": BFLOAT16}
FUSED_OPS = {"FusedEmbeddingMean", "FusedEmbeddingMeanOfRows", "FusedEmbeddingBag"}
PYTHON_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}
DEFAULT_ID = 3
BAD_ID = 10**6
ID_SPEC = tf.TensorSpec([None, LENGTH], tf.int32)
RAGGED_IDS = tf.RaggedTensorSpec([None, None], tf.int32, 1, tf.int64)
RAGGED_WEIGHTS = tf.RaggedTensorSpec([None, None], tf.float32, 1, tf.int64)
SPARSE_IDS = tf.SparseTensorSpec([None, None], tf.int64)
SPARSE_WEIGHTS = tf.SparseTensorSpec([None, None], tf.float32)

needs_compiled_ops = pytest.mark.skipif(
    "tf_compiled.op_module() is None",
    reason="the compiled TF ops can't be built here: export writes the native twin "
           "(test_export_falls_back_to_the_native_twin_with_a_warning)")


def keras_model(dtype_name):
    """EmbeddingMean branches: masked channels_last, channels_first; two outputs, (B, D), (B, L)."""
    ids = keras.Input((LENGTH,), dtype="int32", name="ids")
    return keras.Model(ids, [
        EmbeddingMean(VOCAB, DIM, mask_zero=True, embeddings_initializer="normal", dtype=dtype_name,
                      name="mean_masked")(ids),
        EmbeddingMean(VOCAB, DIM, data_format="channels_first", embeddings_initializer="normal",
                      dtype=dtype_name, name="mean_per_id")(ids)])


def stock_model():
    """Keras' own Embedding -> GlobalAveragePooling1D pairs, for ``fuse``."""
    ids = keras.Input((LENGTH,), dtype="int32", name="ids")
    masked = keras.layers.Embedding(VOCAB, DIM, mask_zero=True, embeddings_initializer="normal",
                                    name="mean_masked")(ids)
    per_id = keras.layers.Embedding(VOCAB, DIM, embeddings_initializer="normal", name="mean_per_id")(ids)
    return keras.Model(ids, [keras.layers.GlobalAveragePooling1D()(masked),
                             keras.layers.GlobalAveragePooling1D(data_format="channels_first")(per_id)])


class TableModule(tf.Module):
    """The raw ops in a tf.Module: a variable, a constant and a frozen table; the drop-ins."""

    def __init__(self, table):
        super().__init__()
        self.table = tf.Variable(table)
        self.constant = tf.constant(table)
        self.frozen = frozen_table(table)

    @tf.function(input_signature=[ID_SPEC])
    def pooled(self, ids):
        return fused_tf.embedding_mean(self.table, ids, mask_zero=True)

    @tf.function(input_signature=[ID_SPEC])
    def per_id_variable(self, ids):
        return fused_tf.embedding_mean(self.table, ids, axis=2, mask_zero=True)

    @tf.function(input_signature=[ID_SPEC])
    def per_id_constant(self, ids):
        return fused_tf.embedding_mean(self.constant, ids, axis=2, mask_zero=True)

    @tf.function(input_signature=[ID_SPEC])
    def per_id_frozen(self, ids):
        return fused_tf.embedding_mean(self.frozen, ids, axis=-1)

    @tf.function(input_signature=[RAGGED_IDS, RAGGED_WEIGHTS])
    def bag_mean(self, ids, weights):
        return fused_tf.embedding_lookup_sparse(self.table, ids, weights, combiner="mean")

    @tf.function(input_signature=[SPARSE_IDS])
    def bag_sum(self, ids):
        return fused_tf.embedding_lookup_sparse(self.table, ids, combiner="sum")

    @tf.function(input_signature=[RAGGED_IDS, RAGGED_WEIGHTS])
    def bag_sqrtn(self, ids, weights):
        return fused_tf.embedding_lookup_sparse(self.table, ids, weights, combiner="sqrtn")

    @tf.function(input_signature=[SPARSE_IDS, SPARSE_WEIGHTS])
    def safe_mean(self, ids, weights):
        return fused_tf.safe_embedding_lookup_sparse(self.table, ids, weights, combiner="mean")

    @tf.function(input_signature=[SPARSE_IDS])
    def safe_default(self, ids):
        return fused_tf.safe_embedding_lookup_sparse(self.table, ids, default_id=DEFAULT_ID)


DENSE_ENDPOINTS = {  # endpoint -> (axis, mask_zero, the op it must hold)
    "pooled": (Axis.SEQUENCE, True, "FusedEmbeddingMean"),
    "per_id_variable": (Axis.EMBEDDING, True, "FusedEmbeddingMean"),     # assignable: rows read
    "per_id_constant": (Axis.EMBEDDING, True, "FusedEmbeddingMeanOfRows"),
    "per_id_frozen": (Axis.EMBEDDING, False, "FusedEmbeddingMeanOfRows"),
}
BAG_ENDPOINTS = ("bag_mean", "bag_sum", "bag_sqrtn", "safe_mean", "safe_default")


def bag_inputs(rng):
    """CSR bags with an empty one: lengths [B], values [N] int32, weights [N] float32 (exact),
    and the safe lookup's: values with ids < 0, weights with some <= 0."""
    lengths = rng.integers(0, 6, BATCH)
    lengths[1] = 0
    total = int(lengths.sum())
    values = rng.integers(0, VOCAB, total).astype(np.int32)
    safe_values = values.copy()
    safe_values[rng.random(total) < 0.25] = -1
    safe_values[np.repeat(np.arange(BATCH), lengths) == 4] = -2  # bag 4 pruned to nothing
    return dict(lengths=lengths, values=values, weights=exact_weights(rng, total), safe_values=safe_values)


def bag_tensors(lengths, values, weights, safe_values):
    """What each bag endpoint is called with: ragged or sparse ids (and weights), from
    bag_inputs' arrays. Uses only np and tf: the fresh processes run its source too."""
    def ragged(flat):
        return tf.RaggedTensor.from_row_lengths(flat, tf.constant(lengths, tf.int64))
    indices = np.stack([np.repeat(np.arange(len(lengths)), lengths),
                        np.concatenate([np.arange(n) for n in lengths])], 1).astype(np.int64)
    shape = [len(lengths), max(int(lengths.max()), 1)]

    def sparse(flat):
        return tf.SparseTensor(indices, flat, shape)
    return {"bag_mean": (ragged(values), ragged(weights)),
            "bag_sum": (sparse(values.astype(np.int64)),),
            "bag_sqrtn": (ragged(values), ragged(weights)),
            "safe_mean": (sparse(safe_values.astype(np.int64)), sparse(weights)),
            "safe_default": (sparse(safe_values.astype(np.int64)),)}


def bag_references(table, bags):
    """float64 reference of each bag endpoint (TF's pruning and default_id rules in NumPy)."""
    offsets = np.concatenate([[0], np.cumsum(bags["lengths"])])
    values, weights, safe = bags["values"], bags["weights"], bags["safe_values"]
    bag_of = np.repeat(np.arange(BATCH), bags["lengths"])
    keep = (safe >= 0) & (weights > 0)
    kept_offsets = np.concatenate([[0], np.cumsum(np.bincount(bag_of[keep], minlength=BATCH))])
    kept_ids = safe >= 0
    default = embedding_bag_reference(table, safe[kept_ids],
                                      np.concatenate([[0], np.cumsum(np.bincount(bag_of[kept_ids],
                                                                                 minlength=BATCH))]))
    empty = np.bincount(bag_of[kept_ids], minlength=BATCH) == 0
    default[empty] = table[DEFAULT_ID].astype(np.float64)
    return {"bag_mean": embedding_bag_reference(table, values, offsets, weights, "mean"),
            "bag_sum": embedding_bag_reference(table, values, offsets, None, "sum"),
            "bag_sqrtn": embedding_bag_reference(table, values, offsets, weights, "sqrtn"),
            "safe_mean": embedding_bag_reference(table, safe[keep], kept_offsets, weights[keep], "mean"),
            "safe_default": default}


def saved_op_types(path) -> set:
    """Every op type in a SavedModel's graph and function library, read from saved_model.pb."""
    from tensorflow.core.protobuf import saved_model_pb2
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((path / "saved_model.pb").read_bytes())
    graph = saved.meta_graphs[0].graph_def
    return {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every SavedModel the fresh processes load, their inputs and expected outputs.

    A module fixture can't take the per-test ``rng``: its generator is made the same way,
    from the run's seed (FUSED_EMBEDDING_TEST_SEED replays it)."""
    rng = np.random.default_rng([TEST_SEED, zlib.crc32(b"test_export.saved")])
    path = tmp_path_factory.mktemp("saved")
    table, ids = random_inputs(rng, VOCAB, DIM, BATCH, LENGTH, padding_fraction=0.3)
    ids[1] = 0  # an all-padding bag: zeros in every form
    expected, references = {}, {}

    keras_models = {name: keras_model(name) for name in DTYPES}
    keras_models["fused"] = fuse(stock_model())
    for name, model in keras_models.items():
        layers = (model.get_layer("mean_masked"), model.get_layer("mean_per_id"))
        assert all(isinstance(layer, EmbeddingMean) for layer in layers)
        expected[f"keras_{name}"] = [np.asarray(out, np.float32) for out in model(ids)]
        references[f"keras_{name}"] = [
            embedding_mean_reference(layers[0].embeddings.numpy(), ids, Axis.SEQUENCE, True),
            embedding_mean_reference(layers[1].embeddings.numpy(), ids, Axis.EMBEDDING, False)]
        model.export(str(path / f"keras_{name}"), verbose=False)
    keras_models["float32"].save(path / "model.keras")
    unfuse(keras_models["float32"]).export(str(path / "keras_unfused"), verbose=False)

    module = TableModule(table)
    bags = bag_inputs(rng)
    for name, (axis, mask_zero, _) in DENSE_ENDPOINTS.items():
        expected[name] = getattr(module, name)(ids).numpy()
        references[name] = embedding_mean_reference(table, ids, axis, mask_zero)
    calls = bag_tensors(bags["lengths"], bags["values"], bags["weights"], bags["safe_values"])
    for name in BAG_ENDPOINTS:
        expected[name] = getattr(module, name)(*calls[name]).numpy()
    references.update(bag_references(table, bags))
    tf.saved_model.save(module, str(path / "module"))
    with fused_tf.native_ops():
        tf.saved_model.save(TableModule(table), str(path / "module_native"))

    new_table = rng.standard_normal((VOCAB, DIM), dtype=np.float32)  # assigned after loading
    np.savez(path / "inputs.npz", ids=ids, new_table=new_table, **bags)
    return dict(path=path, ids=ids, table=table, new_table=new_table, bags=bags, expected=expected,
                references=references, keras_models=keras_models)


# The fresh processes' shared part: rebuild the inputs, serve every SavedModel, record
# outputs (as float32: bfloat16 doesn't round-trip through .npz) and op types.
SERVE_ALL = '''
import json, sys
import numpy as np
import tensorflow as tf
path = sys.argv[1]
inputs = np.load(f"{path}/inputs.npz")
ids = inputs["ids"]
KERAS = KERAS_NAMES
DENSE = DENSE_NAMES
BAGS = BAG_NAMES
BAD_ID = BAD_ID_VALUE


BAG_TENSORS_SOURCE


def op_types(function):
    """Op types of a restored function's graphs, its function library included."""
    found = set()
    for concrete in getattr(function, "concrete_functions", None) or [function]:
        graph_def = concrete.graph.as_graph_def()
        found |= {n.op for n in graph_def.node}
        found |= {n.op for f in graph_def.library.function for n in f.node_def}
    return sorted(found)


def as_arrays(out):
    out = list(out.values()) if isinstance(out, dict) else out
    return [np.asarray(o, np.float32) for o in (out if isinstance(out, (list, tuple)) else [out])]


def serve_all():
    """{name: [outputs]}, {name: op types}, {name: bad-id message} for every SavedModel."""
    outputs, ops, messages = {}, {}, {}
    for name in KERAS:
        exported = tf.saved_model.load(f"{path}/keras_{name}")
        outputs[f"keras_{name}"] = as_arrays(exported.serve(ids))
        ops[f"keras_{name}"] = op_types(exported.serve)
        bad = ids.copy(); bad[2, 3] = BAD_ID
        try:
            exported.serve(bad)
            messages[f"keras_{name}"] = "no error"
        except tf.errors.InvalidArgumentError as exc:
            messages[f"keras_{name}"] = " ".join(exc.message.split())
    module = tf.saved_model.load(f"{path}/module")
    calls = bag_tensors(inputs["lengths"], inputs["values"], inputs["weights"], inputs["safe_values"])
    for name in DENSE:
        outputs[name] = as_arrays(getattr(module, name)(ids))
        ops[name] = op_types(getattr(module, name))
    for name in BAGS:
        outputs[name] = as_arrays(getattr(module, name)(*calls[name]))
        ops[name] = op_types(getattr(module, name))
    bad_values = inputs["values"].copy(); bad_values[3] = BAD_ID
    try:
        module.bag_mean(*bag_tensors(inputs["lengths"], bad_values, inputs["weights"],
                                     inputs["safe_values"])["bag_mean"])
        messages["bag_mean"] = "no error"
    except tf.errors.InvalidArgumentError as exc:
        messages["bag_mean"] = " ".join(exc.message.split())
    module.table.assign(inputs["new_table"])  # a variable's axis 2 must read the new rows
    outputs["per_id_variable_assigned"] = as_arrays(module.per_id_variable(ids))
    return outputs, ops, messages


def record(tag, outputs, ops, messages):
    np.savez(f"{path}/{tag}.npz", **{f"{k}.{i}": v for k, vs in outputs.items() for i, v in enumerate(vs)})
    with open(f"{path}/{tag}.json", "w") as f:
        json.dump(dict(ops=ops, messages=messages), f)
'''


def serve_script(body: str) -> str:
    shared = (SERVE_ALL.replace("KERAS_NAMES", repr(list(DTYPES) + ["fused"]))
              .replace("DENSE_NAMES", repr(list(DENSE_ENDPOINTS))).replace("BAG_NAMES", repr(list(BAG_ENDPOINTS)))
              .replace("BAD_ID_VALUE", repr(BAD_ID)).replace("BAG_TENSORS_SOURCE", inspect.getsource(bag_tensors)))
    return textwrap.dedent(body).replace("SERVE_ALL\n", shared + "\n")


def run_fresh(script, path, env=None):
    import os
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                            timeout=600, env=None if env is None else {**os.environ, **env})
    assert result.returncode == 0, f"fresh process failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def recorded(path, tag):
    arrays = np.load(path / f"{tag}.npz")
    outputs = {}
    for key in arrays.files:
        name, index = key.rsplit(".", 1)
        outputs.setdefault(name, {})[int(index)] = arrays[key]
    meta = json.loads((path / f"{tag}.json").read_text())
    return {name: [parts[i] for i in sorted(parts)] for name, parts in outputs.items()}, meta["ops"], meta["messages"]


def check_served(saved, outputs, ops, messages, fused: bool):
    """Each SavedModel's outputs against the float64 reference and the in-process model, within
    the dtype's tolerance; the ops it holds; its bad-id messages."""
    for name in list(DTYPES) + ["fused"]:
        key = f"keras_{name}"
        dtype = DTYPES.get(name, np.float32)
        for served, reference, in_process in zip(outputs[key], saved["references"][key], saved["expected"][key]):
            assert_close(served, reference, dtype)
            assert_close(served, in_process, dtype)
        np.testing.assert_array_equal(outputs[key][0][1], 0.0)  # the all-padding bag
        assert (f"id {BAD_ID} at ids[2, 3] is out of range for a table of {VOCAB} rows "
                f"(expected 0 <= id < {VOCAB})") in messages[key]
    for name in list(DENSE_ENDPOINTS) + list(BAG_ENDPOINTS):
        assert_close(outputs[name][0], saved["references"][name], np.float32)
        assert_close(outputs[name][0], saved["expected"][name], np.float32)
    assert_close(outputs["per_id_variable_assigned"][0],
                 embedding_mean_reference(saved["new_table"], saved["ids"], Axis.EMBEDDING, True), np.float32)
    assert f"id {BAD_ID} at values[3] (bag " in messages["bag_mean"]
    assert f"for a table of {VOCAB} rows" in messages["bag_mean"]
    for name, found in ops.items():
        assert not set(found) & PYTHON_OPS, (name, found)
        assert bool(set(found) & FUSED_OPS) == fused, (name, sorted(set(found) & FUSED_OPS))
    if fused:
        for name, (_, _, op) in DENSE_ENDPOINTS.items():
            assert set(ops[name]) & FUSED_OPS == {op}, (name, ops[name])
        for name in BAG_ENDPOINTS:
            assert set(ops[name]) & FUSED_OPS == {"FusedEmbeddingBag"}, (name, ops[name])
        for name in list(DTYPES) + ["fused"]:  # axis 1 and axis 2 on a variable
            assert set(ops[f"keras_{name}"]) & FUSED_OPS == {"FusedEmbeddingMean"}


@pytest.mark.slow
@needs_compiled_ops
def test_fused_savedmodels_serve_in_a_fresh_process_after_load_ops(saved):
    run_fresh(serve_script('''
        import fused_embedding.tf
        from fused_embedding import tf_compiled
        fused_embedding.tf.load_ops()
        tf_compiled.poison_outputs(POISON_VALUE)  # every element the kernels skip shows
        SERVE_ALL
        record("served", *serve_all())
    ''').replace("POISON_VALUE", repr(POISON)), saved["path"])
    check_served(saved, *recorded(saved["path"], "served"), fused=True)


@pytest.mark.slow
@needs_compiled_ops
def test_without_this_package_fused_fails_native_serves_and_the_bare_library_serves(saved):
    """TF alone: "Op type not registered" for the fused SavedModel; the native twins serve;
    the library loaded by tf.load_op_library with no Python configuring it (TF Serving's
    case) serves the fused SavedModels through its plain C++ loops."""
    library = tf_compiled.library_path(tf_compiled._compiler())
    result = run_fresh(serve_script('''
        import ctypes, importlib.abc, sys

        class NoFusedEmbedding(importlib.abc.MetaPathFinder):
            def find_spec(self, name, *args):
                if name.split(".")[0] == "fused_embedding":
                    raise ImportError("this process must not import fused_embedding")

        sys.meta_path.insert(0, NoFusedEmbedding())
        SERVE_ALL
        try:
            tf.saved_model.load(f"{path}/module")
            print("fused loaded without the library")
        except Exception as exc:
            print("fused refused:", type(exc).__name__, " ".join(str(exc).split())[:600])
        unfused = tf.saved_model.load(f"{path}/keras_unfused")  # held: its functions use its variables
        with open(f"{path}/native_ops.json", "w") as f:  # the twins hold no fused op
            json.dump(dict(unfused=op_types(unfused.serve)), f)
        np.save(f"{path}/unfused.npy", np.asarray(unfused.serve(ids)[0], np.float32))
        module = tf.saved_model.load(f"{path}/module_native")
        np.savez(f"{path}/native.npz", **{name: np.asarray(getattr(module, name)(ids)) for name in DENSE})
        tf.load_op_library(LIBRARY)
        ctypes.CDLL(LIBRARY).fused_embedding_poison_outputs(1, ctypes.c_float(POISON_VALUE))
        record("bare_library", *serve_all())
        assert not any(name.startswith("fused_embedding") for name in sys.modules)
    ''').replace("LIBRARY", repr(str(library))).replace("POISON_VALUE", repr(POISON)), saved["path"])
    refused = result.stdout.split("fused refused:")[1]
    assert "Op type not registered 'FusedEmbedding" in refused
    path = saved["path"]
    # Keras' own layers (unfuse): its NaN for the all-padding bag 1, the same means elsewhere.
    unfused = np.load(path / "unfused.npy")
    assert np.isnan(unfused[1]).all()
    assert_close(np.delete(unfused, 1, 0), np.delete(saved["references"]["keras_float32"][0], 1, 0), np.float32)
    assert not set(json.loads((path / "native_ops.json").read_text())["unfused"]) & FUSED_OPS
    native = np.load(path / "native.npz")
    for name, (axis, mask_zero, _) in DENSE_ENDPOINTS.items():
        assert_close(native[name], saved["references"][name], np.float32)
    assert not saved_op_types(path / "module_native") & (FUSED_OPS | PYTHON_OPS)
    check_served(saved, *recorded(path, "bare_library"), fused=True)


@pytest.mark.slow
@needs_compiled_ops
def test_a_fresh_process_with_an_empty_op_cache_rebuilds_and_serves(saved, tmp_path):
    """As under another TF version: no library for this TF in the cache, load_ops builds it."""
    cache = tmp_path / "cache"
    run_fresh(textwrap.dedent('''
        import sys, numpy as np, tensorflow as tf
        import fused_embedding.tf
        from fused_embedding import tf_compiled
        path = sys.argv[1]
        fused_embedding.tf.load_ops()
        assert tf_compiled.library_path(tf_compiled._compiler()).parent == tf_compiled.cache_dir()
        print("built:", tf_compiled.library_path(tf_compiled._compiler()).exists())
        module = tf.saved_model.load(f"{path}/module")
        np.save(f"{path}/rebuilt.npy", module.pooled(np.load(f"{path}/inputs.npz")["ids"]).numpy())
    '''), saved["path"], env={tf_compiled.CACHE_ENV_VAR: str(cache)})
    assert list(cache.glob("tf_host_op-*.so")), "no library was built into the empty cache"
    assert_close(np.load(saved["path"] / "rebuilt.npy"), saved["references"]["pooled"], np.float32)


@pytest.mark.slow
def test_keras_file_reloads_in_a_fresh_process(saved):
    run_fresh(textwrap.dedent("""
        import sys, numpy as np
        import keras
        import fused_embedding.keras  # registers EmbeddingMean
        path = sys.argv[1]
        model = keras.models.load_model(f"{path}/model.keras")
        assert [type(l).__name__ for l in model.layers].count("EmbeddingMean") == 2
        outs = model.predict(np.load(f"{path}/inputs.npz")["ids"], verbose=0)
        np.savez(f"{path}/keras_reloaded.npz", *outs)
    """), saved["path"])
    reloaded = np.load(saved["path"] / "keras_reloaded.npz")
    for i, expected in enumerate(saved["expected"]["keras_float32"]):
        assert_close(reloaded[f"arr_{i}"], expected, np.float32)


def test_savedmodels_hold_the_fused_ops_by_default(saved):
    """Read from saved_model.pb (no reload): the default export's graphs hold the compiled
    ops, no Python op; where they can't be built, the native twin."""
    fused = tf_compiled.op_module() is not None
    for name in ["module", *(f"keras_{n}" for n in [*DTYPES, "fused"])]:
        found = saved_op_types(saved["path"] / name)
        assert not found & PYTHON_OPS, (name, found & PYTHON_OPS)
        assert bool(found & FUSED_OPS) == fused, (name, found & FUSED_OPS)
    if fused:
        assert saved_op_types(saved["path"] / "module") >= FUSED_OPS


def test_export_falls_back_to_the_native_twin_with_a_warning(saved, tmp_path, monkeypatch):
    """No compiler (or no TF headers): a SavedModel TF alone can load, and a warning saying so."""
    monkeypatch.setattr(tf_compiled, "op_module", lambda: None)
    monkeypatch.setattr(tf_compiled, "unavailable_reason", lambda: "no C++ compiler (c++) on PATH")
    monkeypatch.setattr(fused_tf, "_native_fallback_warned", False)
    with pytest.warns(RuntimeWarning, match=r"native TF twin.*no C\+\+ compiler"):
        tf.saved_model.save(TableModule(saved["table"]), str(tmp_path / "module"))
    found = saved_op_types(tmp_path / "module")
    assert not found & (FUSED_OPS | PYTHON_OPS)
    assert {"GatherV2", "UnsortedSegmentSum"} <= found


def test_saving_a_traced_python_body_fails_at_save_time(saved, tmp_path, monkeypatch):
    """A graph traced to run here with a Python body (axis 2's numpy_function; the sparse
    drop-ins' where the compiled op can't be built) and handed to the saver as is is refused
    while saving, with the fix; one traced with the compiled op saves as it is.

    (tf.saved_model.save retraces tf.functions it is given, in its save context, and so
    gets the exported form; a ConcreteFunction traced before is saved as is.)
    """
    module = TableModule(saved["table"])
    traced = module.per_id_variable.get_concrete_function()  # numpy_function, outside any export
    with pytest.raises(AssertionError, match=r"fused_embedding\.keras\.unfuse\(model\)"):
        tf.saved_model.save(module, str(tmp_path / "module"), signatures={"per_id": traced})
    assert not (tmp_path / "module" / "saved_model.pb").exists()

    from fused_embedding import tf_bags
    monkeypatch.setattr(tf_bags, "_uses_compiled_kernel", lambda table: False)
    bags_traced = module.bag_sum.get_concrete_function()
    monkeypatch.undo()
    with pytest.raises(AssertionError, match=r"native_ops\(\)"):
        tf.saved_model.save(module, str(tmp_path / "bags"), signatures={"bags": bags_traced})
    assert not (tmp_path / "bags" / "saved_model.pb").exists()

    archive = keras.export.ExportArchive()
    model = saved["keras_models"]["float32"]
    archive.track(model)
    serve = tf.function(lambda ids: model(ids), input_signature=[ID_SPEC])
    serve.get_concrete_function()  # traced here, before the archive: the archive reuses this trace
    archive.add_endpoint("serve", serve)
    with pytest.raises(AssertionError, match=r"fused_embedding\.keras\.unfuse\(model\)"):
        archive.write_out(str(tmp_path / "archive"), verbose=False)
    assert not (tmp_path / "archive" / "saved_model.pb").exists()

    if tf_compiled.op_module() is not None:  # the compiled kernel traced in process saves as is
        compiled = module.pooled.get_concrete_function()
        tf.saved_model.save(module, str(tmp_path / "compiled"), signatures={"pooled": compiled})
        assert "FusedEmbeddingMean" in saved_op_types(tmp_path / "compiled")


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
