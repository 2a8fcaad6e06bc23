"""``fused-embedding convert``: SavedModels from elsewhere, their gather-then-mean subgraphs fused.

    fused-embedding convert IN_DIR OUT_DIR [--seed N] [--portable]
    fused_embedding.tf.convert_saved_model(in_dir, out_dir, seed=None, portable=False)

Works as TF-TRT's ``TrtGraphConverterV2`` does: each signature of the SavedModel is
flattened (Grappler's function inlining, as TF-TRT's converter runs it), the flat graph
is searched for the subgraphs below, and a new ``tf.function`` per signature re-imports
the graph with ``tf.graph_util.import_graph_def``: the signature's inputs and captured
variables mapped to the new function's, and each matched mean's output mapped to the
package's op (``fused_embedding.tf.embedding_mean`` or the sparse drop-ins) computed
from the same ids and table. The functions are traced by ``tf.saved_model.save`` itself
(inside its save context), so what is written is the op's traced-for-export form,
whatever ``fused_embedding.tf`` writes into SavedModels (today: the compiled
``FusedEmbedding*`` ops, which a serving process loads with
``fused_embedding.tf.load_ops()``; with ``portable=True``, under ``native_ops()``, the
native twin that TF alone serves). This module does not depend on the op's internals.

Matched (``Match.kind``):

* ``mean``: ``Mean(Gather(table, ids), axis)`` -- ``tf.reduce_mean(tf.gather(...))`` and Keras'
  ``Embedding -> GlobalAveragePooling1D`` without a mask, ``channels_last`` (axis 1, (B, D))
  and ``channels_first`` (axis 2, (B, L)).
* ``masked mean``: Keras' masked pooling of ``Embedding(mask_zero=True)`` and its hand-written
  forms: ``Sum(Select(m, rows, 0) or rows * m, 1) / Sum(m, 1)`` (``RealDiv``, ``Div`` or
  ``DivNoNan``), m the padding mask ``NotEqual(ids, 0)`` expanded on the last dim, cast to
  the rows' dtype where multiplied (axis 1).
* ``sparse mean`` / ``sparse sum`` / ``sparse sqrtn``: ``tf.nn.embedding_lookup_sparse``
  without weights: ``SparseSegment{Mean,Sum,SqrtN}(Gather(table, Unique(values).y),
  Unique(values).idx, segment_ids)``.

Side conditions, each checked (a candidate that fails one is left, with the reason):
the gather is ``GatherV2`` (axis input the constant 0) or ``ResourceGather``, with
``batch_dims`` 0; the table is a captured ``tf.Variable`` or a constant, (V, D), float32,
float16 or bfloat16; the ids are int32 or int64, of static rank 2 for the dense forms;
the mean's axes are constants naming axis 1 or 2 of the (B, L, D) rows, without
``keep_dims``; the mask compares the gather's ids (or the ids before Keras' wrap of
negative ids) with the padding id 0; the gathered rows feed nothing outside the match.

Every signature is then checked on random inputs (ids in [0, V) of each matched table,
several batch sizes) against the original, within ``validation``'s per-dtype tolerances
(``KERAS_TOLERANCES``: the original pools in the table's dtype, the package in float32)
before anything is written; a model whose outputs differ is not written.

Semantics that change (the package's, DESIGN.md): a bag of only padding ids gives zeros
where Keras' masked mean gave NaN (the check's ids keep one real id per bag); an id outside
[0, V) raises InvalidArgumentError naming it on every device.

Exit statuses of the command: 0 written; 1 a check failed (nothing written); 2 usage
(IN_DIR missing or not a SavedModel, OUT_DIR not empty); 3 nothing to fuse (nothing written).

Not matched: gathers inside control-flow functions (``If``/``While`` bodies are not
inlined), weighted sparse lookups, lists of tables (sharded lookups), tables computed in
the graph, means of a cast of the rows.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

EXIT_WRITTEN, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_NOTHING_TO_FUSE = 0, 1, 2, 3

# Batch sizes, and lengths for the ids' other unknown dims, of the check's rounds.
CHECK_ROUNDS = ((1, 1), (3, 7), (64, 19))
# The padding fraction of ids that feed a masked match in the check.
CHECK_PADDING_FRACTION = 0.3
# Sparse bags in the check: lengths 0 to this (empty rows included).
CHECK_MAX_BAG = 6

_TABLE_DTYPES = ("float32", "float16", "bfloat16")
_ID_DTYPES = ("int32", "int64")
_SPARSE_OPS = {"SparseSegmentMean": "mean", "SparseSegmentSum": "sum", "SparseSegmentSqrtN": "sqrtn",
               "SparseSegmentMeanWithNumSegments": "mean", "SparseSegmentSumWithNumSegments": "sum",
               "SparseSegmentSqrtNWithNumSegments": "sqrtn"}
_PASS_THROUGH = ("Identity", "Snapshot")


class ConversionError(Exception):
    """A conversion that wrote nothing; ``exit_status`` is the command's."""

    exit_status = EXIT_CHECK_FAILED


class NothingToFuse(ConversionError):
    """No signature holds a subgraph this converter fuses; nothing was written."""

    exit_status = EXIT_NOTHING_TO_FUSE


