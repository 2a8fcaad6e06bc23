"""Scalar helpers for the Numba CPU kernels: 16-bit float formats and prefetch.

Numba's CPU target has no float16 or bfloat16 type, so half-width tables and
outputs travel as uint16 bit patterns and are converted here with a few LLVM
instructions (``fpext``/``fptrunc`` for float16, which x86 F16C does in
hardware; a shift and a round-to-nearest-even for bfloat16). The kernels call
``widen`` and ``store`` and never look at the format themselves.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ..launch import CACHE_LINE_BYTES
from ..semantics import FORMAT_BFLOAT16


@intrinsic
def _half_bits_to_float32(typingctx, bits):
    if bits != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def _bfloat16_bits_to_float32(typingctx, bits):
    if bits != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def _float32_to_half_bits(typingctx, value):
    if value != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


@intrinsic
def _float32_to_bfloat16_bits(typingctx, value):
    """Round to nearest even, as ml_dtypes and TF do; NaN stays a quiet NaN."""
    if value != types.float32:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        bits = builder.bitcast(args[0], i32)
        high = builder.lshr(bits, ir.Constant(i32, 16))
        lsb = builder.and_(high, ir.Constant(i32, 1))
        rounded = builder.lshr(builder.add(builder.add(bits, ir.Constant(i32, 0x7FFF)), lsb),
                               ir.Constant(i32, 16))
        quiet_nan = builder.or_(high, ir.Constant(i32, 0x40))
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.trunc(builder.select(is_nan, quiet_nan, rounded), ir.IntType(16))
    return types.uint16(types.float32), codegen


def widen(x, fmt):
    """float32 value of one table element (float32, or uint16 bits in format ``fmt``)."""


@overload(widen, inline="always")
def _widen(x, fmt):
    if x == types.float32:
        return lambda x, fmt: x
    if x == types.uint16:
        def from_bits(x, fmt):
            if fmt == FORMAT_BFLOAT16:
                return _bfloat16_bits_to_float32(x)
            return _half_bits_to_float32(x)
        return from_bits
    return None


def store(out, i, j, value, fmt):
    """out[i, j] = value, rounded to the output's format (float32, or uint16 bits)."""


@overload(store, inline="always")
def _store(out, i, j, value, fmt):
    if out.dtype == types.float32:
        def store_float32(out, i, j, value, fmt):
            out[i, j] = value
        return store_float32
    if out.dtype == types.uint16:
        def store_bits(out, i, j, value, fmt):
            if fmt == FORMAT_BFLOAT16:
                out[i, j] = _float32_to_bfloat16_bits(np.float32(value))
            else:
                out[i, j] = _float32_to_half_bits(np.float32(value))
        return store_bits
    return None


def elements_per_cache_line(array):
    """Elements of ``array`` in one 64-byte cache line, as a compile-time constant.

    A constant lets the per-row prefetch loop unroll; a step computed at run
    time costs a division per row (measured: 1.4x slower overall, NOTES.md).
    """


@overload(elements_per_cache_line, inline="always")
def _elements_per_cache_line(array):
    per_line = max(1, CACHE_LINE_BYTES * 8 // array.dtype.bitwidth)
    return lambda array: per_line


# llvm.prefetch locality hint: all cache levels. The gathered rows were once
# prefetched non-temporal (locality 0, read once): on the AMD EPYC machine that cost
# nothing, but on an Intel Xeon (AVX-512) the dense kernel ran 1.2-2.2x slower than
# torch's embedding_bag with it and 0.44-0.88x with this hint, at every prefetch
# distance (benchmarks/NOTES.md).
LOCALITY_KEEP = 3


def _make_prefetch(locality: int):
    @intrinsic
    def prefetch(typingctx, array, row, col):
        """Hint the cache to load array[row, col]'s line; never faults, returns nothing."""
        if not isinstance(array, types.Array) or array.ndim != 2:
            return None

        def codegen(context, builder, sig, args):
            arrty = sig.args[0]
            ary = context.make_array(arrty)(context, builder, args[0])
            inds = [context.cast(builder, v, t, types.intp) for v, t in zip(args[1:], sig.args[1:])]
            ptr = cgutils.get_item_pointer(context, builder, arrty, ary, inds, wraparound=False)
            i8p = ir.IntType(8).as_pointer()
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
            # read, this locality, data cache
            builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0),
                              ir.Constant(i32, locality), ir.Constant(i32, 1)])
            return context.get_dummy_value()
        return types.none(array, row, col), codegen
    return prefetch


prefetch = _make_prefetch(LOCALITY_KEEP)
