"""Row-sharded tables: a ``ShardedVariable`` (``ParameterServerStrategy`` with a
``variable_partitioner``) or a list of row-sharded variables (TF's "div" partitioning).

The entry points ``tf.embedding_mean`` and the sparse drop-ins in ``tf_bags`` hand
such tables here. For now they keep today's behaviour: the dense op reads the table
as one tensor, the sparse drop-ins run TF's own op.
"""
from __future__ import annotations

import tensorflow as tf


def is_sharded(table) -> bool:
    """A ShardedVariable, or a non-empty list / tuple of tf.Variables (row shards)."""
    from tensorflow.python.distribute.sharded_variable import ShardedVariable  # not in TF's public API
    if isinstance(table, ShardedVariable):
        return True
    return (isinstance(table, (list, tuple)) and len(table) > 0
            and all(isinstance(shard, tf.Variable) for shard in table))


def embedding_mean(table, ids, axis, mask_zero, backend, name):
    from . import tf as fused_tf
    return fused_tf.embedding_mean(tf.concat(list(table), axis=0) if isinstance(table, (list, tuple))
                                   else tf.convert_to_tensor(table), ids, axis, mask_zero, backend, name)


def embedding_lookup_sparse(params, sp_ids, sp_weights, combiner, name):
    return tf.nn.embedding_lookup_sparse(params, sp_ids, sp_weights, combiner=combiner, name=name)


def safe_embedding_lookup_sparse(embedding_weights, sparse_ids, sparse_weights, combiner, default_id, name):
    return tf.nn.safe_embedding_lookup_sparse(embedding_weights, sparse_ids, sparse_weights,
                                              combiner=combiner, default_id=default_id, name=name)