class CheckFailed(ConversionError):
    """A converted signature's outputs differ from the original's; nothing was written."""

    exit_status = EXIT_CHECK_FAILED


@dataclasses.dataclass
class Match:
    """One fused subgraph of a signature's flat graph.

    kind: "mean", "masked mean", "sparse mean", "sparse sum" or "sparse sqrtn".
    output: the tensor replaced ("node:0"); nodes: the nodes it replaces (gather first).
    table: ("variable", tf.Variable) or ("tensor", tensor name in the flat graph);
    ids: the gather's ids tensor (dense) or the sparse values; segment_ids: sparse only.
    """

    signature: str
    kind: str
    output: str
    nodes: list
    table: tuple
    table_shape: tuple
    table_dtype: str
    ids: str
    axis: int | None = None
    mask_zero: bool = False
    segment_ids: str | None = None
    num_segments: str | None = None
    table_name: str = ""

    def describe(self) -> str:
        where = f"axis {self.axis}, mask_zero {self.mask_zero}" if self.axis else "ragged bags"
        return (f"{self.signature}: {self.kind} {self.output.rsplit(':', 1)[0]} <- {self.nodes[0]} "
                f"(table {self.table_name} {list(self.table_shape)} {self.table_dtype}, {where})")


@dataclasses.dataclass
class Left:
    """A candidate left as it was, and why."""

    signature: str
    node: str
    reason: str

    def describe(self) -> str:
        return f"{self.signature}: {self.node}: {self.reason}"


@dataclasses.dataclass
class Report:
    """What ``convert_saved_model`` did: the matches, what was left, each signature's check
    (name -> largest absolute difference per output, or a note), and where it wrote."""

    rewritten: list
    left: list
    checks: dict
    out_dir: str | None = None


class _Skip(Exception):
    """A candidate that fails a side condition (the message is the reason)."""


# ---------------------------------------------------------------------------
# The flat graph


def _tensor(name: str) -> str:
    """'node' or 'node:k' -> 'node:k'."""
    return name if ":" in name else f"{name}:0"


def _node_of(tensor: str) -> str:
    return tensor.lstrip("^").split(":")[0]


class _FlatGraph:
    """A signature's graph with every function call inlined, and what we ask of it."""

    def __init__(self, graph_def):
        import tensorflow as tf
        self.graph_def = graph_def
        self.nodes = {n.name: n for n in graph_def.node}
        self.consumers = {}  # tensor -> [consumer node names] (data inputs only)
        self.node_consumers = {}  # node -> [consumer node names] of any of its outputs (data inputs only)
        for node in graph_def.node:
            for inp in node.input:
                if not inp.startswith("^"):
                    self.consumers.setdefault(_tensor(inp), []).append(node.name)
                    self.node_consumers.setdefault(_node_of(inp), []).append(node.name)
        # Static shapes, by TF's own shape inference over the imported graph.
        self._graph = tf.Graph()
        with self._graph.as_default():
            tf.graph_util.import_graph_def(graph_def, name="")

    def op(self, tensor: str) -> str:
        return self.nodes[_node_of(tensor)].op

    def node(self, tensor: str):
        return self.nodes[_node_of(tensor)]

    def through_identities(self, tensor: str) -> str:
        tensor = _tensor(tensor)
        while self.op(tensor) in _PASS_THROUGH:
            tensor = _tensor(self.node(tensor).input[0])
        return tensor

    def constant(self, tensor: str):
        """The value of a Const (through identities), or None."""
        import tensorflow as tf
        node = self.node(self.through_identities(tensor))
        return tf.make_ndarray(node.attr["value"].tensor) if node.op == "Const" else None

    def rank(self, tensor: str):
        rank = self._graph.get_tensor_by_name(_tensor(tensor)).shape.rank
        return rank

    def shape(self, tensor: str):
        return self._graph.get_tensor_by_name(_tensor(tensor)).shape

    def dtype(self, tensor: str) -> str:
        return self._graph.get_tensor_by_name(_tensor(tensor)).dtype.name

    def data_consumers(self, tensor: str) -> list:
        return self.consumers.get(_tensor(tensor), [])


def _inline(function):
    """The concrete function's graph with every call inlined (Grappler's function optimizer,
    as TF-TRT and convert_variables_to_constants_v2 run it); control flow is left as is."""
    from tensorflow.python.framework import convert_to_constants
    return convert_to_constants._run_inline_graph_optimization(function, lower_control_flow=False,
                                                               aggressive_inlining=True)


# ---------------------------------------------------------------------------
# Matching


