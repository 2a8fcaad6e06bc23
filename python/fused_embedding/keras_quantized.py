"""``QuantizedEmbeddingMean``: Keras' int8-quantized ``Embedding -> GlobalAveragePooling1D``, fused.

Keras' ``Embedding.quantize("int8")`` keeps an int8 (V, D) ``embeddings`` table and a float32
(V,) ``embeddings_scale`` (value = q / scale). Its call gathers the B*L int8 rows, divides
them by their scales into a float (B, L, D) tensor, and the pooling reads that back. This
layer reads the same two variables in place (``fused_embedding.tf.TFQuantizedTable``): the
rows are dequantized as they are summed, in float32, and only the (B, D) or (B, L) result is
written. ``fuse(model)`` makes one for each such pair, sharing the Embedding's variables.

Inference only: the quantized variables are not trainable, as in Keras. In a graph in this
process the op runs through ``tf.numpy_function`` (tf_quantized.py); ``model.export`` writes
its native twin (gather, dequantize, masked mean), which TF alone serves.
"""
from __future__ import annotations

import keras

from . import tf as fused_tf
from .keras import _DATA_FORMATS, _check_backend, _read_in_place, pooled_output_spec

KERAS_INT8 = "int8"  # the Embedding.quantization_mode this layer stands for


@keras.saving.register_keras_serializable(package="fused_embedding")
class QuantizedEmbeddingMean(keras.layers.Layer):
    """Keras' int8 ``Embedding(input_dim, output_dim) -> GlobalAveragePooling1D(data_format)``.

    Weights: ``embeddings`` int8 (input_dim, output_dim) and ``embeddings_scale`` float32
    (input_dim,), Keras' int8 layout, not trainable.
    Input: (B, L) int32 or int64 ids in [0, input_dim).
    Output: (B, output_dim) for ``channels_last``, (B, L) for ``channels_first``, in the
    layer's compute dtype, accumulated in float32. With ``mask_zero`` an all-padding bag
    gives zeros (Keras: NaN). Ids outside [0, input_dim) raise InvalidArgumentError.
    """

    def __init__(self, input_dim, output_dim, data_format="channels_last", mask_zero=False, **kwargs):
        _check_backend()
        super().__init__(**kwargs)
        for arg, value in (("input_dim", input_dim), ("output_dim", output_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        if data_format not in _DATA_FORMATS:
            raise ValueError(f"data_format must be 'channels_last' or 'channels_first', got {data_format!r}")
        if not isinstance(mask_zero, bool):
            raise TypeError(f"mask_zero must be a bool, got {type(mask_zero).__name__} {mask_zero!r}")
        self.input_dim, self.output_dim = input_dim, output_dim
        self.data_format, self.mask_zero = data_format, mask_zero
        self.supports_jit = False  # numpy_function and the native twin's checks: no XLA
        self.input_spec = keras.layers.InputSpec(ndim=2)

    def build(self, input_shape=None):
        if self.built:
            return
        self.embeddings = self.add_weight(shape=(self.input_dim, self.output_dim), dtype="int8",
                                          initializer="zeros", name="embeddings", trainable=False)
        self.embeddings_scale = self.add_weight(shape=(self.input_dim,), dtype="float32",
                                                initializer="ones", name="embeddings_scale", trainable=False)
        self.built = True

    @property
    def axis(self) -> int:
        return _DATA_FORMATS[self.data_format]

    def call(self, inputs):
        table = fused_tf.TFQuantizedTable.from_keras_int8(_read_in_place(self.embeddings),
                                                          _read_in_place(self.embeddings_scale))
        out = fused_tf.embedding_mean(table, inputs, axis=self.axis, mask_zero=self.mask_zero)
        return keras.ops.cast(out, self.compute_dtype)

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_spec(self, inputs):
        return pooled_output_spec(self, inputs)

    def get_config(self):
        config = super().get_config()
        config.update(input_dim=self.input_dim, output_dim=self.output_dim, data_format=self.data_format,
                      mask_zero=self.mask_zero)
        return config

    @classmethod
    def from_layers(cls, embedding, pooling, name=None) -> "QuantizedEmbeddingMean":
        """One layer for a built ``Embedding`` quantized to int8 (``embedding.quantize("int8")``)
        and the ``GlobalAveragePooling1D`` it feeds, sharing the Embedding's two variables (no
        copy), its name (unless ``name``), ``mask_zero`` and the pooling's ``data_format``.
        The Embedding's compute dtype is the output's."""
        if not isinstance(embedding, keras.layers.Embedding) or embedding.quantization_mode != KERAS_INT8:
            mode = getattr(embedding, "quantization_mode", None)
            raise ValueError(f"expected a keras.layers.Embedding quantized to {KERAS_INT8!r}, got "
                             f"{type(embedding).__name__} with quantization_mode {mode!r}")
        if not isinstance(pooling, keras.layers.GlobalAveragePooling1D) or getattr(pooling, "keepdims", False):
            raise ValueError(f"expected a GlobalAveragePooling1D without keepdims, got {pooling!r}")
        layer = cls(embedding.input_dim, embedding.output_dim, data_format=pooling.data_format,
                    mask_zero=bool(embedding.mask_zero), name=name or embedding.name,
                    dtype=embedding.compute_dtype)
        layer.embeddings, layer.embeddings_scale = embedding._embeddings, embedding.embeddings_scale
        layer.built = True
        return layer

    def to_layers(self, pooling_name=None):
        """The native pair: a new Embedding quantized to int8 holding a copy of this layer's
        variables (Keras' own int8 call, NaN for all-padding bags), and its pooling."""
        embedding = keras.layers.Embedding(self.input_dim, self.output_dim, mask_zero=self.mask_zero,
                                           name=self.name, dtype=self.compute_dtype)
        embedding.build((None, None))
        embedding.quantize(KERAS_INT8)
        embedding._embeddings.assign(self.embeddings)
        embedding.embeddings_scale.assign(self.embeddings_scale)
        pooling = keras.layers.GlobalAveragePooling1D(data_format=self.data_format,
                                                      name=pooling_name or f"{self.name}_pooling",
                                                      dtype=self.compute_dtype)
        return embedding, pooling
