"""The Keras layer ``EmbeddingMean`` and the model rewrites ``fuse`` / ``unfuse``.

``EmbeddingMean`` is one layer for the pair ``Embedding -> GlobalAveragePooling1D``:
it owns the (input_dim, output_dim) ``embeddings`` variable and calls the fused
TF op on it. ``fuse(model)`` swaps every such pair in a model for one; ``unfuse``
swaps them back (native Keras layers, for tools that need them).

Each rewrite keeps the pair's settings: the Embedding's name (``get_layer`` finds
the fused layer under it), ``trainable``, dtype policy, ``mask_zero``, initializer,
regularizer and constraint, and the pooling's ``activity_regularizer``. A pair whose
settings one EmbeddingMean cannot express is left native, with a warning on the
``fused_embedding`` logger that says why (``_why_not_fusible``).

Keras 3 with the TensorFlow backend only (the op is a TF op).
"""
from __future__ import annotations

import logging

import keras
import numpy as np

from . import tf as fused_tf
from . import tf_sharded

log = logging.getLogger("fused_embedding")

_DATA_FORMATS = {"channels_last": 1, "channels_first": 2}


def _check_backend():
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(f"fused_embedding.keras needs Keras' TensorFlow backend, this Keras runs "
                           f"on {keras.backend.backend()!r} (set KERAS_BACKEND=tensorflow)")


def _read_in_place(variable):
    """The table as stored: the backing tf.Variable, never a per-call cast copy.

    Keras casts a mixed-precision layer's variables on every read (whatever the
    layer's own ``autocast`` says), which for a table means copying all of it per
    call; the backing tf.Variable (same handle, so gradients still reach it) is read
    as it is instead, and only the small output is cast.

    A row-sharded table (the ShardedVariable a ``ParameterServerStrategy`` with a
    ``variable_partitioner`` makes) is passed as it is, so that each shard pools its own
    rows where it lives (``tf_sharded``); Keras' ``variable.value`` would cast, and so
    concatenate, all of it in one place.
    """
    import tensorflow as tf
    backing = getattr(variable, "_value", None)
    if isinstance(backing, tf.Variable) or tf_sharded.is_sharded(backing):
        return backing
    return variable.value


def tape_variables(variables) -> list:
    """The tf.Variables a ``tf.GradientTape`` takes gradients for, for Keras ``variables``:
    each shard of a sharded one (in order), else the backing tf.Variable.

    Under ``ParameterServerStrategy`` Keras 3 gives the tape a ShardedVariable's
    ``.handle``, which it has not (AttributeError); the shards themselves are what the
    fused layer reads, and each gets its own IndexedSlices, as ``tf.nn.embedding_lookup``
    gives them. Apply them per shard (``shard.scatter_sub``, ...) in a custom loop.
    """
    import tensorflow as tf
    out = []
    for variable in variables:
        backing = getattr(variable, "_value", variable)
        if tf_sharded.is_sharded(backing):
            out.extend(backing.variables if hasattr(backing, "variables") else backing)
        else:
            out.append(backing if isinstance(backing, tf.Variable) else variable)
    return out


def export_module(model, input_signature):
    """A ``tf.Module`` serving ``model`` (its ``serve`` endpoint), for ``tf.saved_model.save``,
    where Keras' own ``model.export`` cannot write the model: under ``ParameterServerStrategy``
    with a partitioner both ``model.export`` and ``model.save`` fail on the ShardedVariables
    (Keras 3's saver asks them for a ``.device`` / ``__array__`` they have not), whatever the
    layers.

    The module tracks the model's backing variables (the ShardedVariables themselves) and
    not the Keras model; TF writes each ShardedVariable as one full-shape variable, so the
    SavedModel serves on one host. Make it right before saving: its function is traced
    by the saver, so it holds the op's export form (no device placements).

    Args:
      model: a built Keras model (TensorFlow backend).
      input_signature: the ``tf.TensorSpec`` list of ``serve``'s arguments.
    """
    import tensorflow as tf
    module = tf.Module()
    module.model_variables = [getattr(variable, "_value", variable) for variable in model.weights]
    module.serve = tf.function(lambda *inputs: model(*inputs), input_signature=input_signature)
    return module