class _Signature:
    """One signature: its function, flat graph, inputs, captures; matches and what was left."""

    def __init__(self, key, function):
        self.key, self.function = key, function
        kwargs = function.structured_input_signature[1]
        self.input_names = sorted(kwargs)
        self.input_specs = {name: kwargs[name] for name in self.input_names}
        # TF flattens a dict of inputs in sorted key order: the first inputs are the kwargs'.
        self.input_tensors = {name: t.name for name, t in zip(self.input_names, function.inputs)}
        self.output_names = sorted(function.structured_outputs)
        self.output_tensors = {name: t.name for name, t in zip(self.output_names, function.outputs)}
        variables = list(function.variables)
        self.captures = {}      # placeholder tensor name -> the captured eager tensor
        self.captured_variables = {}  # placeholder tensor name -> tf.Variable
        for external, internal in function.graph.captures:
            self.captures[internal.name] = external
            for variable in variables:
                if variable.handle is external:
                    self.captured_variables[internal.name] = variable
        self.graph = _FlatGraph(_inline(function))
        self.matches, self.left = [], []

    # -- the table and the gather -------------------------------------------------

    def _table(self, gather):
        """(table ref, shape, dtype, printable name) of a gather node, or _Skip."""
        g = self.graph
        if gather.op == "ResourceGather":
            handle = g.through_identities(gather.input[0])
            return self._variable_table(handle)
        params = g.through_identities(gather.input[0])
        producer = g.node(params)
        if producer.op == "ReadVariableOp":
            return self._variable_table(g.through_identities(producer.input[0]))
        if producer.op == "Const":
            value = g.constant(params)
            return ("tensor", params), tuple(value.shape), g.dtype(params), f"constant {producer.name}"
        if producer.op == "Placeholder" and params in self.captures and params not in self.captured_variables:
            value = self.captures[params]
            if value.dtype.name != "resource":
                return ("tensor", params), tuple(value.shape), value.dtype.name, "captured constant"
        raise _Skip(f"the table is computed in the graph ({producer.op} {producer.name}), "
                    "not a variable or a constant")

    def _variable_table(self, handle):
        variable = self.captured_variables.get(handle)
        if variable is None:
            raise _Skip(f"the table's handle {handle} is not a captured tf.Variable")
        return ("variable", variable), tuple(variable.shape), variable.dtype.name, f"variable {variable.name}"

    def _gather(self, rows_tensor):
        """The gather producing ``rows_tensor`` (through identities) and its table, or None
        where no gather produces it; _Skip where one does but fails a side condition."""
        g = self.graph
        rows = g.through_identities(rows_tensor)
        gather = g.node(rows)
        if gather.op not in ("GatherV2", "ResourceGather") or not rows.endswith(":0"):
            return None
        if gather.attr["batch_dims"].i != 0:
            raise _Skip(f"gather {gather.name} has batch_dims={gather.attr['batch_dims'].i} "
                        "(the fused op gathers whole rows: batch_dims 0)")
        if gather.op == "GatherV2":
            axis = g.constant(gather.input[2])
            if axis is None:
                raise _Skip(f"gather {gather.name}'s axis is not a constant")
            if int(axis) != 0:
                raise _Skip(f"gather {gather.name} gathers along axis {int(axis)}, not the table's rows (axis 0)")
        table, shape, dtype, name = self._table(gather)
        if dtype not in _TABLE_DTYPES:
            raise _Skip(f"table dtype {dtype} (the fused op takes {', '.join(_TABLE_DTYPES)})")
        if len(shape) != 2:
            raise _Skip(f"table of shape {list(shape)} (the fused op takes a (V, D) table)")
        ids = _tensor(gather.input[1])
        if g.dtype(ids) not in _ID_DTYPES:
            raise _Skip(f"ids of dtype {g.dtype(ids)} (the fused op takes int32 or int64)")
        return gather, rows, ids, table, shape, dtype, name

    def _private(self, nodes, final):
        """_Skip unless every data consumer of ``nodes``' outputs is in the match."""
        inside = set(nodes) | {final}
        for name in nodes:
            for consumer in self.graph.node_consumers.get(name, []):
                if consumer not in inside:
                    raise _Skip(f"the gathered rows ({name}) also feed {consumer} "
                                f"({self.graph.nodes[consumer].op}), outside the mean")

    def _identity_chain(self, start, end):
        """Names of the pass-through nodes from tensor ``start`` back to (not incl.) ``end``."""
        chain, tensor = [], _tensor(start)
        while _node_of(tensor) != _node_of(end):
            chain.append(_node_of(tensor))
            tensor = _tensor(self.graph.node(tensor).input[0])
        return chain

    def _axes(self, node, rank):
        g = self.graph
        axes = g.constant(node.input[1])
        if axes is None:
            raise _Skip(f"{node.op} {node.name}'s axes are not constants")
        axes = sorted({int(a) % rank for a in np.atleast_1d(axes)})
        if node.attr["keep_dims"].b:
            raise _Skip(f"{node.op} {node.name} keeps the reduced dims (keep_dims=True)")
        return axes

    # -- the patterns --------------------------------------------------------------

    def _match_mean(self, node):
        found = self._gather(node.input[0])
        if found is None:
            return None
        gather, rows, ids, table, shape, dtype, name = found
        ids_rank = self.graph.rank(ids)
        if ids_rank != 2:
            raise _Skip(f"ids of rank {ids_rank} (the fused op takes (B, L) ids)")
        axes = self._axes(node, 3)
        if axes not in ([1], [2]):
            raise _Skip(f"mean over axes {axes} of the gathered (B, L, D) rows (fused: 1 or 2)")
        private = [gather.name] + self._identity_chain(node.input[0], rows)
        self._private(private, node.name)
        return Match(self.key, "mean", f"{node.name}:0", private, table, shape, dtype, ids,
                     axis=axes[0], table_name=name)

    def _mask(self, tensor):
        """(ids, expanded) of a padding mask ``NotEqual(ids, 0)`` reached from ``tensor``
        through identities, casts of the bool mask to a float and ExpandDims on the last dim
        or ``x[..., None]`` (Keras: ``ExpandDims(NotEqual(ids, 0), -1)``, cast for the count);
        _Skip otherwise.
        ``expanded``: whether an ExpandDims made it (B, L, 1)."""
        g = self.graph
        expanded, tensor = False, g.through_identities(tensor)
        while True:
            node = g.node(tensor)
            if node.op == "ExpandDims" and not expanded:
                dim = g.constant(node.input[1])
                if dim is None or int(dim) not in (-1, 2):
                    raise _Skip(f"the mask is expanded on dim {dim}, not the last")
                expanded = True
            elif node.op == "StridedSlice" and not expanded and self._is_new_last_axis(node):
                expanded = True
            elif node.op == "Cast" and g.dtype(node.input[0]) == "bool":
                pass
            elif node.op == "NotEqual":
                break
            else:
                raise _Skip(f"the mask is {node.op} {node.name}, not (a cast of) NotEqual(ids, 0)")
            tensor = g.through_identities(node.input[0])
        for ids, other in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
            value = g.constant(other)
            if value is not None and value.size == 1:
                if int(value) != 0:
                    raise _Skip(f"the mask's padding id is {int(value)} (fused: 0)")
                return g.through_identities(ids), expanded
        raise _Skip(f"the mask {node.name} compares no constant padding id")

    def _is_new_last_axis(self, node) -> bool:
        """True for the StridedSlice that ``x[..., None]`` lowers to (a new last axis)."""
        g = self.graph
        attr = node.attr
        if (attr["ellipsis_mask"].i, attr["new_axis_mask"].i, attr["shrink_axis_mask"].i) != (1, 2, 0):
            return False
        strides = g.constant(node.input[3])
        return strides is not None and strides.shape == (2,) and bool(np.all(strides == 1))

    def _unwrapped(self, ids):
        """Keras' take wraps negative ids (``where(ids < 0, ids + V, ids)``): the ids it wraps."""
        g = self.graph
        node = g.node(ids)
        if node.op in ("SelectV2", "Select"):
            less = g.node(g.through_identities(node.input[0]))
            if less.op == "Less" and g.through_identities(node.input[2]) == g.through_identities(less.input[0]):
                return g.through_identities(node.input[2])
        return ids

    def _match_masked_mean(self, node):
        """``Sum(Select(m, rows, 0) or rows * m, 1) / Sum(m, 1)``, m the expanded padding mask
        (``DivNoNan`` too: it gives the package's zeros for a bag of only padding, where
        ``RealDiv`` gives NaN)."""
        g = self.graph
        num, den = (g.node(g.through_identities(t)) for t in node.input[:2])
        if num.op != "Sum" or den.op != "Sum":
            return None
        masked = g.node(g.through_identities(num.input[0]))
        if masked.op in ("SelectV2", "Select"):
            rows_input, mask_input = masked.input[1], masked.input[0]
            found = self._gather(rows_input)
            if found is None:
                return None
            zero = g.constant(masked.input[2])
            if zero is None or np.any(zero != 0):
                raise _Skip(f"{masked.name} selects {zero} at padding, not 0")
        elif masked.op == "Mul":
            rows_input, mask_input = masked.input[0], masked.input[1]
            found = self._gather(rows_input)
            if found is None:
                rows_input, mask_input = masked.input[1], masked.input[0]
                found = self._gather(rows_input)
            if found is None:
                return None
        else:
            return None
        gather, rows, ids, table, shape, dtype, name = found
        if g.rank(ids) != 2:
            raise _Skip(f"ids of rank {g.rank(ids)} (the fused op takes (B, L) ids)")
        if self._axes(num, 3) != [1]:
            raise _Skip(f"masked sum over axes {self._axes(num, 3)} (fused masked mean: axis 1)")
        gather_ids = g.through_identities(ids)
        accepted = (gather_ids, self._unwrapped(gather_ids))
        mask_ids, expanded = self._mask(mask_input)
        if not expanded:
            raise _Skip(f"{masked.name} masks the rows with an unexpanded (B, L) mask")
        if mask_ids not in accepted:
            raise _Skip(f"the mask compares {mask_ids}, not the gather's ids {ids}")
        count_ids, count_expanded = self._mask(den.input[0])
        if count_ids not in accepted:
            raise _Skip(f"the divisor {den.name} counts {count_ids}, not the gather's ids {ids}")
        den_axes = g.constant(den.input[1])
        if den_axes is None or sorted({int(a) % (3 if count_expanded else 2) for a in np.atleast_1d(den_axes)}) != [1]:
            raise _Skip(f"the divisor {den.name} sums over axes {den_axes}, not 1")
        if den.attr["keep_dims"].b == count_expanded:
            # (B, L, 1) summed without keep_dims, or (B, L) with: a (B, 1) count. Else the
            # division would broadcast a (B,) count across the features.
            raise _Skip(f"the divisor {den.name} is not a (B, 1) count")
        private = ([gather.name] + self._identity_chain(rows_input, rows)
                   + [masked.name] + self._identity_chain(num.input[0], f"{masked.name}:0") + [num.name]
                   + self._identity_chain(node.input[0], f"{num.name}:0"))
        self._private(private, node.name)
        return Match(self.key, "masked mean", f"{node.name}:0", private, table, shape, dtype, ids,
                     axis=1, mask_zero=True, table_name=name)

    def _match_sparse(self, node):
        g = self.graph
        found = self._gather(node.input[0])
        if found is None:
            return None
        gather, rows, ids, table, shape, dtype, name = found
        unique = g.node(g.through_identities(ids))
        if unique.op != "Unique" or g.through_identities(ids) != f"{unique.name}:0":
            raise _Skip(f"the rows are gathered by {unique.op} {unique.name}, not Unique(values)")
        if _tensor(node.input[1]) != f"{unique.name}:1":
            raise _Skip(f"{node.op} {node.name} indexes the rows by {node.input[1]}, not {unique.name}:1")
        values = _tensor(unique.input[0])
        if g.dtype(values) not in _ID_DTYPES:
            raise _Skip(f"sparse ids of dtype {g.dtype(values)} (fused: int32 or int64)")
        private = [gather.name] + self._identity_chain(node.input[0], rows)
        self._private(private, node.name)
        return Match(self.key, f"sparse {_SPARSE_OPS[node.op]}", f"{node.name}:0", private, table, shape,
                     dtype, values, segment_ids=_tensor(node.input[2]),
                     num_segments=_tensor(node.input[3]) if node.op.endswith("WithNumSegments") else None,
                     table_name=name)

    def find(self):
        """Fills ``matches`` and ``left``."""
        claimed = set()
        for node in self.graph.graph_def.node:
            matcher = (self._match_mean if node.op == "Mean" else
                       self._match_masked_mean if node.op in ("RealDiv", "Div", "DivNoNan") else
                       self._match_sparse if node.op in _SPARSE_OPS else None)
            if matcher is None:
                continue
            try:
                match = matcher(node)
            except _Skip as skip:
                self.left.append(Left(self.key, node.name, str(skip)))
                continue
            if match is not None and not claimed.intersection(match.nodes):
                self.matches.append(match)
                claimed.update(match.nodes)
        # Gathers in no match: say what their rows feed (a near miss shows up above too).
        reported = {left.node for left in self.left}
        for node in self.graph.graph_def.node:
            if node.op in ("GatherV2", "ResourceGather") and node.name not in claimed:
                feeds = sorted({self.graph.nodes[c].op for c in self.graph.data_consumers(f"{node.name}:0")})
                if not any(r in reported for r in self._downstream(node.name)):
                    self.left.append(Left(self.key, node.name, f"gather whose rows feed {', '.join(feeds) or 'nothing'}"
                                                                 ", not a mean this converter fuses"))

    def _downstream(self, name, depth=4):
        """Nodes up to ``depth`` data edges below ``name`` (to tie a gather to a reported near miss)."""
        seen, frontier = set(), [name]
        for _ in range(depth):
            frontier = [c for n in frontier for c in self.graph.data_consumers(f"{n}:0") if c not in seen]
            seen.update(frontier)
        return seen


