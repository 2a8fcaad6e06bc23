"""Argument checks shared by the core op, the TF op and the Keras layer: one message each.

The checks take what every framework can say about an input before it runs (a dtype
name, a rank and dims that may be unknown, None), so a NumPy array is refused with
the same words as a symbolic TF tensor. The core op checks concrete arrays with
``check_host_inputs``; the TF op checks symbolic tensors as its graph is built.
"""
from __future__ import annotations

import numpy as np

from .semantics import Axis
from .spec import FLOAT_FORMATS, TableFormat

TABLE_DTYPE_NAMES = tuple(fmt.storage_dtype.name for fmt in FLOAT_FORMATS)  # float32, float16, bfloat16
ID_DTYPE_NAMES = ("int32", "int64")
ID_DTYPES = tuple(np.dtype(name) for name in ID_DTYPE_NAMES)


def _shape_text(shape) -> str:
    return str(tuple(None if d is None else int(d) for d in shape))


def check_mask_zero(mask_zero) -> None:
    if not isinstance(mask_zero, (bool, np.bool_)):
        raise TypeError(f"mask_zero must be a bool, got {type(mask_zero).__name__} {mask_zero!r}")


def table_dtype_error(dtype_name: str) -> TypeError:
    return TypeError(f"table must be {', '.join(TABLE_DTYPE_NAMES[:-1])} or {TABLE_DTYPE_NAMES[-1]}, "
                     f"got {dtype_name}")


def ids_dtype_error(dtype_name: str, floating: bool) -> TypeError:
    hint = " (float ids are not truncated as Keras does)" if floating else ""
    return TypeError(f"ids must be int32 or int64, got {dtype_name}{hint}")


def check_table_shape(shape) -> None:
    """``shape``: the table's dims (None for an unknown one), or None for an unknown rank."""
    if shape is None:
        return
    if len(shape) != 2:
        raise ValueError(f"table must be 2-D (V, D), got {len(shape)}-D with shape {_shape_text(shape)}")
    if shape[1] is not None and shape[1] < 1:
        raise ValueError(f"table must have at least one column (D >= 1), got shape {_shape_text(shape)}")


def check_ids_shape(shape) -> None:
    """``shape``: the ids' dims (None for an unknown one), or None for an unknown rank."""
    if shape is not None and len(shape) != 2:
        raise ValueError(f"ids must be 2-D (B, L), got {len(shape)}-D with shape {_shape_text(shape)}")


_AXES = {1: Axis.SEQUENCE, 2: Axis.EMBEDDING, -1: Axis.EMBEDDING}


def normalize_axis(axis) -> Axis:
    if type(axis) is int and axis in _AXES:  # the common case, before the type checks below
        return _AXES[axis]
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int (1, 2 or -1), got {type(axis).__name__} {axis!r}")
    if axis in _AXES:
        return _AXES[int(axis)]
    raise ValueError(f"axis must be 1 (mean over the sequence -> (B, D)) or 2 / -1 "
                     f"(mean over the embedding -> (B, L)), got {axis}")


def check_backend_name(name) -> None:
    """Raise ValueError unless ``name`` is one of the registered backends' names."""
    from . import backends
    if name not in backends.REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected one of {sorted(backends.REGISTRY)}")


def check_host_inputs(table, ids, mask_zero) -> TableFormat:
    """The dense op's checks on concrete arrays (NumPy, or GPU arrays with a NumPy dtype);
    returns the table's format."""
    check_mask_zero(mask_zero)
    fmt = TableFormat.of_dtype(table.dtype)
    if fmt is None:
        raise table_dtype_error(str(np.dtype(table.dtype)))
    check_table_shape(table.shape)
    if ids.dtype not in ID_DTYPES and np.dtype(ids.dtype) not in ID_DTYPES:
        ids_dtype = np.dtype(ids.dtype)
        raise ids_dtype_error(str(ids_dtype), ids_dtype.kind in "fc")
    check_ids_shape(ids.shape)
    return fmt
