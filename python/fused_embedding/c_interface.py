"""The compiled TF kernel's C interface, declared once.

Three sides meet at it: the cpu backend's launcher, a Numba C callback
(``backends/cpu_cfunc.py``); the C++ kernel that calls it and exports its
configuration entry points (``tf_host_op.cc``); and ``tf_compiled.py``, which hands
the library its callbacks through ctypes. Each declaration below gives all three
their types: the Numba signature, the ctypes types and a C header,
``fused_embedding_c_interface.h``, written beside the build and included by the
C++ source. A mismatch (an argument added on one side only) is then a compile
error in C++ or a different Numba/ctypes signature, never a silent misread.

The header also carries the constants the kernel's plain C++ loops need where no
Python configures the library (TF Serving): the padding id, the pooling codes and
the bad-id and row messages, each from its one definition in the Python package.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json

HEADER_NAME = "fused_embedding_c_interface.h"

# A type's name -> (C spelling, ctypes type, Numba type name).
_TYPES = {
    "int64": ("int64_t", ctypes.c_int64, "int64"),
    "int": ("int", ctypes.c_int, "int32"),
    "float": ("float", ctypes.c_float, "float32"),
    "const void*": ("const void*", ctypes.c_void_p, "voidptr"),
    "void*": ("void*", ctypes.c_void_p, "voidptr"),
    "char*": ("char*", ctypes.c_void_p, "voidptr"),
    "const char*": ("const char*", ctypes.c_char_p, None),
    "const int*": ("const int*", ctypes.POINTER(ctypes.c_int), None),
}


@dataclasses.dataclass(frozen=True)
class Function:
    """A C function: its name, return type and (argument name, type) pairs. A
    ``callback`` is a function pointer type (a typedef in C, CFUNCTYPE in ctypes);
    otherwise it is a function the library exports."""

    name: str
    returns: str
    arguments: tuple
    callback: bool = False

    def c_declaration(self) -> str:
        arguments = ", ".join(f"{_c(kind)} {name}" for name, kind in self.arguments) or "void"
        if self.callback:
            return f"typedef {_c(self.returns)} (*{self.name})({arguments});"
        return f"{_c(self.returns)} {self.name}({arguments});"

    def ctypes_argtypes(self) -> list:
        return [_ctypes(kind) for _, kind in self.arguments]

    def ctypes_restype(self):
        return None if self.returns == "void" else _ctypes(self.returns)

    def ctypes_functype(self):
        return ctypes.CFUNCTYPE(self.ctypes_restype(), *self.ctypes_argtypes())

    def numba_signature(self):
        from numba import types
        return getattr(types, _TYPES[self.returns][2])(
            *(getattr(types, _TYPES[kind][2]) for _, kind in self.arguments))

    def bind(self, library: ctypes.CDLL):
        """The library's exported function with this declaration's ctypes types."""
        function = getattr(library, self.name)
        function.restype = self.ctypes_restype()
        function.argtypes = self.ctypes_argtypes()
        return function


def _c(kind: str) -> str:
    return kind if kind == "void" or kind in CALLBACKS else _TYPES[kind][0]


def _ctypes(kind: str):
    # A callback travels as its address (ctypes.cast(function, ctypes.c_void_p), or a
    # Numba cfunc's .address).
    return ctypes.c_void_p if kind in CALLBACKS else _TYPES[kind][1]


# backends/cpu_cfunc.py's launch_sequence_mean: the mean over the sequence axis of ids [B][L]
# (4- or 8-byte ints) into out [B][D], the table [V][D] in ``format`` (semantics.FORMAT_*).
# Returns the first flat position b * L + l of an id outside [0, V), or B * L.
LAUNCHER = Function("Launcher", "int64", (
    ("table", "const void*"), ("vocab", "int64"), ("dim", "int64"), ("format", "int64"),
    ("ids", "const void*"), ("id_bytes", "int64"), ("batch", "int64"), ("length", "int64"),
    ("mask_zero", "int64"), ("team_size", "int64"), ("serial_only", "int64"), ("out", "void*"),
), callback=True)

# backends/cpu_bags_cfunc.py's launch_bags: CSR bags, values [total] (4- or 8-byte ints) with
# offsets [batch + 1] int64 (validated: 0, non-decreasing, total) and, when weighted, float32
# weights [total] (else any valid address), pooled by spec.Pooling.kernel_code into out
# [batch][D], the table [V][D] in ``format``. Returns the first position in values of an id
# outside [0, V), or total.
BAG_LAUNCHER = Function("BagLauncher", "int64", (
    ("table", "const void*"), ("vocab", "int64"), ("dim", "int64"), ("format", "int64"),
    ("values", "const void*"), ("id_bytes", "int64"), ("total", "int64"), ("offsets", "const void*"),
    ("batch", "int64"), ("weights", "const void*"), ("weighted", "int64"), ("pooling", "int64"),
    ("team_size", "int64"), ("serial_only", "int64"), ("out", "void*"),
), callback=True)

# tf_compiled.py's _output_too_large: whether a (rows, cols) output of that TF DataType fits
# the host's memory: 0 when it does, else the length of the MemoryError message written
# NUL-terminated into message (capacity bytes).
OUTPUT_CHECK = Function("OutputCheck", "int64", (
    ("rows", "int64"), ("cols", "int64"), ("dtype", "int64"), ("message", "char*"), ("capacity", "int64"),
), callback=True)

CALLBACKS = {f.name: f for f in (LAUNCHER, BAG_LAUNCHER, OUTPUT_CHECK)}

# Exported by tf_host_op.cc. configure: once, after loading, before any op is built; formats
# are count pairs (DataType enum, kernel format code); output_check is asked about every
# output of check_min_bytes bytes or more. Returns 0, or -1 for a DataType it can't hold.
CONFIGURE = Function("fused_embedding_configure", "int", (
    ("launcher", "Launcher"), ("team_size", "int64"), ("bad_id_message", "const char*"),
    ("count", "int"), ("dtypes", "const int*"), ("formats", "const int*"),
    ("output_check", "OutputCheck"), ("check_min_bytes", "int64"),
))
# Exported by tf_host_op.cc: the bags op's launcher and its messages, once after configure:
# a bad id (with {id}, {position}, {bag} and {vocab}), sparse ids out of row order, and an
# id in a row outside the dense shape (with {row}, {position} and {batch}).
CONFIGURE_BAGS = Function("fused_embedding_configure_bags", "int", (
    ("launcher", "BagLauncher"), ("bad_id_message", "const char*"), ("order_message", "const char*"),
    ("row_message", "const char*"),
))
# 1: the launcher runs on the calling thread (a process forked after GNU OpenMP ran).
SET_SERIAL_ONLY = Function("fused_embedding_set_serial_only", "void", (("serial_only", "int64"),))
# Tests: fill every output with value before the kernel writes it, so a skipped element shows.
POISON_OUTPUTS = Function("fused_embedding_poison_outputs", "void", (("enabled", "int"), ("value", "float")))

EXPORTED = (CONFIGURE, CONFIGURE_BAGS, SET_SERIAL_ONLY, POISON_OUTPUTS)


def _c_string(text: str) -> str:
    """``text`` as a C string literal (JSON's escapes are C's for these ASCII messages)."""
    if not text.isascii():
        raise ValueError(f"the C header takes ASCII messages only, got {text!r}")
    return json.dumps(text)


def constants() -> dict:
    """The C header's #defines: name -> C literal."""
    from .backends import (BAG_OUT_OF_RANGE_MESSAGE, CANONICAL_ORDER_MESSAGE, OUT_OF_RANGE_MESSAGE,
                           ROW_OUTSIDE_MESSAGE)
    from .semantics import PADDING_ID
    from .spec import Pooling
    return {
        "FUSED_EMBEDDING_PADDING_ID": str(int(PADDING_ID)),
        **{f"FUSED_EMBEDDING_POOLING_{p.name}": str(p.kernel_code) for p in Pooling},
        "FUSED_EMBEDDING_OUT_OF_RANGE_MESSAGE": _c_string(OUT_OF_RANGE_MESSAGE),
        "FUSED_EMBEDDING_BAG_OUT_OF_RANGE_MESSAGE": _c_string(BAG_OUT_OF_RANGE_MESSAGE),
        "FUSED_EMBEDDING_CANONICAL_ORDER_MESSAGE": _c_string(CANONICAL_ORDER_MESSAGE),
        "FUSED_EMBEDDING_ROW_OUTSIDE_MESSAGE": _c_string(ROW_OUTSIDE_MESSAGE),
    }


def header_text() -> str:
    """The C header the C++ source includes: every declaration above, and ``constants()``."""
    lines = ["// Generated from fused_embedding/c_interface.py: edit that file, not this one.",
             "#pragma once", "#include <cstdint>", ""]
    lines += [f"#define {name} {value}" for name, value in constants().items()] + [""]
    lines += [f.c_declaration() for f in CALLBACKS.values()]
    lines += ["", 'extern "C" {'] + [f.c_declaration() for f in EXPORTED] + ['}  // extern "C"', ""]
    return "\n".join(lines)
