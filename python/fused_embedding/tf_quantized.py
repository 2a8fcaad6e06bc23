"""The TF op on quantized tables: ``fused_embedding.tf.embedding_mean(qtable, ids, ...)``.

``qtable`` is either

- a ``fused_embedding.QuantizedTable`` (NumPy, frozen: ``quantize_table``, ``rowwise``,
  ``from_keras_int8``), read in place, never copied; or
- a ``TFQuantizedTable``: the same formats with TF tensors or ``tf.Variable``s for data and
  parameters, e.g. Keras' own int8 Embedding's ``embeddings`` and ``embeddings_scale``
  (``TFQuantizedTable.from_keras_int8``).

Forms, as the float op has them (tf.py):

- eagerly, the cpu kernels (kernels/cpu_quant.py) run in place on the tensors' buffers;
- in a ``tf.function`` in this process, a ``tf.numpy_function`` around the same kernels
  (no compiled TF kernel for quantized rows yet: about 0.5 ms of round trip a call); the
  graph refuses to be saved, as the float op's Python bodies do;
- traced for export (``tf.saved_model.save``, ``model.export``, ``native_ops()``), the
  native twin: TF gathers the B*L quantized rows, dequantizes them in float32 and takes
  the masked mean. It loads with TF alone, at TF's speed, with the same results within
  float32 rounding, the same bounds message and zeros for empty bags.

Results are float32 (the format's output dtype), (B, D) for axis 1 and (B, L) for axis 2.
No gradient: quantized tables are for inference.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from . import quantized
from .quantized import QuantizedTable
from .semantics import Axis, output_shape
from .spec import TableFormat
from .tf_variables import read_without_copy

_STORAGE = {TableFormat.INT8_ROWWISE: tf.uint8, TableFormat.INT4_ROWWISE: tf.uint8,
            TableFormat.KERAS_INT8: tf.int8}


@dataclasses.dataclass(frozen=True, eq=False)
class TFQuantizedTable:
    """A quantized (V, D) table held by TensorFlow (quantized.py's layouts, as two tensors).

    format: a quantized ``TableFormat`` (or its mode name: "int8", "int4", "keras_int8").
    data: [V][D] uint8 ("int8"), [V][D / 2] uint8 ("int4", low nibble first) or [V][D] int8
      ("keras_int8"), a tensor or tf.Variable.
    params: [V][2] float32 (scale, bias), or [V] / [V][1] float32 (Keras' scale), a tensor
      or tf.Variable.
    """

    format: TableFormat
    data: object
    params: object

    def __post_init__(self):
        fmt = quantized._mode_of(self.format)
        object.__setattr__(self, "format", fmt)
        name = quantized._MODE_NAMES[fmt]
        data, params = self.data, self.params
        if data.dtype != _STORAGE[fmt] or data.shape.rank != 2:
            raise TypeError(f"a {name} table's data must be a 2-D {_STORAGE[fmt].name} tensor, got "
                            f"{data.dtype.name} of shape {data.shape}")
        ranks = (1, 2) if fmt is TableFormat.KERAS_INT8 else (2,)
        if params.dtype != tf.float32 or params.shape.rank not in ranks:
            raise TypeError(f"a {name} table's params must be float32 of rank {' or '.join(map(str, ranks))}, "
                            f"got {params.dtype.name} of shape {params.shape}")

    @classmethod
    def from_keras_int8(cls, embeddings, embeddings_scale) -> "TFQuantizedTable":
        """Keras' ``Embedding.quantize("int8")`` variables, read as they are (value = q / scale)."""
        return cls(TableFormat.KERAS_INT8, embeddings, embeddings_scale)

    @property
    def dim(self):
        """D, where the data's static shape says it (else None)."""
        columns = self.data.shape[1]
        if columns is None:
            return None
        return 2 * columns if self.format is TableFormat.INT4_ROWWISE else columns


def is_quantized(table) -> bool:
    return isinstance(table, (QuantizedTable, TFQuantizedTable))


def _as_host_table(fmt: TableFormat, data: np.ndarray, params: np.ndarray) -> QuantizedTable:
    """The record the kernels take, over the arrays TF hands a Python body (no copy).

    Marked read-only, as an eager tensor's arrays are: the kernels only read them, and one
    kind of array from every TF form is one kernel signature to compile (build.py's plan)."""
    data, params = data.view(), params.reshape(params.shape[0], -1)
    data.flags.writeable = params.flags.writeable = False
    return QuantizedTable(fmt, data, params)


def _run(qtable: QuantizedTable, ids: np.ndarray, axis: Axis, mask_zero: bool, backend) -> np.ndarray:
    from .tf import _BadIdError
    # An eager tensor's ids are read-only: copied (B*L integers, next to the B*L rows the
    # call reads), so the kernels see writable ids from every form.
    ids = ids if ids.flags.writeable else ids.copy()
    try:
        return quantized.embedding_mean(qtable, ids, axis, mask_zero, backend)
    except IndexError as exc:
        raise _BadIdError(str(exc)) from exc


def _eager(qtable: QuantizedTable, ids, axis: Axis, mask_zero: bool, backend):
    """The eager op: a bad id raises what the graph op raises (InvalidArgumentError)."""
    from .tf import _BadIdError
    try:
        return tf.constant(_run(qtable, np.asarray(ids), axis, mask_zero, backend))
    except _BadIdError as exc:
        raise tf.errors.InvalidArgumentError(None, None, str(exc)) from exc


def _dequantized_rows(fmt: TableFormat, data, params, ids):
    """float32 [B][L][D]: the gathered rows' values (quantized.py's formulas, in float32)."""
    q = tf.gather(data, ids)                                             # [B][L][C]
    if fmt is TableFormat.INT4_ROWWISE:
        low, high = tf.bitwise.bitwise_and(q, 15), tf.bitwise.right_shift(q, 4)
        q = tf.reshape(tf.stack([low, high], axis=-1), tf.concat([tf.shape(ids), [-1]], 0))
    q = tf.cast(q, tf.float32)
    row_params = tf.gather(tf.reshape(params, [tf.shape(params)[0], -1]), ids)  # [B][L][P]
    if fmt is TableFormat.KERAS_INT8:
        return q / row_params[..., :1]
    return q * row_params[..., :1] + row_params[..., 1:2]


def _native(fmt: TableFormat, data, params, ids, axis: Axis, mask_zero: bool):
    """The export twin: gather, dequantize, then the float op's own masked mean."""
    from .tf import _native_bounds_check, _native_pooling
    with tf.control_dependencies([_native_bounds_check(data, ids)]):
        rows = _dequantized_rows(fmt, data, params, ids)
    return _native_pooling(rows, ids, axis, mask_zero, tf.float32)


def embedding_mean(qtable, ids, axis: Axis, mask_zero: bool, exporting: bool, backend=None):
    """tf.py's ``embedding_mean`` for a quantized table (module docstring); checked there.
    ``backend``: "cpu", "numpy" (the float64 reference) or None (cpu)."""
    if backend is not None:  # refused now, not when the body first runs
        quantized._backend_for(backend, "cpu")
    fmt = qtable.format
    dim = qtable.shape[1] if isinstance(qtable, QuantizedTable) else qtable.dim
    batch, length = ids.shape.as_list() if ids.shape.rank == 2 else (None, None)
    out_shape = tf.TensorShape(output_shape(axis, batch, length, dim))
    if isinstance(qtable, QuantizedTable):
        if exporting:  # the frozen table's arrays become the graph's constants
            out = _native(fmt, tf.constant(np.ascontiguousarray(qtable.data)),
                          tf.constant(np.ascontiguousarray(qtable.params)), ids, axis, mask_zero)
        elif tf.executing_eagerly():
            out = _eager(qtable, ids, axis, mask_zero, backend)
        else:
            out = _python_body(lambda i: _run(qtable, i, axis, mask_zero, backend), [ids])
    else:
        data, params = read_without_copy(qtable.data), read_without_copy(qtable.params)
        if exporting:
            out = _native(fmt, data, params, ids, axis, mask_zero)
        elif tf.executing_eagerly():
            # np.asarray shares an eager tensor's buffer (tensor.numpy() would copy it).
            out = _eager(_as_host_table(fmt, np.asarray(data), np.asarray(params)), ids, axis, mask_zero, backend)
        else:
            out = _python_body(lambda d, p, i: _run(_as_host_table(fmt, d, p), i, axis, mask_zero, backend),
                               [data, params, ids])
    out.set_shape(out_shape)
    return out


def _python_body(body, inputs):
    """``tf.numpy_function`` of ``body`` (float32 out), with the guard that refuses to save it."""
    from .tf import export_guard
    with tf.control_dependencies([tf.identity(export_guard().resource_handle)]):
        return tf.numpy_function(body, inputs, tf.float32, stateful=True)