# ---------------------------------------------------------------------------
# Rewriting


def _pruned(graph_def, keep_tensors):
    """The part of ``graph_def`` that ``keep_tensors`` need (data and control edges), in
    the original order; the function library kept."""
    import tensorflow as tf
    nodes = {n.name: n for n in graph_def.node}
    kept, frontier = set(), [_node_of(t) for t in keep_tensors]
    while frontier:
        name = frontier.pop()
        if name in kept:
            continue
        kept.add(name)
        frontier.extend(_node_of(i) for i in nodes[name].input)
    pruned = tf.compat.v1.GraphDef()
    pruned.versions.CopyFrom(graph_def.versions)
    pruned.library.CopyFrom(graph_def.library)
    pruned.node.extend(n for n in graph_def.node if n.name in kept)
    return pruned


def _rewritten(signature: _Signature):
    """The flat graph with each match's output read from a new placeholder, the matched
    nodes' control edges dropped and everything no output needs pruned; and the names of
    the placeholders, one per match."""
    import tensorflow as tf
    graph_def = tf.compat.v1.GraphDef()
    graph_def.CopyFrom(signature.graph.graph_def)
    replaced, removed = {}, set()
    for i, match in enumerate(signature.matches):
        placeholder = f"fused_embedding_match_{i}"
        node = graph_def.node.add(name=placeholder, op="Placeholder")
        node.attr["dtype"].type = tf.as_dtype(match.table_dtype).as_datatype_enum
        replaced[match.output] = placeholder
        removed.update(match.nodes)
        removed.add(_node_of(match.output))
    for node in graph_def.node:
        inputs = []
        for inp in node.input:
            if inp.startswith("^"):
                if inp[1:] in removed:
                    continue  # an ordering edge on a read that no longer runs
                inputs.append(inp)
            else:
                inputs.append(replaced.get(_tensor(inp), inp))
        del node.input[:]
        node.input.extend(inputs)
    graph_def = _pruned(graph_def, signature.output_tensors.values())
    return graph_def, [f"fused_embedding_match_{i}:0" for i in range(len(signature.matches))]


