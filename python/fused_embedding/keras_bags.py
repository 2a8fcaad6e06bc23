"""The Keras layer ``EmbeddingBag``: a fused drop-in for keras-rs' ``EmbedReduce``.

keras-rs' ``EmbedReduce(input_dim, output_dim, combiner=...)`` embeds a bag of ids
and reduces it with TF's combiners ("mean", "sum", "sqrtn"), optionally weighted; it
gathers every (B, L, D) row first. ``EmbeddingBag`` takes the same arguments, holds
the same ``embeddings`` variable and gives the same results, through the fused CSR
bags op (``fused_embedding.tf.embedding_lookup_sparse``): each row is read once and
only the (B, D) result is written. ``fuse(model)`` swaps ``EmbedReduce`` layers for it.

Keras 3 with the TensorFlow backend only (the op is a TF op); keras-rs itself is not
needed to use this layer.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from . import tf as fused_tf  # (which brings tf_bags' sparse lookups; importing tf_bags first is a cycle)
from .keras import _read_in_place, _TableLayer
from .spec import Pooling


@keras.saving.register_keras_serializable(package="fused_embedding")
class EmbeddingBag(_TableLayer):
    """``Embedding(input_dim, output_dim)`` then a ``combiner`` over each bag, fused.

    Inputs, as ``keras_rs.layers.EmbedReduce`` takes them (int32 or int64 ids in
    [0, input_dim)):
      - (B, L) dense ids: each row is a bag of L ids (``mask_zero`` does not drop
        id 0 from the reduction, as in EmbedReduce; it only makes Keras' mask);
      - a (B, None) ``tf.RaggedTensor``: row b is bag b (an empty row gives zeros);
      - a (B, L) ``tf.SparseTensor`` in canonical order: row b's stored ids are bag b;
      - (B,) dense ids: bags of one id (no reduction).
    ``weights`` (optional, float): one per id, of the same form and shape as the
    ids (dense, ragged with the same row lengths, sparse with the same indices).
    For (B,) ids, as in EmbedReduce, weights count only under "sum".

    Output: (B, output_dim) in the layer's compute dtype, accumulated in float32.
    combiner: "mean" (weighted sum / sum of weights), "sum", "sqrtn" (weighted sum /
    sqrt of the sum of squared weights); a zero normaliser gives zeros. Ids outside
    [0, input_dim) raise (tf.errors.InvalidArgumentError naming the id, its position
    and its bag), negative ones included.
    """

    def __init__(self, input_dim, output_dim, embeddings_initializer="uniform",
                 embeddings_regularizer=None, embeddings_constraint=None, mask_zero=False,
                 combiner="mean", **kwargs):
        super().__init__(input_dim, output_dim, mask_zero, embeddings_initializer,
                         embeddings_regularizer, embeddings_constraint, **kwargs)
        self.combiner = Pooling.of(combiner).value

    def call(self, inputs, weights=None):
        ids, bag_weights = _as_bags(inputs, weights, self.combiner)
        out = fused_tf.embedding_lookup_sparse(_read_in_place(self.embeddings), ids, bag_weights,
                                              combiner=self.combiner)
        return keras.ops.cast(out, self.compute_dtype)

    def compute_output_shape(self, input_shape, weights_shape=None):
        return (tuple(input_shape)[0], self.output_dim)

    def compute_output_spec(self, inputs, weights=None):
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if dtype not in ("int32", "int64"):
            raise TypeError(f"{self.name} takes int32 or int64 ids, got {dtype} (float ids are not "
                            f"truncated as Embedding does): declare keras.Input(..., dtype='int32')")
        if len(inputs.shape) not in (1, 2):
            raise ValueError(f"{self.name} takes (batch,) or (batch, length) ids, got shape {inputs.shape}")
        if weights is not None and tuple(weights.shape) != tuple(inputs.shape):
            raise ValueError(f"{self.name} takes weights of the ids' shape {tuple(inputs.shape)}, got "
                             f"{tuple(weights.shape)}")
        return keras.KerasTensor(self.compute_output_shape(inputs.shape), dtype=self.compute_dtype)

    @classmethod
    def from_embed_reduce(cls, layer) -> "EmbeddingBag":
        """The EmbeddingBag for a built ``keras_rs.layers.EmbedReduce``, sharing its
        ``embeddings`` variable (no copy: both read, and train, the same table), with its
        name, combiner, ``mask_zero``, initializer, regularizers, constraint, dtype
        policy and ``trainable``. ValueError for an unbuilt layer or one this layer
        cannot stand for (``why_not_fusible``)."""
        return cls._sharing_table(layer, layer.combiner, layer.activity_regularizer, "EmbedReduce")

    @classmethod
    def from_ragged_pair(cls, embedding, pooling) -> "EmbeddingBag":
        """The EmbeddingBag (combiner "mean") for ``Embedding -> GlobalAveragePooling1D`` on
        ragged ids, where the pooling averages each row's own ids: the Embedding's table
        shared and its settings, the pooling's activity regularizer, as
        ``EmbeddingMean.from_layers`` takes them for dense ids."""
        return cls._sharing_table(embedding, "mean", pooling.activity_regularizer, "Embedding")

    @classmethod
    def _sharing_table(cls, layer, combiner, activity_regularizer, kind) -> "EmbeddingBag":
        if not layer.built:
            raise ValueError(f"the {kind} {layer.name!r} is not built yet: call it on ids "
                             f"(or build it) first, so that it has weights to carry over")
        reason = why_not_fusible(layer)
        if reason:
            raise ValueError(f"the {kind} {layer.name!r} cannot be fused: {reason}")
        table = layer.embeddings
        trainable = bool(layer.trainable and table.trainable)
        fused = cls(layer.input_dim, layer.output_dim, combiner=combiner,
                    mask_zero=bool(layer.mask_zero), embeddings_initializer=layer.embeddings_initializer,
                    embeddings_regularizer=layer.embeddings_regularizer,
                    embeddings_constraint=layer.embeddings_constraint,
                    activity_regularizer=activity_regularizer, dtype=layer.dtype_policy,
                    trainable=trainable, name=layer.name)
        fused._take_table(table, trainable)
        return fused

    def to_embed_reduce(self):
        """A new ``keras_rs.layers.EmbedReduce`` with this layer's settings and a copy of its table."""
        EmbedReduce = embed_reduce_class()
        if EmbedReduce is None:
            raise ImportError(f"{self.name}: the native form of an EmbeddingBag is keras-rs' EmbedReduce: "
                              f"pip install keras-rs")
        layer = EmbedReduce(self.input_dim, self.output_dim, combiner=self.combiner, mask_zero=self.mask_zero,
                            embeddings_initializer=self.embeddings_initializer,
                            embeddings_regularizer=self.embeddings_regularizer,
                            embeddings_constraint=self.embeddings_constraint,
                            activity_regularizer=self.activity_regularizer, dtype=self.dtype_policy,
                            trainable=bool(self.trainable and self.embeddings.trainable), name=self.name)
        layer.build((None, None))
        layer.embeddings.assign(self.embeddings)
        return layer

    def get_config(self):
        config = super().get_config()
        config.update(combiner=self.combiner)
        return config


def embed_reduce_class():
    """keras-rs' EmbedReduce, or None where keras-rs is not installed."""
    try:
        from keras_rs.layers import EmbedReduce
    except ImportError:
        return None
    return EmbedReduce


def why_not_fusible(layer) -> str | None:
    """Why an EmbeddingBag cannot stand for this EmbedReduce (or Embedding), or None when it can."""
    if layer.quantization_mode:
        return f"its table is quantized ({layer.quantization_mode}); only float tables are fused so far"
    if getattr(layer, "lora_enabled", False):
        return ("it has LoRA weights (its table is embeddings plus a scaled lora_embeddings_a @ "
                "lora_embeddings_b, which the fused op does not compute)")
    return None


def _as_bags(inputs, weights, combiner: str):
    """(ids, weights) as the sparse lookup takes them: a RaggedTensor or SparseTensor of
    ids and None or weights of the same kind and layout."""
    if isinstance(inputs, (tf.RaggedTensor, tf.SparseTensor)):
        if weights is not None and not isinstance(weights, type(inputs)):
            raise TypeError(f"weights for {type(inputs).__name__} ids must be a {type(inputs).__name__} "
                            f"of the same layout, got {type(weights).__name__}")
        if weights is not None:
            weights = _with_float_values(weights)
        return inputs, weights
    inputs = tf.convert_to_tensor(inputs)
    if inputs.shape.rank == 1:  # bags of one id; EmbedReduce weighs them only under "sum"
        inputs = inputs[:, None]
        weights = None if weights is None or combiner != "sum" else tf.convert_to_tensor(weights)[:, None]
    elif inputs.shape.rank != 2:
        raise ValueError(f"ids must be (batch,) or (batch, length), got shape {inputs.shape}")
    elif weights is not None:
        weights = tf.convert_to_tensor(weights)
        if weights.shape.rank != 2:
            raise ValueError(f"weights must have the ids' shape {inputs.shape}, got {weights.shape}")
    ids = tf.RaggedTensor.from_tensor(inputs)  # every row a bag of L ids: row_splits 0, L, 2L, ...
    return ids, None if weights is None else _with_float_values(tf.RaggedTensor.from_tensor(weights))


def _with_float_values(weights):
    if not weights.dtype.is_floating:
        raise TypeError(f"weights must be floating point, got {weights.dtype.name}")
    return weights