def pooled_output_spec(layer, inputs):
    """The (B, output_dim) or (B, L) KerasTensor of a fused pooling layer (``layer.axis``,
    ``layer.output_dim``) on symbolic ids, checked here, at functional construction, before
    any data: int32 / int64 (float ids are refused, not truncated as Embedding does), rank 2."""
    dtype = keras.backend.standardize_dtype(inputs.dtype)
    if dtype not in ("int32", "int64"):
        raise TypeError(f"{layer.name} takes int32 or int64 ids, got {dtype} (float ids are not "
                        f"truncated as Embedding does): declare keras.Input(..., dtype='int32')")
    if len(inputs.shape) != 2:
        raise ValueError(f"{layer.name} takes (batch, length) ids, got shape {inputs.shape}")
    batch, length = inputs.shape
    shape = (batch, layer.output_dim) if layer.axis == 1 else (batch, length)
    return keras.KerasTensor(shape, dtype=layer.compute_dtype)


class _TableLayer(keras.layers.Layer):
    """What the fused layers share: an (input_dim, output_dim) ``embeddings`` variable
    with its initializer, regularizer and constraint, ``mask_zero``, their checks and
    config, and taking over another layer's table."""

    def __init__(self, input_dim, output_dim, mask_zero, embeddings_initializer,
                 embeddings_regularizer, embeddings_constraint, **kwargs):
        _check_backend()
        super().__init__(**kwargs)
        for arg, value in (("input_dim", input_dim), ("output_dim", output_dim)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        if not isinstance(mask_zero, (bool, np.bool_)):
            raise TypeError(f"mask_zero must be a bool, got {type(mask_zero).__name__} {mask_zero!r}")
        self.input_dim = int(input_dim)
        self.output_dim = int(output_dim)
        self.mask_zero = bool(mask_zero)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.embeddings_regularizer = keras.regularizers.get(embeddings_regularizer)
        self.embeddings_constraint = keras.constraints.get(embeddings_constraint)
        # XLA compiles neither the op's compiled kernel (a custom op with no XLA lowering)
        # nor its Python-function ops: keep Keras' jit_compile="auto" off.
        self.supports_jit = False

    def build(self, input_shape=None):
        if self.built:
            return
        self.embeddings = self.add_weight(
            shape=(self.input_dim, self.output_dim), initializer=self.embeddings_initializer,
            name="embeddings", regularizer=self.embeddings_regularizer,
            constraint=self.embeddings_constraint, trainable=True)
        self.built = True

    def compute_mask(self, inputs, mask=None):
        return None  # the pooled output has no sequence axis left to mask

    def get_config(self):
        config = super().get_config()
        config.update(
            input_dim=self.input_dim, output_dim=self.output_dim, mask_zero=self.mask_zero,
            embeddings_initializer=keras.initializers.serialize(self.embeddings_initializer),
            embeddings_regularizer=keras.regularizers.serialize(self.embeddings_regularizer),
            embeddings_constraint=keras.constraints.serialize(self.embeddings_constraint))
        return config

    def _take_table(self, table, trainable: bool) -> None:
        """Use ``table`` (another layer's variable, no copy) as this layer's, built.

        Tracked among the layer's trainable variables, as add_weight tracks the
        Embedding's, so that a later ``layer.trainable = True`` reaches it; a layer that
        is not trainable freezes it again as it tracks it."""
        table.trainable = True
        try:
            self.embeddings = table
        finally:
            table.trainable = trainable
        self.built = True


@keras.saving.register_keras_serializable(package="fused_embedding")
class EmbeddingMean(_TableLayer):
    """``Embedding(input_dim, output_dim) -> GlobalAveragePooling1D(data_format)`` in one fused layer.

    Input: (B, L) int32 or int64 ids in [0, input_dim) (declare the Input with an
    integer dtype: float ids are refused, not truncated as Embedding does).
    Output: (B, output_dim) for ``data_format="channels_last"`` (the mean over the
    L ids), (B, L) for ``"channels_first"`` (the mean over each id's features), in
    the layer's compute dtype; accumulated in float32.

    Beside Keras' pair: with ``mask_zero=True`` a bag of nothing but padding gives
    zeros (Keras: NaN), and ``channels_first`` gives 0 at padding positions (Keras'
    pooling fails there unless L == output_dim). Ids outside [0, input_dim) raise
    (tf.errors.InvalidArgumentError naming the id), negative ones included.

    The table is read where it lives: with a mixed-precision policy it is not cast
    per call; only the output is cast to the compute dtype.
    """

    def __init__(self, input_dim, output_dim, data_format="channels_last", mask_zero=False,
                 embeddings_initializer="uniform", embeddings_regularizer=None,
                 embeddings_constraint=None, backend=None, **kwargs):
        super().__init__(input_dim, output_dim, mask_zero, embeddings_initializer,
                         embeddings_regularizer, embeddings_constraint, **kwargs)
        if data_format not in _DATA_FORMATS:
            raise ValueError(f"data_format must be 'channels_last' or 'channels_first', got {data_format!r}")
        self.data_format = data_format
        self.backend = backend
        self.input_spec = keras.layers.InputSpec(ndim=2)

    @property
    def axis(self) -> int:
        return _DATA_FORMATS[self.data_format]

    def call(self, inputs):
        out = fused_tf.embedding_mean(_read_in_place(self.embeddings), inputs, axis=self.axis,
                                      mask_zero=self.mask_zero, backend=self.backend)
        return keras.ops.cast(out, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        if len(tuple(input_shape)) != 2:
            raise ValueError(f"EmbeddingMean takes ids of shape (batch, length), got shape {tuple(input_shape)}")
        batch, length = tuple(input_shape)
        return (batch, self.output_dim) if self.axis == 1 else (batch, length)

    def compute_output_spec(self, inputs):
        return pooled_output_spec(self, inputs)

    def get_config(self):
        config = super().get_config()
        config.update(data_format=self.data_format, backend=self.backend)
        return config

    @classmethod
    def from_layers(cls, embedding, pooling, name=None, backend=None) -> "EmbeddingMean":
        """One EmbeddingMean for a built ``Embedding -> GlobalAveragePooling1D`` pair.

        It shares the Embedding's (input_dim, output_dim) ``embeddings`` variable (no
        copy of the table): both layers then read, and train, the same weights. It
        takes the Embedding's name (unless ``name`` is given), ``mask_zero``,
        initializer, regularizer, constraint, dtype policy and ``trainable`` (a frozen
        table stays frozen, and ``layer.trainable = True`` unfreezes it as it would the
        Embedding), and the pooling's ``data_format`` and ``activity_regularizer``
        (applied to this layer's (B, output_dim) / (B, L) output, which is the
        pooling's).

        Raises TypeError for other layer types, and ValueError for an unbuilt
        Embedding, a ``keepdims=True`` pooling, or a pair one EmbeddingMean cannot
        stand for (the reason ``fuse`` gives when it leaves such a pair native).
        """
        if not isinstance(embedding, keras.layers.Embedding):
            raise TypeError(f"embedding must be a keras.layers.Embedding, got {type(embedding).__name__}")
        if not isinstance(pooling, keras.layers.GlobalAveragePooling1D):
            raise TypeError(f"pooling must be a keras.layers.GlobalAveragePooling1D, "
                            f"got {type(pooling).__name__}")
        if getattr(pooling, "keepdims", False):
            raise ValueError(f"the pooling {pooling.name!r} has keepdims=True ((B, 1, D) out); "
                             f"EmbeddingMean gives (B, D) / (B, L)")
        if not embedding.built:
            raise ValueError(f"the Embedding {embedding.name!r} is not built yet: call it on ids "
                             f"(or build it) first, so that it has weights to carry over")
        reason = _why_not_fusible(embedding, pooling)
        if embedding.quantization_mode == "int8":
            reason = ("its table is quantized (int8): keras_quantized.QuantizedEmbeddingMean.from_layers "
                      "fuses it (fuse does)")
        if reason:
            raise ValueError(f"the Embedding {embedding.name!r} -> {pooling.name!r} pair cannot be "
                             f"fused: {reason}")
        table = embedding.embeddings
        trainable = bool(embedding.trainable and table.trainable)
        layer = cls(embedding.input_dim, embedding.output_dim, data_format=pooling.data_format,
                    mask_zero=bool(embedding.mask_zero),
                    embeddings_initializer=embedding.embeddings_initializer,
                    embeddings_regularizer=embedding.embeddings_regularizer,
                    embeddings_constraint=embedding.embeddings_constraint,
                    activity_regularizer=pooling.activity_regularizer,
                    backend=backend, dtype=embedding.dtype_policy, trainable=trainable,
                    name=name or embedding.name)
        layer._take_table(table, trainable)
        return layer

    def to_layers(self, embedding_name=None, pooling_name=None
                  ) -> tuple[keras.layers.Embedding, keras.layers.GlobalAveragePooling1D]:
        """The native pair (new layers; the Embedding gets a copy of this layer's table).

        Named ``embedding_name`` (default: this layer's name, so ``get_layer`` finds
        the table under the same name) and ``pooling_name`` (default
        ``<name>_pooling``); both take this layer's dtype policy, the Embedding its
        ``trainable``, ``mask_zero``, initializer, regularizer and constraint, the
        pooling its ``activity_regularizer``.
        """
        if self.mask_zero and self.data_format == "channels_first":
            raise ValueError(f"{self.name}: Keras' GlobalAveragePooling1D(data_format='channels_first') "
                             f"cannot take Embedding(mask_zero=True)'s mask (it fails unless L equals "
                             f"output_dim), so this layer has no native equivalent")
        embedding = keras.layers.Embedding(
            self.input_dim, self.output_dim, mask_zero=self.mask_zero,
            embeddings_initializer=self.embeddings_initializer,
            embeddings_regularizer=self.embeddings_regularizer,
            embeddings_constraint=self.embeddings_constraint,
            trainable=bool(self.trainable and self.embeddings.trainable),
            dtype=self.dtype_policy, name=embedding_name or self.name)
        embedding.build((None, None))
        embedding.embeddings.assign(self.embeddings)
        pooling = keras.layers.GlobalAveragePooling1D(
            data_format=self.data_format, activity_regularizer=self.activity_regularizer,
            dtype=self.dtype_policy, name=pooling_name or f"{self.name}_pooling")
        return embedding, pooling


def _why_not_fusible(embedding, pooling) -> str | None:
    """Why one EmbeddingMean cannot stand for this ``Embedding -> GlobalAveragePooling1D``
    pair, or None when it can."""
    if embedding.quantization_mode and embedding.quantization_mode != "int8":
        return (f"its table is quantized ({embedding.quantization_mode}); float tables and Keras' "
                f"int8 are fused so far")
    if getattr(embedding, "lora_enabled", False):
        return ("it has LoRA weights (its table is embeddings plus a scaled lora_embeddings_a @ "
                "lora_embeddings_b, which the fused op does not compute)")
    if embedding.activity_regularizer is not None:
        return ("its activity_regularizer adds a loss on its (B, L, D) output, which the fused "
                "layer never makes")
    if embedding.compute_dtype != pooling.compute_dtype:
        return (f"the Embedding computes in {embedding.compute_dtype} and the pooling in "
                f"{pooling.compute_dtype} (the pair gives {pooling.compute_dtype}); one "
                f"EmbeddingMean has one dtype policy")
    return None


def _left_native(embedding, pooling) -> bool:
    """True, with a warning saying why, when fuse must leave this pair as it is."""
    reason = _why_not_fusible(embedding, pooling)
    if reason:
        log.warning("fuse: left %r -> %r as native Keras layers: %s", embedding.name, pooling.name, reason)
    return reason is not None


def _unique_name(base, taken) -> str:
    """``base``, or ``base_1``, ``base_2``, ...: the first not in ``taken`` (which it joins)."""
    name, n = base, 0
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


def _fusible_pairs(model) -> dict:
    """{id(pooling): (embedding, pooling)} for each Embedding whose output feeds only a GAP1D."""
    model_outputs = {id(t) for t in model.outputs}
    # A pooling computing in another dtype leaves an unused Cast node on the Embedding
    # (its autocast, traced while the model was built): only the model's own count.
    operations = {id(operation) for operation in model.operations}
    pairs = {}
    for layer in model.layers:
        if not isinstance(layer, keras.layers.Embedding) or len(layer._inbound_nodes) != 1:
            continue
        consumers = [node for node in layer._outbound_nodes if id(node.operation) in operations]
        if len(consumers) != 1 or not isinstance(consumers[0].operation, keras.layers.GlobalAveragePooling1D):
            continue
        pooling = consumers[0].operation
        if getattr(pooling, "keepdims", False):
            continue  # (B, 1, D) out: not what EmbeddingMean gives
        if len(pooling._inbound_nodes) != 1 or id(layer.output) in model_outputs:
            continue  # shared pooling, or the embeddings are also a model output
        if _left_native(layer, pooling):
            continue
        pairs[id(pooling)] = (layer, pooling)
    return pairs


def _check_int_ids(tensor, layer, hint=""):
    """TypeError unless ``tensor`` (the ids fed to the Embedding ``layer``) is int32 / int64."""
    dtype = keras.backend.standardize_dtype(tensor.dtype)
    if dtype not in ("int32", "int64"):
        raise TypeError(f"cannot fuse {layer.name!r}: its ids are {dtype}, expected int32 or int64 "
                        f"(Embedding truncates float ids, EmbeddingMean refuses them){hint}; build "
                        f"the model on keras.Input(..., dtype='int32')")


def fuse(model, backend=None):
    """A model with every ``Embedding -> GlobalAveragePooling1D`` pair replaced by an EmbeddingMean.

    Functional and Sequential models (nested models are left as they are). An
    Embedding is fused when it is called once and its output goes to exactly one
    GlobalAveragePooling1D and nowhere else. Other layers are reused as they are
    (same objects, same weights); each EmbeddingMean shares its Embedding's
    variable and takes its name, so ``fused.get_layer("<embedding name>")`` is the
    EmbeddingMean that replaced it (``.embeddings`` the same (V, D) variable). The
    ids must be int32/int64 inputs.

    A pair one EmbeddingMean cannot stand for is left native (same layer objects),
    with a warning on the ``fused_embedding`` logger saying why: an Embedding quantized
    other than Keras' int8 (an int8 one becomes a ``keras_quantized.QuantizedEmbeddingMean``
    sharing its int8 table and scales), a LoRA Embedding, an Embedding with an ``activity_regularizer`` (its loss is on
    the (B, L, D) rows the fused layer never makes), or a pooling whose compute
    dtype is not the Embedding's.

    Each keras-rs ``EmbedReduce`` (dense, ragged or sparse ids, optional weights)
    becomes a ``keras_bags.EmbeddingBag`` sharing its variable and name; a quantized
    or LoRA one is left native, with a warning. So does a pair on ragged ids
    (``keras.Input(..., ragged=True)``): an EmbeddingBag averaging each row's ids.

    Returns a new model; ``model`` is unchanged. Outputs equal the original's up
    to float rounding, except where Keras gives NaN (all-padding bags: zeros here).
    """
    _check_backend()
    if isinstance(model, keras.Sequential):
        return _rewrite_sequential(model, _fuse_layer_list, backend)
    pairs = _fusible_pairs(model)
    embeddings = {id(embedding) for embedding, _ in pairs.values()}
    bag_layers = {}  # id(EmbedReduce) -> its EmbeddingBag, one per layer (a shared layer stays shared)

    def call_function(layer, *args, **kwargs):
        if id(layer) in embeddings:
            return args[0]  # the ids pass straight to the pooling's stand-in
        if id(layer) in pairs:
            embedding, pooling = pairs[id(layer)]
            _check_int_ids(args[0], embedding)
            # (The original model's tensor: clone_model's new inputs need not say they are ragged.)
            if getattr(embedding.input, "ragged", False):  # each row's own ids: a CSR bag, averaged
                return _ragged_pair_bag(embedding, pooling, args[0])
            return _fused_pair(embedding, pooling, backend)(args[0])
        bag = _embedding_bag_for(layer, bag_layers)
        if bag is not None:
            return bag(*args, **kwargs)
        return layer(*args, **kwargs)

    return keras.models.clone_model(model, clone_function=lambda layer: layer,
                                    call_function=call_function)


def unfuse(model):
    """The inverse of ``fuse``: every EmbeddingMean becomes ``Embedding -> GlobalAveragePooling1D``,
    every EmbeddingBag a keras-rs ``EmbedReduce``.

    Native Keras layers only, for tools that need them. Other layers are reused as
    they are. Each Embedding takes its EmbeddingMean's name (``get_layer`` finds the
    table under the same name before and after), its pooling ``<name>_pooling`` (or
    ``<name>_pooling_1``, ... where the model has that name already). Raises
    ValueError for a ``channels_first`` + ``mask_zero`` layer, which Keras' pooling
    cannot express.
    """
    _check_backend()
    if isinstance(model, keras.Sequential):
        return _rewrite_sequential(model, _unfuse_layer_list, None)
    taken = {layer.name for layer in model.layers}
    native_bags = {}  # id(EmbeddingBag) -> its EmbedReduce

    from .keras_quantized import QuantizedEmbeddingMean

    def call_function(layer, *args, **kwargs):
        if isinstance(layer, (EmbeddingMean, QuantizedEmbeddingMean)):
            embedding, pooling = layer.to_layers(
                pooling_name=_unique_name(f"{layer.name}_pooling", taken))
            return pooling(embedding(args[0]))
        if _is_embedding_bag(layer):
            if id(layer) not in native_bags:
                native_bags[id(layer)] = layer.to_embed_reduce()
            return native_bags[id(layer)](*args, **kwargs)
        return layer(*args, **kwargs)

    return keras.models.clone_model(model, clone_function=lambda layer: layer,
                                    call_function=call_function)


def _fused_pair(embedding, pooling, backend):
    """The fused layer for a fusible pair: an EmbeddingMean, or for an Embedding Keras
    quantized to int8 a QuantizedEmbeddingMean (keras_quantized.py, on the cpu kernels)."""
    if embedding.quantization_mode:
        from .keras_quantized import QuantizedEmbeddingMean
        return QuantizedEmbeddingMean.from_layers(embedding, pooling)
    return EmbeddingMean.from_layers(embedding, pooling, backend=backend)


def _fuse_layer_list(layers, backend):
    out, i = [], 0
    while i < len(layers):
        layer = layers[i]
        following = layers[i + 1] if i + 1 < len(layers) else None
        if (isinstance(layer, keras.layers.Embedding)
                and isinstance(following, keras.layers.GlobalAveragePooling1D)
                and not getattr(following, "keepdims", False)
                and not _left_native(layer, following)):
            out.append(_fused_pair(layer, following, backend))
            i += 2
        else:
            out.append(_embedding_bag_for(layer, {}) or layer)
            i += 1
    return out


def _ragged_pair_bag(embedding, pooling, ids):
    """``pooling(embedding(ids))`` on ragged ids, fused as an EmbeddingBag (mean) where it can
    stand for the pair, else the pair itself (with a warning): a mask_zero Embedding, whose
    padding the pooling would drop from each row."""
    from .keras_bags import EmbeddingBag
    if pooling.data_format != "channels_last" or embedding.mask_zero or embedding.quantization_mode:
        log.warning("fuse: left %r -> %r as native Keras layers: on ragged ids only a channels_last "
                    "pooling without mask_zero, on a float table, is fused", embedding.name, pooling.name)
        return pooling(embedding(ids))
    return EmbeddingBag.from_ragged_pair(embedding, pooling)(ids)


def _embedding_bag_for(layer, made):
    """The EmbeddingBag standing for ``layer`` when it is a keras-rs EmbedReduce that can be
    fused (made once per layer, kept in ``made``), else None (a warning says why not)."""
    from . import keras_bags
    embed_reduce = keras_bags.embed_reduce_class()
    if embed_reduce is None or not isinstance(layer, embed_reduce):
        return None
    if id(layer) not in made:
        reason = keras_bags.why_not_fusible(layer)
        if reason:
            log.warning("fuse: left %r as a native EmbedReduce: %s", layer.name, reason)
        made[id(layer)] = None if reason else keras_bags.EmbeddingBag.from_embed_reduce(layer)
    return made[id(layer)]


def _unfuse_layer_list(layers, _backend):
    taken = {layer.name for layer in layers}
    out = []
    from .keras_quantized import QuantizedEmbeddingMean
    for layer in layers:
        if isinstance(layer, (EmbeddingMean, QuantizedEmbeddingMean)):
            out.extend(layer.to_layers(pooling_name=_unique_name(f"{layer.name}_pooling", taken)))
        else:
            out.append(layer.to_embed_reduce() if _is_embedding_bag(layer) else layer)
    return out


def _is_embedding_bag(layer) -> bool:
    from .keras_bags import EmbeddingBag
    return isinstance(layer, EmbeddingBag)


def _rewrite_sequential(model, rewrite, backend):
    layers = rewrite(list(model.layers), backend)
    if not model.inputs:
        return keras.Sequential(layers, name=model.name)
    (model_input,) = model.inputs
    if layers and isinstance(layers[0], EmbeddingMean):
        # layers[0] carries the user's Embedding's name.
        _check_int_ids(model_input, layers[0], hint=" (a Sequential model built without a "
                                                    "keras.Input gets Keras' default float32 input)")
    new_input = keras.Input(batch_shape=model_input.shape, dtype=model_input.dtype)
    return keras.Sequential([new_input, *layers], name=model.name)