def _make_function(signature: _Signature):
    """The converted signature as a tf.function over the original's input specs."""
    import tensorflow as tf

    from . import tf as fused_tf
    graph = signature.graph
    names = signature.input_names
    specs = [tf.TensorSpec(signature.input_specs[n].shape, signature.input_specs[n].dtype, name=n) for n in names]
    # Import 1: just what the matches' ids (and constant tables) need.
    needed = []
    for match in signature.matches:
        needed += [match.ids] + [t for t in (match.segment_ids, match.num_segments) if t]
        if match.table[0] == "tensor":
            needed.append(match.table[1])
    inputs_graph = _pruned(graph.graph_def, needed)
    model_graph, placeholders = _rewritten(signature)
    output_shapes = {n: signature.function.structured_outputs[n].shape for n in signature.output_names}

    def input_map(graph_def, arguments):
        present = {n.name for n in graph_def.node}
        mapping = {signature.input_tensors[n]: arguments[n] for n in names}
        graph = tf.compat.v1.get_default_graph()
        # The original's captures (variable handles, constants, other resources), captured
        # again by the new function: saving maps them to the same tracked objects.
        mapping.update((name, graph.capture(external)) for name, external in signature.captures.items()
                       if _node_of(name) in present)
        return {k: v for k, v in mapping.items() if _node_of(k) in present}

    def converted(*args):
        arguments = dict(zip(names, args))
        imported = tf.graph_util.import_graph_def(inputs_graph, input_map=input_map(inputs_graph, arguments),
                                                  return_elements=needed, name="fused_embedding_inputs")
        tensors = dict(zip(needed, imported))
        fused = {}
        for placeholder, match in zip(placeholders, signature.matches):
            table = match.table[1] if match.table[0] == "variable" else tensors[match.table[1]]
            ids = tensors[match.ids]
            if match.axis is not None:
                out = fused_tf.embedding_mean(table, ids, axis=match.axis, mask_zero=match.mask_zero)
            else:
                rowids = tf.cast(tensors[match.segment_ids], tf.int64)
                nrows = tf.cast(tensors[match.num_segments], tf.int64) if match.num_segments else None
                # The rows TF's op gives: max(segment id) + 1, or num_segments.
                bags = tf.RaggedTensor.from_value_rowids(ids, rowids, nrows=nrows)
                out = fused_tf.embedding_lookup_sparse(table, bags, None, combiner=match.kind.split()[1])
            fused[placeholder] = out
        mapping = input_map(model_graph, arguments)
        mapping.update(fused)
        wanted = [signature.output_tensors[n] for n in signature.output_names]
        outputs = tf.graph_util.import_graph_def(model_graph, input_map=mapping, return_elements=wanted,
                                                 name="model")
        result = {}
        for name, out in zip(signature.output_names, outputs):
            out.set_shape(output_shapes[name])  # what the original's signature promised
            result[name] = tf.identity(out, name=name)
        return result

    return tf.function(converted, input_signature=specs, autograph=False)


