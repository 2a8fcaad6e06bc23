"""Summing gathered rows with the accumulators in vector registers, as LLVM IR.

Numba has no vector type, so a loop over a bag's rows that adds into an array
keeps the accumulator in memory: a load and a store per 16 floats per row,
which also shrinks how many rows the out-of-order core can have in flight.
These intrinsics emit the loop themselves: ``n_vectors`` <16 x float> phi
registers, one 16-wide load (and widening, for 16-bit tables) per vector per
row, the lines of the same columns of the row a fixed distance ahead prefetched
in the same iteration (and the line of its last byte, for tables not aligned to
64 bytes) (a fixed, unrolled count: a loop over a run-time count of
lines cost more than the prefetch saved on narrow rows), and one store of the
sums when the bag ends. A row whose length is not a multiple of 16 ends in a
masked vector (``llvm.masked.load``: the lanes past the row are neither read nor
faulted on) in the same pass as its last whole vectors, so each row's lines are
read once while they are in cache; a separate scalar pass over the last D % 16
columns of every row made D=24 and D=40 1.5-2.6x slower than torch. Measured in
benchmarks/NOTES.md.
"""
from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ..launch import CACHE_LINE_BYTES
from ..semantics import FORMAT_BFLOAT16, FORMAT_FLOAT16, FORMAT_FLOAT32
from .cpu_scalars import LOCALITY_KEEP

LANES = 16  # floats per vector: one cache line of float32, one zmm register


def _widen(builder, raw, elem_type, fmt: int):
    """<16 x float> from a loaded <16 x elem>: float32 as is; 16-bit bits in format fmt."""
    vec_f32 = ir.VectorType(ir.FloatType(), LANES)
    if isinstance(elem_type, ir.FloatType):
        return raw
    if fmt == FORMAT_BFLOAT16:
        wide = builder.zext(raw, ir.VectorType(ir.IntType(32), LANES))
        shifted = builder.shl(wide, ir.Constant(ir.VectorType(ir.IntType(32), LANES), [16] * LANES))
        return builder.bitcast(shifted, vec_f32)
    return builder.fpext(builder.bitcast(raw, ir.VectorType(ir.HalfType(), LANES)), vec_f32)


