"""Runs the fused ops on an in-process ParameterServerStrategy cluster and records what
they give, for tests/test_sharded_cluster.py to check (this script asserts nothing).

``python tests/sharded_cluster_job.py cluster OUT_DIR SEED``: starts the cluster
(tests/local_cluster.py: 2 parameter servers, 1 worker on localhost, this process the
coordinator), makes tables with each of TF's partitioners, runs every case on the
worker (``ClusterCoordinator.schedule``) and writes OUT_DIR/cluster.npz (inputs and
outputs) and OUT_DIR/cluster.json (shard shapes, types, error messages, the op types
of traced graphs); saves SavedModels of a tf.Module serving the op on the sharded table
(OUT_DIR/saved) and of the Keras model through ``fused_embedding.keras.export_module``
(OUT_DIR/saved_keras).

``python tests/sharded_cluster_job.py mirrored OUT_DIR SEED``: 3 logical CPU devices
(configured before TF initialises them), a Keras model with EmbeddingMean and its
native twin trained by ``model.fit`` under MirroredStrategy, then the SavedModels above
loaded and served in this fresh process; writes OUT_DIR/mirrored.npz / .json.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

BATCH, LENGTH = 6, 9
# (V, D, partitioner): two shards each, none of equal size.
TABLES = {"fixed": (23, 5), "min_size": (37, 6), "max_size": (29, 7)}
SERVE_VOCAB, SERVE_DIM = 23, 5       # the saved model's table: "fixed"
LEARNING_RATE = 0.5
TRAIN_STEPS = 3


def _partitioners(tf):
    partitioners = tf.distribute.experimental.partitioners
    return {"fixed": partitioners.FixedShardsPartitioner(2),
            "min_size": partitioners.MinSizePartitioner(min_shard_bytes=400, max_shards=2),  # 888 bytes
            "max_size": partitioners.MaxSizePartitioner(max_shard_bytes=500)}               # 812 bytes


def _ids(rng, vocab, dtype, batch=BATCH, length=LENGTH):
    """[B][L] ids with padding (0) here and there and bag 0 all padding."""
    ids = rng.integers(0, vocab, (batch, length)).astype(dtype)
    ids[rng.random(ids.shape) < 0.2] = 0
    ids[0] = 0
    return ids


def _full_table_ops(concrete, vocab, dim):
    """Op types in a traced graph (and its gradient functions) with a [V][D] output: where
    the whole table would be assembled in one place."""
    found = []
    graphs = [concrete.graph] + [f.graph for f in getattr(concrete.graph, "_functions", {}).values()
                                 if hasattr(f, "graph")]
    for graph in graphs:
        for op in graph.get_operations():
            if any(out.shape.rank == 2 and out.shape.as_list() == [vocab, dim] for out in op.outputs):
                if op.type not in ("VarHandleOp", "ReadVariableOp", "Placeholder"):
                    found.append(op.type)
    return found


def cluster(out_dir, seed):
    import local_cluster
    strategy, coordinator, switch = local_cluster.start(num_ps=2, num_workers=1)
    import tensorflow as tf
    import keras
    import fused_embedding.tf as fused_tf
    from fused_embedding.keras import EmbeddingMean, export_module, tape_variables
    from fused_embedding.keras_bags import EmbeddingBag

    rng = np.random.default_rng(seed)
    arrays, meta = {}, {"shards": {}, "devices": {}, "errors": {}, "grad_types": {}, "full_table_ops": {}}

    def run(fn, *args):
        return coordinator.schedule(fn, args=args).fetch()

    def traced(op, table, **kwargs):
        """tf.function(ids -> op(table, ids, **kwargs)), the table and settings bound."""
        return tf.function(lambda ids: op(table, ids, **kwargs))

    def tf_lookup_mean(table, ids):
        return tf.reduce_mean(tf.nn.embedding_lookup(table, ids), axis=1)

    def shard_values(variable):
        return np.concatenate([tf.convert_to_tensor(s).numpy() for s in variable.variables])

    tables = {}
    for name, (vocab, dim) in TABLES.items():
        initial = rng.standard_normal((vocab, dim)).astype(np.float32)
        with strategy.scope(), switch.using(_partitioners(tf)[name]):
            tables[name] = tf.Variable(initial, name=f"table_{name}")
        meta["shards"][name] = [list(s.shape) for s in tables[name].variables]
        meta["devices"][name] = [s.device for s in tables[name].variables]
        meta["sharded_type"] = type(tables[name]).__name__
        arrays[f"table.{name}"] = shard_values(tables[name])

    # Dense op: both axes, masks, int32 / int64 ids, on the worker.
    for name, variable in tables.items():
        vocab, dim = TABLES[name]
        for axis in (1, 2):
            for mask_zero in (False, True):
                fn = traced(fused_tf.embedding_mean, variable, axis=axis, mask_zero=mask_zero)
                for id_dtype in (np.int32, np.int64):
                    key = f"{name}.axis{axis}.mask{int(mask_zero)}.{np.dtype(id_dtype).name}"
                    ids = _ids(rng, vocab, id_dtype)
                    arrays[f"ids.{key}"] = ids
                    arrays[f"out.{key}"] = run(fn, tf.constant(ids))
        ids = _ids(rng, vocab, np.int64)
        arrays[f"ids.{name}.tf_lookup"] = ids
        arrays[f"out.{name}.tf_lookup"] = run(traced(tf_lookup_mean, variable), tf.constant(ids))
        arrays[f"out.{name}.fused_lookup"] = run(traced(fused_tf.embedding_mean, variable, axis=1),
                                                 tf.constant(ids))
        meta["full_table_ops"][name] = _full_table_ops(
            traced(fused_tf.embedding_mean, variable, axis=1, mask_zero=True).get_concrete_function(
                tf.TensorSpec([None, LENGTH], tf.int32)), vocab, dim)
    # Bags of no ids (L = 0).
    for axis in (1, 2):
        arrays[f"out.empty.axis{axis}"] = run(traced(fused_tf.embedding_mean, tables["fixed"], axis=axis),
                                              tf.zeros([4, 0], tf.int32))

    # Bags drop-ins: ragged ids with weights (an empty bag), sparse ids with a negative id.
    vocab = TABLES["fixed"][0]
    lengths = np.array([3, 0, 5, 1, 4])
    values = rng.integers(0, vocab, lengths.sum()).astype(np.int64)
    weights = rng.uniform(0.25, 2.0, lengths.sum()).astype(np.float32)
    splits = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    arrays.update({"bags.values": values, "bags.weights": weights, "bags.splits": splits})
    def bag_lookups(combiner):
        def lookup(v, w, s):
            return fused_tf.embedding_lookup_sparse(
                tables["fixed"], tf.RaggedTensor.from_row_splits(v, s),
                tf.RaggedTensor.from_row_splits(w, s), combiner=combiner)

        def safe_lookup(v, w, s):  # position 2's id made -1: dropped
            ids = tf.RaggedTensor.from_row_splits(tf.where(tf.range(tf.size(v)) == 2, tf.constant(-1, v.dtype), v),
                                                  s).to_sparse()
            return fused_tf.safe_embedding_lookup_sparse(
                tables["fixed"], ids, tf.RaggedTensor.from_row_splits(w, s).to_sparse(), combiner=combiner)
        return tf.function(lookup), tf.function(safe_lookup)

    for combiner in ("mean", "sum", "sqrtn"):
        args = (tf.constant(values), tf.constant(weights), tf.constant(splits))
        lookup, safe_lookup = bag_lookups(combiner)
        arrays[f"out.bags.{combiner}"] = run(lookup, *args)
        arrays[f"out.safe_bags.{combiner}"] = run(safe_lookup, *args)

    # Gradients: per shard, the fused op's against tf.nn.embedding_lookup's.
    for name in ("fixed", "max_size"):
        variable, (vocab, dim) = tables[name], TABLES[name]
        ids = _ids(rng, vocab, np.int32)
        upstream = rng.standard_normal((BATCH, dim)).astype(np.float32)
        arrays[f"grad_ids.{name}"], arrays[f"grad_upstream.{name}"] = ids, upstream

        def shard_grads(pool, v):
            def grads(i, up):
                with tf.GradientTape() as tape:
                    loss = tf.reduce_sum(pool(v, i) * up)
                return tape.gradient(loss, v.variables)
            return tf.function(grads)
        for who, pool in (("fused", lambda v, i: fused_tf.embedding_mean(v, i, axis=1)),
                          ("tf", lambda v, i: tf.reduce_mean(tf.nn.embedding_lookup(v, i), axis=1))):
            grads = run(shard_grads(pool, variable), tf.constant(ids), tf.constant(upstream))
            meta["grad_types"][f"{name}.{who}"] = [type(g).__name__ for g in grads]
            for s, g in enumerate(grads):
                arrays[f"grad.{name}.{who}.{s}"] = tf.convert_to_tensor(g).numpy()

    # Keras: EmbeddingMean under the strategy (its embeddings become a ShardedVariable).
    keras_vocab, keras_dim = TABLES["fixed"]
    with strategy.scope(), switch.using(_partitioners(tf)["fixed"]):
        inputs = keras.Input((LENGTH,), dtype="int32", name="ids")
        pooled = EmbeddingMean(keras_vocab, keras_dim, mask_zero=True, embeddings_initializer="normal",
                               name="pooled")
        per_id = EmbeddingMean(keras_vocab, keras_dim, data_format="channels_first",
                               embeddings_initializer="normal", name="per_id")
        model = keras.Model(inputs, [pooled(inputs), per_id(inputs)])
        mixed = EmbeddingMean(keras_vocab, keras_dim, mask_zero=True, dtype="mixed_float16", name="mixed")
        mixed_model = keras.Model(inputs, mixed(inputs))
        bag = EmbeddingBag(keras_vocab, keras_dim, combiner="sqrtn", embeddings_initializer="normal", name="bag")
        bag_model = keras.Model(inputs, bag(inputs))
    for layer in (pooled, per_id, mixed, bag):
        backing = layer.embeddings._value
        meta["shards"][f"keras.{layer.name}"] = [list(s.shape) for s in backing.variables]
        meta[f"keras_type.{layer.name}"] = type(backing).__name__
        arrays[f"keras_table.{layer.name}"] = shard_values(backing)
    ids = _ids(rng, keras_vocab, np.int32)
    arrays["keras.ids"] = ids
    serve = tf.function(lambda i: model(i))
    arrays["keras.out.pooled"], arrays["keras.out.per_id"] = run(serve, tf.constant(ids))
    serve_mixed = tf.function(lambda i: mixed_model(i))
    arrays["keras.out.mixed"] = run(serve_mixed, tf.constant(ids))
    serve_bag = tf.function(lambda i: bag_model(i))
    arrays["keras.out.bag"] = run(serve_bag, tf.constant(ids))
    for label, fn in (("keras", serve), ("keras_mixed", serve_mixed), ("keras_bag", serve_bag)):
        meta["full_table_ops"][label] = _full_table_ops(
            fn.get_concrete_function(tf.TensorSpec([None, LENGTH], tf.int32)), keras_vocab, keras_dim)

    # Training with a custom loop on the coordinator: SGD on each shard with its own
    # IndexedSlices (Keras' optimizers and model.fit do not run under this strategy).
    trained = tape_variables([pooled.embeddings])
    meta["shards"]["keras.train"] = [list(s.shape) for s in trained]

    def train_step(i, up):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(i)[0] * up)
        grads = tape.gradient(loss, trained)
        for shard, grad in zip(trained, grads):
            shard.scatter_sub(tf.IndexedSlices(LEARNING_RATE * grad.values, grad.indices, grad.dense_shape))
        return [g.indices for g in grads]
    train_step = tf.function(train_step)
    for step in range(TRAIN_STEPS):
        ids = _ids(rng, keras_vocab, np.int32)
        upstream = rng.standard_normal((BATCH, keras_dim)).astype(np.float32)
        arrays[f"train.before.{step}"] = shard_values(pooled.embeddings._value)
        arrays[f"train.ids.{step}"], arrays[f"train.upstream.{step}"] = ids, upstream
        run(train_step, tf.constant(ids), tf.constant(upstream))
        arrays[f"train.after.{step}"] = shard_values(pooled.embeddings._value)
    # The layer's per-shard gradients against tf.nn.embedding_lookup's (the same masked mean).
    ids = _ids(rng, keras_vocab, np.int32)
    upstream = rng.standard_normal((BATCH, keras_dim)).astype(np.float32)

    def lookup_mean(i):
        rows = tf.nn.embedding_lookup(pooled.embeddings._value, i)                    # [B][L][D]
        counted = tf.cast(tf.not_equal(i, 0), tf.float32)[:, :, None]
        return tf.reduce_sum(rows * counted, 1) / tf.maximum(tf.reduce_sum(counted, 1), 1.0)

    def layer_grads(pool):
        def grads(i, up):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(pool(i) * up)
            return tape.gradient(loss, trained)
        return tf.function(grads)

    for who, pool in (("fused", lambda i: model(i)[0]), ("tf", lookup_mean)):
        result = run(layer_grads(pool), tf.constant(ids), tf.constant(upstream))
        meta["grad_types"][f"keras.{who}"] = [type(g).__name__ for g in result]
        for s, g in enumerate(result):
            arrays[f"keras_grad.{who}.{s}"] = tf.convert_to_tensor(g).numpy()

    # Export: a tf.Module serving the fused op on the sharded table.
    class Served(tf.Module):
        def __init__(self, table):
            super().__init__()
            self.table = table

        @tf.function(input_signature=[tf.TensorSpec([None, LENGTH], tf.int32)])
        def pooled(self, ids):
            return fused_tf.embedding_mean(self.table, ids, axis=1, mask_zero=True)

        @tf.function(input_signature=[tf.TensorSpec([None, LENGTH], tf.int32)])
        def per_id(self, ids):
            return fused_tf.embedding_mean(self.table, ids, axis=2)

    served = Served(tables["fixed"])
    try:
        tf.saved_model.save(served, os.path.join(out_dir, "saved"))
        meta["errors"]["save"] = None
    except Exception as error:
        meta["errors"]["save"] = [type(error).__name__, str(error)[:2000]]
    # The Keras model (two EmbeddingMean outputs) through export_module.
    keras_module = export_module(model, [tf.TensorSpec([None, LENGTH], tf.int32)])
    try:
        tf.saved_model.save(keras_module, os.path.join(out_dir, "saved_keras"))
        meta["errors"]["save_keras"] = None
    except Exception as error:
        meta["errors"]["save_keras"] = [type(error).__name__, str(error)[:2000]]
    keras_ids = _ids(rng, keras_vocab, np.int32)
    arrays["serve_keras.ids"] = keras_ids
    arrays["serve_keras.pooled"], arrays["serve_keras.per_id"] = run(keras_module.serve, tf.constant(keras_ids))
    for layer in (pooled, per_id):
        arrays[f"serve_keras.table.{layer.name}"] = shard_values(layer.embeddings._value)
    ids = _ids(rng, SERVE_VOCAB, np.int32)
    arrays["serve.ids"] = ids
    arrays["serve.pooled"] = run(served.pooled, tf.constant(ids))
    arrays["serve.per_id"] = run(served.per_id, tf.constant(ids))

    # Bounds errors, last: the coordinator raises a failed function's error again at the
    # next call, so each failure is cleared by the join after it.
    bad = _ids(rng, TABLES["fixed"][0], np.int32)
    bad[1, 2] = TABLES["fixed"][0]
    for key, fn, args in (
            ("dense", tf.function(lambda i: fused_tf.embedding_mean(tables["fixed"], i, axis=1)),
             (tf.constant(bad),)),
            ("dense_negative", tf.function(lambda i: fused_tf.embedding_mean(tables["fixed"], i, axis=2)),
             (tf.constant(np.where(np.arange(bad.size).reshape(bad.shape) == 13, -4, bad % 23)),)),
            ("bags", tf.function(lambda v, s: fused_tf.embedding_lookup_sparse(
                tables["fixed"], tf.RaggedTensor.from_row_splits(v, s), None)),
             (tf.constant([1, 2, 3, 40, 5], tf.int64), tf.constant([0, 2, 5], tf.int64)))):
        try:
            run(fn, *args)
            meta["errors"][key] = None
        except Exception as error:  # recorded, checked by the tests
            meta["errors"][key] = [type(error).__name__, str(error)[:2000]]
        try:
            coordinator.join()
        except Exception:  # the same error, raised once more
            pass

    np.savez(os.path.join(out_dir, "cluster.npz"), **arrays)
    with open(os.path.join(out_dir, "cluster.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)


def mirrored(out_dir, seed):
    import tensorflow as tf
    cpu, = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 3)
    import keras
    from fused_embedding.keras import EmbeddingMean

    rng = np.random.default_rng(seed)
    arrays, meta = {}, {}
    strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    meta["replicas"] = strategy.num_replicas_in_sync
    vocab, dim, examples = 31, 6, 24
    table = rng.standard_normal((vocab, dim)).astype(np.float32)
    kernel = rng.standard_normal((dim, 1)).astype(np.float32)
    ids = rng.integers(1, vocab, (examples, LENGTH)).astype(np.int32)
    ids[rng.random(ids.shape) < 0.3] = 0
    ids[:, 0] = rng.integers(1, vocab, examples)        # no all-padding bag: Keras gives NaN there
    targets = rng.standard_normal((examples, 1)).astype(np.float32)
    arrays.update(table=table, kernel=kernel, ids=ids, targets=targets)
    with strategy.scope():
        def build(fused):
            inputs = keras.Input((LENGTH,), dtype="int32")
            if fused:
                pooled = EmbeddingMean(vocab, dim, mask_zero=True, name="table")(inputs)
            else:
                pooled = keras.layers.GlobalAveragePooling1D()(
                    keras.layers.Embedding(vocab, dim, mask_zero=True, name="table")(inputs))
            model = keras.Model(inputs, keras.layers.Dense(1, use_bias=False, name="dense")(pooled))
            model.get_layer("table").embeddings.assign(table)
            model.get_layer("dense").kernel.assign(kernel)
            model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), loss="mse")
            return model
        models = {"fused": build(True), "native": build(False)}
    meta["variable_type"] = type(models["fused"].get_layer("table").embeddings._value).__name__
    for name, model in models.items():
        arrays[f"predict.{name}"] = model.predict(ids, batch_size=12, verbose=0)
        model.fit(ids, targets, batch_size=12, epochs=2, shuffle=False, verbose=0)
        arrays[f"trained_table.{name}"] = model.get_layer("table").embeddings.numpy()
        arrays[f"trained_kernel.{name}"] = model.get_layer("dense").kernel.numpy()

    # The SavedModel the cluster job wrote, loaded and served here.
    import fused_embedding.tf as fused_tf
    fused_tf.load_ops()
    served = tf.saved_model.load(os.path.join(out_dir, "saved"))
    meta["loaded_table"] = [type(served.table).__name__, list(served.table.shape)]
    meta["checkpoint_variables"] = [[name, list(shape)] for name, shape in tf.train.list_variables(
        os.path.join(out_dir, "saved", "variables", "variables")) if "table" in name]
    recorded = np.load(os.path.join(out_dir, "cluster.npz"))
    arrays["serve.pooled"] = served.pooled(tf.constant(recorded["serve.ids"])).numpy()
    arrays["serve.per_id"] = served.per_id(tf.constant(recorded["serve.ids"])).numpy()
    arrays["loaded_table"] = served.table.numpy()
    served_keras = tf.saved_model.load(os.path.join(out_dir, "saved_keras"))
    arrays["serve_keras.pooled"], arrays["serve_keras.per_id"] = (
        out.numpy() for out in served_keras.serve(tf.constant(recorded["serve_keras.ids"])))
    meta["loaded_keras_variables"] = [list(v.shape) for v in served_keras.model_variables]
    graph_defs = [f.get_concrete_function().graph.as_graph_def() for f in (served.pooled, served.per_id)]
    meta["served_op_types"] = sorted({node.op for g in graph_defs for node in g.node}
                                     | {node.op for g in graph_defs for f in g.library.function
                                        for node in f.node_def})
    np.savez(os.path.join(out_dir, "mirrored.npz"), **arrays)
    with open(os.path.join(out_dir, "mirrored.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # local_cluster
    mode, out, seed_arg = sys.argv[1:4]
    {"cluster": cluster, "mirrored": mirrored}[mode](out, int(seed_arg))