# ---------------------------------------------------------------------------
# The check


def _check_inputs(signature: _Signature, rng, batch, length):
    """{input name: array} for one round of the check, or raises _Skip naming an input it
    can't make: ids in [0, V) for every input feeding a match's ids (padding where masked),
    canonical sparse bags for a lookup's (indices, values, dense_shape), normal floats."""
    g = signature.graph
    placeholder_of = {t: n for n, t in signature.input_tensors.items()}
    vocab, masked, sparse = {}, set(), []

    def source(tensor):
        tensor = g.through_identities(tensor)
        tensor = signature._unwrapped(tensor)
        while g.op(tensor) == "Cast":
            tensor = g.through_identities(g.node(tensor).input[0])
        return placeholder_of.get(tensor)

    for match in signature.matches:
        name = source(match.ids)
        if name is None:
            raise _Skip(f"the ids of {match.output} are computed in the graph, not a signature input")
        vocab[name] = min(vocab.get(name, match.table_shape[0]), match.table_shape[0])
        if match.mask_zero:
            masked.add(name)
        if match.segment_ids:
            seg = g.through_identities(match.segment_ids)
            while g.op(seg) == "Cast":
                seg = g.through_identities(g.node(seg).input[0])
            node = g.node(seg)
            begin, end = (g.constant(i) for i in node.input[1:3]) if node.op == "StridedSlice" else (None, None)
            indices = placeholder_of.get(g.through_identities(node.input[0])) if node.op == "StridedSlice" else None
            if indices is None or begin is None or list(begin) != [0, 0] or list(end) != [0, 1]:
                raise _Skip(f"the segment ids of {match.output} are not column 0 of a signature input")
            sparse.append((indices, name))
    shapes = [s for s in signature.input_specs.values()]
    dense_shape_inputs = [n for n, s in signature.input_specs.items()
                          if s.dtype.name == "int64" and s.shape.as_list() == [2]
                          and n not in vocab and n not in {i for i, _ in sparse}]
    if len(sparse) > 1 or (sparse and len(dense_shape_inputs) != 1):
        raise _Skip("can't tell which input is the sparse ids' dense_shape")
    del shapes
    arrays = {}
    for indices, values in sparse:
        lengths = rng.integers(0, CHECK_MAX_BAG + 1, batch)
        lengths[0] = max(lengths[0], 1)
        rows = np.repeat(np.arange(batch), lengths)
        cols = np.concatenate([np.arange(n) for n in lengths])
        arrays[indices] = np.stack([rows, cols], 1).astype(signature.input_specs[indices].dtype.as_numpy_dtype)
        arrays[values] = rng.integers(0, vocab[values], rows.size).astype(
            signature.input_specs[values].dtype.as_numpy_dtype)
        arrays[dense_shape_inputs[0]] = np.array([batch, max(int(lengths.max()), 1)], np.int64)
    for name, spec in signature.input_specs.items():
        if name in arrays:
            continue
        dims = spec.shape.as_list() if spec.shape.rank is not None else None
        if dims is None:
            raise _Skip(f"input {name!r} has no known rank")
        shape = [d if d is not None else (batch if i == 0 else length) for i, d in enumerate(dims)]
        if name in vocab:
            ids = rng.integers(0, vocab[name], shape)
            if name in masked:
                ids[rng.random(shape) < CHECK_PADDING_FRACTION] = 0
                if ids.ndim == 2 and ids.shape[1]:
                    # One real id per bag: an all-padding bag is NaN in Keras, zeros in the package.
                    ids[:, 0] = rng.integers(1, vocab[name], ids.shape[0]) if vocab[name] > 1 else 0
            arrays[name] = ids.astype(spec.dtype.as_numpy_dtype)
        elif spec.dtype.is_floating:
            arrays[name] = rng.standard_normal(shape).astype(spec.dtype.as_numpy_dtype)
        elif spec.dtype.is_bool:
            arrays[name] = rng.random(shape) < 0.5
        else:
            raise _Skip(f"input {name!r} ({spec.dtype.name} {dims}) feeds no matched lookup's ids: "
                        "no range to draw check values from")
    return arrays