def _make_sum_rows(n_vectors: int, fmt: int, masked_last: bool):
    @intrinsic
    def sum_rows(typingctx, table, rows, count, col, last_lanes, ahead_ids, ahead_start, ahead_stop, acc):
        """acc[col:col + w] = sum over k < count of table[rows[k], col:col + w] (float32),
        w = 16*n, or 16*(n - 1) + last_lanes when masked_last (last_lanes in 1..15, the
        columns the last, masked vector holds; ignored otherwise).

        While summing row k, prefetches the same columns of row
        ahead_ids[ahead_start + k] if ahead_start + k < ahead_stop: every pass
        fetches its own column block ahead, with a fixed, unrolled count of lines.
        """
        if not (isinstance(table, types.Array) and table.ndim == 2 and table.layout == "C"
                and table.dtype in (types.float32, types.uint16)):
            return None

        def codegen(context, builder, sig, args):
            (table_v, rows_v, count_v, col_v, lanes_v, ahead_v, start_v, stop_v, acc_v) = args
            (table_t, rows_t, count_t, col_t, lanes_t, ahead_t, start_t, stop_t, acc_t) = sig.args
            i64 = ir.IntType(64)
            i8p = ir.IntType(8).as_pointer()

            def as_i64(value, ty):
                return context.cast(builder, value, ty, types.int64)

            table_a = context.make_array(table_t)(context, builder, table_v)
            rows_a = context.make_array(rows_t)(context, builder, rows_v)
            ahead_a = context.make_array(ahead_t)(context, builder, ahead_v)
            acc_a = context.make_array(acc_t)(context, builder, acc_v)
            row_stride = builder.extract_value(table_a.strides, 0)
            elem_type = context.get_data_type(table_t.dtype)
            item = elem_type.width // 8 if isinstance(elem_type, ir.IntType) else 4
            vec_raw = ir.VectorType(elem_type, LANES)
            vec_f32 = ir.VectorType(ir.FloatType(), LANES)
            count_i = as_i64(count_v, count_t)
            col_bytes = builder.mul(as_i64(col_v, col_t), ir.Constant(i64, item))
            start_i, stop_i = as_i64(start_v, start_t), as_i64(stop_v, stop_t)
            base = builder.bitcast(table_a.data, i8p)
            pf_fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [i8p, ir.IntType(32)] + [ir.IntType(32)] * 2),
                "llvm.prefetch.p0")

            i32 = ir.IntType(32)
            i1 = ir.IntType(1)
            last = n_vectors - 1
            vec_bytes = LANES * item
            if masked_last:
                # Lanes below last_lanes, computed once (a k-register on AVX-512).
                lanes_i = as_i64(lanes_v, lanes_t)
                splat = builder.insert_element(ir.Constant(ir.VectorType(i64, LANES), None), lanes_i,
                                               ir.Constant(i32, 0))
                splat = builder.shuffle_vector(splat, splat, ir.Constant(ir.VectorType(i32, LANES), [0] * LANES))
                mask = builder.icmp_unsigned("<", ir.Constant(ir.VectorType(i64, LANES), list(range(LANES))),
                                             splat)
                suffix = "v16f32" if isinstance(elem_type, ir.FloatType) else f"v16i{elem_type.width}"
                mask_t = ir.VectorType(i1, LANES)
                masked_load = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(vec_raw, [vec_raw.as_pointer(), i32, mask_t, vec_raw]),
                    f"llvm.masked.load.{suffix}.p0")
                masked_store = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(ir.VoidType(), [vec_f32, vec_f32.as_pointer(), i32, mask_t]),
                    "llvm.masked.store.v16f32.p0")
                # The block's last byte, for the straddle prefetch below.
                last_byte = builder.sub(builder.mul(builder.add(ir.Constant(i64, last * LANES), lanes_i),
                                                    ir.Constant(i64, item)), ir.Constant(i64, 1))
            else:
                last_byte = ir.Constant(i64, n_vectors * vec_bytes - 1)

            def prefetch_at(ptr, offset):  # read, all cache levels (cpu_scalars), data
                builder.call(pf_fn, [builder.gep(ptr, [ir.Constant(i64, offset)]), ir.Constant(i32, 0),
                                     ir.Constant(i32, LOCALITY_KEEP), ir.Constant(i32, 1)])

            # A table that is not 64-byte aligned (NumPy's are 16) puts every column
            # block across one line more than its size: that line is prefetched too
            # (left to a demand miss it stalls the row), and only then (on aligned
            # tables the extra prefetch measured 5-10% slower).
            misalignment = builder.or_(builder.or_(builder.ptrtoint(base, i64), row_stride), col_bytes)
            blocks_straddle = builder.icmp_unsigned(
                "!=", builder.and_(misalignment, ir.Constant(i64, CACHE_LINE_BYTES - 1)), ir.Constant(i64, 0))

            entry = builder.basic_block
            loop = builder.append_basic_block("rows.loop")
            body = builder.append_basic_block("rows.body")
            prefetch_bb = builder.append_basic_block("rows.prefetch")
            prefetch_tail_bb = builder.append_basic_block("rows.prefetch_tail")
            after_prefetch = builder.append_basic_block("rows.after_prefetch")
            done = builder.append_basic_block("rows.done")
            builder.branch(loop)

            builder.position_at_end(loop)
            k = builder.phi(i64, "k")
            k.add_incoming(ir.Constant(i64, 0), entry)
            accs = []
            for _ in range(n_vectors):
                phi = builder.phi(vec_f32)
                phi.add_incoming(ir.Constant(vec_f32, None), entry)
                accs.append(phi)
            builder.cbranch(builder.icmp_signed("<", k, count_i), body, done)

            builder.position_at_end(body)
            row = builder.load(builder.gep(rows_a.data, [k]))
            row_ptr = builder.gep(base, [builder.add(builder.mul(as_i64(row, rows_t.dtype), row_stride),
                                                     col_bytes)])
            new_accs = []
            for v in range(n_vectors):
                ptr = builder.bitcast(builder.gep(row_ptr, [ir.Constant(i64, v * LANES * item)]),
                                      vec_raw.as_pointer())
                if masked_last and v == last:  # the lanes past the row stay 0
                    raw = builder.call(masked_load, [ptr, ir.Constant(i32, item), mask,
                                                     ir.Constant(vec_raw, None)])
                else:
                    raw = builder.load(ptr, align=item)
                new_accs.append(builder.fadd(accs[v], _widen(builder, raw, elem_type, fmt)))
            ahead_pos = builder.add(start_i, k)
            builder.cbranch(builder.icmp_signed("<", ahead_pos, stop_i), prefetch_bb, after_prefetch)

            builder.position_at_end(prefetch_bb)
            ahead_row = as_i64(builder.load(builder.gep(ahead_a.data, [ahead_pos])), ahead_t.dtype)
            ahead_ptr = builder.gep(base, [builder.add(builder.mul(ahead_row, row_stride), col_bytes)])
            # A line per 64 bytes of n whole vectors: for a masked block each of these
            # holds some of its columns, and its last line is the straddle prefetch's.
            for offset in range(0, n_vectors * vec_bytes, CACHE_LINE_BYTES):
                prefetch_at(ahead_ptr, offset)
            builder.cbranch(blocks_straddle, prefetch_tail_bb, after_prefetch)

            builder.position_at_end(prefetch_tail_bb)
            builder.call(pf_fn, [builder.gep(ahead_ptr, [last_byte]), ir.Constant(i32, 0),
                                 ir.Constant(i32, LOCALITY_KEEP), ir.Constant(i32, 1)])
            builder.branch(after_prefetch)

            builder.position_at_end(after_prefetch)
            k_next = builder.add(k, ir.Constant(i64, 1))
            k.add_incoming(k_next, after_prefetch)
            for phi, value in zip(accs, new_accs):
                phi.add_incoming(value, after_prefetch)
            builder.branch(loop)

            builder.position_at_end(done)
            acc_base = builder.bitcast(acc_a.data, i8p)
            acc_col = builder.mul(as_i64(col_v, col_t), ir.Constant(i64, 4))
            for v in range(n_vectors):
                ptr = builder.bitcast(builder.gep(acc_base, [builder.add(acc_col, ir.Constant(i64, v * LANES * 4))]),
                                      vec_f32.as_pointer())
                if masked_last and v == last:  # acc has the row's D columns, no more
                    builder.call(masked_store, [accs[v], ptr, ir.Constant(i32, 4), mask])
                else:
                    builder.store(accs[v], ptr, align=4)
            return context.get_dummy_value()

        return types.none(table, rows, count, col, last_lanes, ahead_ids, ahead_start, ahead_stop, acc), codegen
    return sum_rows


