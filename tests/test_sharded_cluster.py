"""Sharded tables on an in-process ParameterServerStrategy cluster on localhost
(2 parameter servers, 1 worker, a coordinator; tests/local_cluster.py).

Connecting to a cluster changes a process's eager context for good and TF's in-process
servers cannot be stopped, so the cluster runs in a fresh process of its own
(tests/sharded_cluster_job.py, once per module, its servers gone when it exits): it
records inputs and outputs, and the tests here check them against the float64
reference, the unsharded op and tf.nn.embedding_lookup on the same ShardedVariable.

Checked: tables made by FixedShards / MinSize / MaxSize partitioners (two uneven shards,
one on each parameter server); the dense op on both axes, with and without mask_zero,
int32 and int64 ids, all-padding and empty (L = 0) bags; the sparse drop-ins (every
combiner, weights, an empty bag, a dropped negative id); bounds errors naming the
global id, its position and the global V; per-shard IndexedSlices gradients equal to
tf.nn.embedding_lookup's; no traced graph ever holds the whole (V, D) table; the Keras
layer (its table a ShardedVariable, float32 and mixed_float16) serving and trained by a
custom loop on the coordinator, and the Keras EmbeddingBag serving; SavedModels of the sharded op and of the Keras model
(``keras.export_module``; each table one (V, D) variable) loaded and served in a fresh
process; and, in that process, model.fit under
MirroredStrategy over 3 logical CPUs equal to the native Embedding -> pooling model.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("portpicker")

import fused_embedding.tf as fused_tf  # noqa: E402
from fused_embedding.reference import embedding_bag_reference, embedding_mean_reference  # noqa: E402
from fused_embedding.validation import assert_close  # noqa: E402
from conftest import TEST_SEED  # noqa: E402

import sharded_cluster_job as job  # noqa: E402

pytestmark = pytest.mark.slow  # two fresh TF processes: 35-75 s on 2 shared cores
JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharded_cluster_job.py")


def _run_job(mode, out_dir):
    result = subprocess.run([sys.executable, JOB, mode, str(out_dir), str(TEST_SEED)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{mode} job failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    with open(out_dir / f"{mode}.json", encoding="utf-8") as f:
        return dict(np.load(out_dir / f"{mode}.npz")), json.load(f)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("sharded_cluster")
    cluster = _run_job("cluster", out_dir)
    mirrored = _run_job("mirrored", out_dir)  # loads the SavedModel the cluster job wrote
    return {"cluster": cluster, "mirrored": mirrored}


@pytest.fixture
def arrays(recorded):
    return recorded["cluster"][0]


@pytest.fixture
def meta(recorded):
    return recorded["cluster"][1]


@pytest.mark.parametrize("name", list(job.TABLES))
def test_partitioners_make_two_uneven_shards_one_per_parameter_server(arrays, meta, name):
    vocab, dim = job.TABLES[name]
    sizes = [rows for rows, _ in meta["shards"][name]]
    assert len(sizes) == 2 and sum(sizes) == vocab and sizes[0] != sizes[1], sizes
    assert [d for _, d in meta["shards"][name]] == [dim, dim]
    assert meta["devices"][name] == [f"/job:ps/replica:0/task:{i}/device:CPU:0" for i in range(2)]
    assert meta["sharded_type"] == "ShardedVariable"
    assert arrays[f"table.{name}"].shape == (vocab, dim)


@pytest.mark.parametrize("name", list(job.TABLES))
@pytest.mark.parametrize("axis", [1, 2])
@pytest.mark.parametrize("mask_zero", [False, True])
@pytest.mark.parametrize("id_dtype", ["int32", "int64"])
def test_dense_op_on_the_worker_matches_reference(arrays, name, axis, mask_zero, id_dtype):
    key = f"{name}.axis{axis}.mask{int(mask_zero)}.{id_dtype}"
    ids, out = arrays[f"ids.{key}"], arrays[f"out.{key}"]
    assert ids.dtype == np.dtype(id_dtype) and (ids[0] == 0).all()  # bag 0: all padding
    expected = embedding_mean_reference(arrays[f"table.{name}"], ids, axis=axis, mask_zero=mask_zero)
    assert out.shape == expected.shape and out.dtype == np.float32
    assert_close(out, expected, np.float32)
    if mask_zero and axis == 1:
        assert not out[0].any()  # an all-padding bag gives zeros


@pytest.mark.parametrize("name", list(job.TABLES))
def test_dense_op_equals_tf_embedding_lookup_on_the_same_sharded_variable(arrays, name):
    ours, theirs = arrays[f"out.{name}.fused_lookup"], arrays[f"out.{name}.tf_lookup"]
    assert_close(ours, theirs, np.float32, against="framework")
    assert_close(ours, embedding_mean_reference(arrays[f"table.{name}"], arrays[f"ids.{name}.tf_lookup"]),
                 np.float32)


def test_bags_of_no_ids(arrays):
    dim = job.TABLES["fixed"][1]
    assert arrays["out.empty.axis1"].shape == (4, dim) and not arrays["out.empty.axis1"].any()
    assert arrays["out.empty.axis2"].shape == (4, 0)


@pytest.mark.parametrize("combiner", ["mean", "sum", "sqrtn"])
def test_bags_drop_ins_match_unsharded_op(arrays, combiner):
    table = arrays["table.fixed"]
    values, weights, splits = arrays["bags.values"], arrays["bags.weights"], arrays["bags.splits"]
    ragged = (tf.RaggedTensor.from_row_splits(values, splits), tf.RaggedTensor.from_row_splits(weights, splits))
    unsharded = fused_tf.embedding_lookup_sparse(tf.constant(table), *ragged, combiner=combiner).numpy()
    ours = arrays[f"out.bags.{combiner}"]
    assert_close(ours, unsharded, np.float32)
    assert_close(ours, embedding_bag_reference(table, values, splits, weights, combiner), np.float32)
    assert not ours[1].any()  # the empty bag

    pruned_ids = np.where(np.arange(values.size) == 2, -1, values)
    sparse = (tf.RaggedTensor.from_row_splits(pruned_ids, splits).to_sparse(), ragged[1].to_sparse())
    unsharded = fused_tf.safe_embedding_lookup_sparse(tf.constant(table), *sparse, combiner=combiner).numpy()
    assert_close(arrays[f"out.safe_bags.{combiner}"], unsharded, np.float32)
    keep = pruned_ids >= 0
    kept_splits = np.concatenate([[0], np.cumsum(keep)])[splits]
    assert_close(arrays[f"out.safe_bags.{combiner}"],
                 embedding_bag_reference(table, values[keep], kept_splits, weights[keep], combiner), np.float32)


@pytest.mark.parametrize("case, pattern", [
    ("dense", r"id 23 at ids\[1, 2\] is out of range for a table of 23 rows"),
    ("dense_negative", r"id -4 at ids\[1, 4\] is out of range for a table of 23 rows"),
    ("bags", r"id 40 at values\[3\] \(bag 1\) is out of range for a table of 23 rows"),
])
def test_bounds_error_names_global_id_position_and_vocab(meta, case, pattern):
    # The table's shards have 12 and 11 rows: the message is about the global table.
    kind, message = meta["errors"][case]
    assert kind == "InvalidArgumentError"
    assert re.search(pattern, message), message[:1000]


def _expected_table_grad(table, ids, upstream, mask_zero):
    """float64 d(sum(mean_pool(table[ids]) * upstream)) / d table, [V][D]."""
    grad = np.zeros(table.shape)
    counted = ids != 0 if mask_zero else np.ones(ids.shape, bool)
    counts = np.maximum(counted.sum(1), 1)
    for b, l in zip(*np.nonzero(counted)):
        grad[ids[b, l]] += upstream[b] / counts[b]
    return grad


@pytest.mark.parametrize("name", ["fixed", "max_size"])
def test_gradients_are_per_shard_indexed_slices_equal_to_embedding_lookup(arrays, meta, name):
    sizes = [rows for rows, _ in meta["shards"][name]]
    assert meta["grad_types"][f"{name}.fused"] == ["IndexedSlices"] * 2
    assert meta["grad_types"][f"{name}.tf"] == ["IndexedSlices"] * 2
    expected = np.split(_expected_table_grad(arrays[f"table.{name}"], arrays[f"grad_ids.{name}"],
                                             arrays[f"grad_upstream.{name}"], False), [sizes[0]])
    for s in range(2):
        ours, theirs = arrays[f"grad.{name}.fused.{s}"], arrays[f"grad.{name}.tf.{s}"]
        assert ours.shape == (sizes[s], job.TABLES[name][1])
        assert_close(ours, theirs, np.float32, against="framework")
        assert_close(ours, expected[s], np.float32)


@pytest.mark.parametrize("graph", ["fixed", "min_size", "max_size", "keras", "keras_mixed", "keras_bag"])
def test_no_graph_assembles_the_whole_table(meta, graph):
    """No op in the traced graphs (forward and gradient) outputs a (V, D) tensor: each shard
    is pooled where it lives, the Keras layer included (its mixed-precision read too)."""
    assert meta["full_table_ops"][graph] == []


def test_keras_layer_table_is_a_sharded_variable(meta):
    for layer in ("pooled", "per_id", "mixed", "bag"):
        assert meta[f"keras_type.{layer}"] == "ShardedVariable"
        assert meta["shards"][f"keras.{layer}"] == meta["shards"]["fixed"]
    assert meta["shards"]["keras.train"] == meta["shards"]["fixed"]


@pytest.mark.parametrize("layer, axis, mask_zero, dtype", [
    ("pooled", 1, True, np.float32), ("per_id", 2, False, np.float32), ("mixed", 1, True, np.float16)])
def test_keras_layer_serves_on_the_worker(arrays, layer, axis, mask_zero, dtype):
    out = arrays[f"keras.out.{layer}"]
    expected = embedding_mean_reference(arrays[f"keras_table.{layer}"], arrays["keras.ids"], axis=axis,
                                        mask_zero=mask_zero)
    assert out.dtype == dtype
    assert_close(out, expected, dtype)


def test_keras_embedding_bag_serves_on_the_worker(arrays):
    ids = arrays["keras.ids"]                                     # each row one bag of L ids
    offsets = np.arange(ids.shape[0] + 1) * ids.shape[1]
    expected = embedding_bag_reference(arrays["keras_table.bag"], ids.reshape(-1), offsets, combiner="sqrtn")
    assert_close(arrays["keras.out.bag"], expected, np.float32)


def test_keras_custom_loop_training_updates_each_shard(arrays):
    for step in range(job.TRAIN_STEPS):
        before, after = arrays[f"train.before.{step}"], arrays[f"train.after.{step}"]
        grad = _expected_table_grad(before, arrays[f"train.ids.{step}"], arrays[f"train.upstream.{step}"], True)
        assert np.abs(after - before).max() > 0
        assert_close(after, before - job.LEARNING_RATE * grad, np.float32)
        if step:
            assert np.array_equal(before, arrays[f"train.after.{step - 1}"])


def test_keras_gradients_equal_embedding_lookup(arrays, meta):
    assert meta["grad_types"]["keras.fused"] == ["IndexedSlices"] * 2
    assert meta["grad_types"]["keras.tf"] == ["IndexedSlices"] * 2
    for s in range(2):
        assert_close(arrays[f"keras_grad.fused.{s}"], arrays[f"keras_grad.tf.{s}"], np.float32,
                     against="framework")


def test_saved_model_holds_one_full_table_and_serves_in_a_fresh_process(recorded):
    arrays, meta = recorded["cluster"]
    loaded, loaded_meta = recorded["mirrored"]
    assert meta["errors"]["save"] is None
    vocab, dim = job.SERVE_VOCAB, job.SERVE_DIM
    # TF writes the ShardedVariable as one (V, D) variable; it loads as one.
    assert loaded_meta["checkpoint_variables"] == [["table/.ATTRIBUTES/VARIABLE_VALUE", [vocab, dim]]]
    assert loaded_meta["loaded_table"][1] == [vocab, dim]
    assert np.array_equal(loaded["loaded_table"], arrays["table.fixed"])
    ids = arrays["serve.ids"]
    for endpoint, axis, mask_zero in (("pooled", 1, True), ("per_id", 2, False)):
        expected = embedding_mean_reference(arrays["table.fixed"], ids, axis=axis, mask_zero=mask_zero)
        assert_close(loaded[f"serve.{endpoint}"], expected, np.float32)
        assert_close(arrays[f"serve.{endpoint}"], expected, np.float32)
    # The served graph is the sharded op's export form: TF's gather and segment sum over
    # the one loaded variable, no Python op (and no compiled op: it loads with TF alone).
    ops = set(loaded_meta["served_op_types"])
    assert not ops & {"PyFunc", "PyFuncStateless", "EagerPyFunc"}
    assert {"ResourceGather", "UnsortedSegmentSum"} <= ops and not any(op.startswith("Fused") for op in ops)


def test_keras_model_exported_by_export_module_serves_in_a_fresh_process(recorded):
    arrays, meta = recorded["cluster"]
    loaded, loaded_meta = recorded["mirrored"]
    assert meta["errors"]["save_keras"] is None
    dim = job.TABLES["fixed"][1]
    assert loaded_meta["loaded_keras_variables"] == [[job.TABLES["fixed"][0], dim]] * 2  # one variable each
    ids = arrays["serve_keras.ids"]
    for layer, axis, mask_zero in (("pooled", 1, True), ("per_id", 2, False)):
        expected = embedding_mean_reference(arrays[f"serve_keras.table.{layer}"], ids, axis=axis,
                                            mask_zero=mask_zero)
        assert_close(arrays[f"serve_keras.{layer}"], expected, np.float32)   # on the cluster
        assert_close(loaded[f"serve_keras.{layer}"], expected, np.float32)    # loaded, one host


def test_mirrored_strategy_fit_equals_native_keras(recorded):
    arrays, meta = recorded["mirrored"]
    assert meta["replicas"] == 3 and meta["variable_type"] == "MirroredVariable"
    table, kernel, ids = arrays["table"], arrays["kernel"], arrays["ids"]
    expected = embedding_mean_reference(table, ids, mask_zero=True) @ kernel.astype(np.float64)
    assert_close(arrays["predict.fused"], expected, np.float32)
    assert_close(arrays["predict.fused"], arrays["predict.native"], np.float32, against="framework")
    assert np.abs(arrays["trained_table.fused"] - table).max() > 1e-3  # fit moved the table
    assert_close(arrays["trained_table.fused"], arrays["trained_table.native"], np.float32, against="framework")
    assert_close(arrays["trained_kernel.fused"], arrays["trained_kernel.native"], np.float32,
                 against="framework")