def _tolerance(signature: _Signature, output_dtype):
    """The per-dtype tolerance of the least precise of the output and the matched tables:
    validation's framework tolerances (the original pools in the table's dtype, as Keras
    does; the package in float32, close to the float64 reference). Exact for non-float outputs."""
    from .semantics import BFLOAT16
    from .validation import tolerance
    if not output_dtype.is_floating:
        return dict(rtol=0.0, atol=0.0)
    precision = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": BFLOAT16}
    order = list(precision)
    names = [n for n in [output_dtype.name] + [m.table_dtype for m in signature.matches] if n in precision]
    worst = max(names, key=order.index, default="float32")
    return tolerance(precision[worst], against="framework")


def _check(signature: _Signature, original, converted, rng):
    """Largest |difference| per output over the check's rounds; CheckFailed on a difference
    outside tolerance, a changed input or output spec."""
    import tensorflow as tf

    from .validation import compare
    if converted.structured_input_signature != original.structured_input_signature:
        raise CheckFailed(f"signature {signature.key!r}: inputs {converted.structured_input_signature} "
                          f"!= the original's {original.structured_input_signature}")
    want = {k: (v.dtype, v.shape.as_list()) for k, v in original.structured_outputs.items()}
    got = {k: (v.dtype, v.shape.as_list()) for k, v in converted.structured_outputs.items()}
    if want != got:
        raise CheckFailed(f"signature {signature.key!r}: outputs {got} != the original's {want}")
    largest = {}
    for batch, length in CHECK_ROUNDS:
        arrays = _check_inputs(signature, rng, batch, length)
        inputs = {k: tf.constant(v, dtype=signature.input_specs[k].dtype) for k, v in arrays.items()}
        expected = original(**inputs)
        actual = converted(**inputs)
        for name in signature.output_names:
            e, a = expected[name], actual[name]
            e64 = np.asarray(tf.cast(e, tf.float64)) if e.dtype.is_floating else np.asarray(e)
            a64 = np.asarray(tf.cast(a, tf.float64)) if a.dtype.is_floating else np.asarray(a)
            tol = _tolerance(signature, e.dtype)
            # Elementwise, within the dtype's tolerance of the element or of the output's
            # largest magnitude: the layers after a mean (a Dense's sums) move small outputs
            # by the rounding of large terms, whichever order the mean summed in.
            scale = float(np.max(np.abs(e64), initial=0.0)) if e.dtype.is_floating and e64.size else 0.0
            report = compare(a64, e64, rtol=tol["rtol"], atol=tol["atol"] + tol["rtol"] * scale)
            if report:
                raise CheckFailed(f"signature {signature.key!r} output {name!r} differs from the original's "
                                  f"(batch {batch}, length {length}): {report}")
            diff = float(np.max(np.abs(a64.astype(np.float64) - e64), initial=0.0)) if a64.size else 0.0
            largest[name] = max(largest.get(name, 0.0), diff)
    return largest


# ---------------------------------------------------------------------------
# The conversion


def _check_dirs(in_dir, out_dir):
    in_path, out_path = Path(in_dir), Path(out_dir)
    if not in_path.exists():
        raise FileNotFoundError(f"IN_DIR {in_dir} does not exist; expected a SavedModel directory")
    if not in_path.is_dir() or not any((in_path / n).is_file() for n in ("saved_model.pb", "saved_model.pbtxt")):
        raise ValueError(f"IN_DIR {in_dir} is not a SavedModel: expected a directory holding "
                         "saved_model.pb (and variables/)")
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())):
        raise FileExistsError(f"OUT_DIR {out_dir} exists and is not an empty directory; expected a new "
                              "or empty directory")
    if not out_path.resolve().parent.is_dir():
        raise FileNotFoundError(f"OUT_DIR's parent {out_path.resolve().parent} does not exist")
    if out_path.resolve() == in_path.resolve():
        raise ValueError("OUT_DIR is IN_DIR; expected another directory")