def _make_pass(passes):
    """An inlined function running passes[vectors - 1] (vectors in 1..8): a run-time pick
    among intrinsics, each with its count of vectors unrolled."""
    x1, x2, x3, x4, x5, x6, x7, x8 = passes

    @njit(inline="always")
    def run_pass(vectors, table, rows, count, col, last_lanes, ahead_ids, ahead_start, ahead_stop, acc):
        if vectors == 8:
            x8(table, rows, count, col, last_lanes, ahead_ids, ahead_start, ahead_stop, acc)
        elif vectors == 7:
            x7(table, rows, count, col, last_lanes, ahead_ids, ahead_start, ahead_stop, acc)
        elif vectors == 6:
            x6(table, rows, count, col, last_lanes, ahead_ids, ahead_start, ahead_stop, acc)
        elif vectors == 5:
            x5(table, rows, count, col, last_lanes, ahead_ids, ahead_start, ahead_stop, acc)
        elif vectors == 4:
            x4(table, rows, count, col, last_lanes, ahead_ids, ahead_start, ahead_stop, acc)
        elif vectors == 3:
            x3(table, rows, count, col, last_lanes, ahead_ids, ahead_start, ahead_stop, acc)
        elif vectors == 2:
            x2(table, rows, count, col, last_lanes, ahead_ids, ahead_start, ahead_stop, acc)
        elif vectors == 1:
            x1(table, rows, count, col, last_lanes, ahead_ids, ahead_start, ahead_stop, acc)
    return run_pass


def _make_sum_columns(fmt: int):
    """An inlined function that sums a bag's rows over all D columns, with intrinsics
    specialised for one table format (a run-time format select in the loop measured
    1.3x slower for float16 than float32; NOTES.md).

    128 columns a pass while more than 128 are left, then one pass over the rest (1 to
    128 columns: up to 8 vectors, the last one masked unless D is a multiple of 16), so
    a row takes as few passes as possible (measured: D=96 as 64 + 32 in two passes ran
    1.4x slower than torch's one) and its tail rides in the pass of its last vectors.
    A row of a multiple of 16 runs the unmasked intrinsics only, as before the tail
    was masked.
    """
    whole = tuple(_make_sum_rows(n, fmt, False) for n in range(1, 9))
    whole_pass = _make_pass(whole)
    masked_pass = _make_pass(tuple(_make_sum_rows(n, fmt, True) for n in range(1, 9)))
    x8 = whole[7]

    @njit(inline="always")
    def sum_columns(table, rows, count, ahead_ids, ahead_start, ahead_stop, acc):
        dim = table.shape[1]
        col = 0
        while dim - col > 8 * LANES:
            x8(table, rows, count, col, LANES, ahead_ids, ahead_start, ahead_stop, acc)
            col += 8 * LANES
        rest = dim - col
        vectors = (rest + LANES - 1) // LANES
        last_lanes = rest - (vectors - 1) * LANES
        if last_lanes == LANES:
            whole_pass(vectors, table, rows, count, col, LANES, ahead_ids, ahead_start, ahead_stop, acc)
        elif rest > 0:
            masked_pass(vectors, table, rows, count, col, last_lanes, ahead_ids, ahead_start, ahead_stop, acc)
        return dim
    return sum_columns


_sum_columns_float32 = _make_sum_columns(FORMAT_FLOAT32)
_sum_columns_float16 = _make_sum_columns(FORMAT_FLOAT16)
_sum_columns_bfloat16 = _make_sum_columns(FORMAT_BFLOAT16)


def sum_vector_columns(table, rows, count, fmt, ahead_ids, ahead_start, ahead_stop, acc):
    """Sum the bag's rows into acc[:D] in vector passes (above).

    Returns the first column left for a scalar pass: D, or 0 for a table that isn't
    C-contiguous (the intrinsics read rows at a stride of whole rows).
    """


@overload(sum_vector_columns, inline="always")
def _sum_vector_columns(table, rows, count, fmt, ahead_ids, ahead_start, ahead_stop, acc):
    if not (isinstance(table, types.Array) and table.layout == "C"):
        return lambda table, rows, count, fmt, ahead_ids, ahead_start, ahead_stop, acc: 0
    if table.dtype == types.float32:
        def float32_rows(table, rows, count, fmt, ahead_ids, ahead_start, ahead_stop, acc):
            return _sum_columns_float32(table, rows, count, ahead_ids, ahead_start, ahead_stop, acc)
        return float32_rows

    def half_width_rows(table, rows, count, fmt, ahead_ids, ahead_start, ahead_stop, acc):
        if fmt == FORMAT_BFLOAT16:
            return _sum_columns_bfloat16(table, rows, count, ahead_ids, ahead_start, ahead_stop, acc)
        return _sum_columns_float16(table, rows, count, ahead_ids, ahead_start, ahead_stop, acc)
    return half_width_rows