def convert_saved_model(in_dir, out_dir, *, seed=None, report=None, portable=False) -> Report:
    """Convert the SavedModel in ``in_dir``: fuse its gather-then-mean subgraphs, check every
    signature on random inputs against the original, write ``out_dir``.

    Args:
      in_dir: a SavedModel directory (any TF 2 / Keras 3 export).
      out_dir: a new or empty directory; written only when every check passes (the model is
        saved beside it first, then renamed into place).
      seed: seed for the check's random inputs (None: fresh).
      report: a callable taking one line of progress (e.g. ``print``), or None.
      portable: write the op's native twin (``fused_embedding.tf.native_ops()``: gather +
        mean, served by TF alone, unfused speed) instead of the default export form (the
        compiled ops: a serving process calls ``fused_embedding.tf.load_ops()`` first).

    Returns:
      ``Report``: the matches, what was left and why, each signature's largest differences.

    Raises:
      FileNotFoundError / FileExistsError / ValueError: IN_DIR missing or not a SavedModel,
        OUT_DIR not empty.
      NothingToFuse: no signature holds a subgraph this converter fuses (nothing written).
      CheckFailed: a converted signature's outputs differ from the original's, naming the
        signature, output and difference (nothing written).

    The written model keeps the signatures' names, input and output names, dtypes and
    shapes, and the original's variables (not frozen). Loading it needs
    ``import fused_embedding.tf`` only where the op's traced-for-export form is the
    package's compiled op (``fused_embedding.tf``'s concern).
    """
    say = report or (lambda line: None)
    _check_dirs(in_dir, out_dir)
    import tensorflow as tf

    from . import tf as fused_tf
    loaded = tf.saved_model.load(str(in_dir))
    signatures = {key: _Signature(key, fn) for key, fn in loaded.signatures.items()}
    if not signatures:
        raise NothingToFuse(f"{in_dir} has no signatures: nothing to fuse")
    rewritten, left = [], []
    for signature in signatures.values():
        signature.find()
    rng = np.random.default_rng(seed)
    # Signatures whose check inputs can't be made keep their original function.
    for signature in signatures.values():
        if signature.matches:
            try:
                _check_inputs(signature, np.random.default_rng(0), *CHECK_ROUNDS[0])
            except _Skip as skip:
                left += [Left(m.signature, _node_of(m.output), f"not checkable: {skip}") for m in signature.matches]
                signature.matches = []
        rewritten += signature.matches
        left += signature.left
    for match in rewritten:
        say(f"rewrote {match.describe()}")
    for item in left:
        say(f"left {item.describe()}")
    if not rewritten:
        raise NothingToFuse(f"nothing to fuse in {in_dir} ({len(signatures)} signature(s), "
                            f"{len(left)} candidate(s) left): nothing written")

    module = tf.Module()
    module.original = loaded  # tracks the variables (and any other resource) the functions capture
    # tf.functions, not concrete functions: the save traces them in its save context, where
    # the package's op writes its export form (a function traced here beforehand would hold
    # the in-process form, which refuses to be saved).
    exported = {key: _make_function(signature) if signature.matches else loaded.signatures[key]
                for key, signature in signatures.items()}
    out_path = Path(out_dir).resolve()
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.converting-", dir=out_path.parent))
    try:
        with fused_tf.native_ops() if portable else contextlib.nullcontext():
            tf.saved_model.save(module, str(staging), signatures=exported)
        reloaded = tf.saved_model.load(str(staging))
        checks = {}
        for key, signature in signatures.items():
            try:
                checks[key] = _check(signature, loaded.signatures[key], reloaded.signatures[key], rng)
            except _Skip as skip:  # an unchanged signature whose inputs we can't make
                checks[key] = f"unchanged, not checked ({skip})"
            say(f"checked {key}: " + (checks[key] if isinstance(checks[key], str) else ", ".join(
                f"{name} max |diff| {value:.3g}" for name, value in checks[key].items())
                + f" over batches {', '.join(str(b) for b, _ in CHECK_ROUNDS)}"))
        if out_path.exists():
            out_path.rmdir()  # empty (checked above)
        os.replace(staging, out_path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    say(f"wrote {out_path} ({len(rewritten)} subgraph(s) fused)")
    return Report(rewritten, left, checks, str(out_path))


def run_convert_command(args, parser) -> int:
    """``fused-embedding convert IN_DIR OUT_DIR [--seed N] [--portable]``: see the module
    docstring for the exit statuses."""
    try:
        _check_dirs(args.in_dir, args.out_dir)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    try:
        convert_saved_model(args.in_dir, args.out_dir, seed=args.seed, portable=args.portable,
                            report=lambda line: print(line, flush=True))
    except ConversionError as exc:
        print(f"fused-embedding convert: {exc}", file=sys.stderr)
        return exc.exit_status
    return EXIT_WRITTEN
