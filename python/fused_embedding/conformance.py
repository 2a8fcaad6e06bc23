"""The conformance case matrix: the cases every backend is checked on, in one place.

Used by the tests (tests/test_core.py, tests/test_gpu_simulator.py), by
``fused-embedding validate`` and by ``benchmarks/gpu_check.py``, so the three check
the same things: every table dtype x id dtype x axis x mask, on shapes chosen to
break kernels (D = 1, odd D, D past a word boundary, B = 1, L = 1, L past one
shared-memory stage of ids). Each case makes its own fresh inputs and checks a
result against the float64 reference on a poisoned output.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .reference import embedding_mean_reference
from .semantics import BFLOAT16, Axis, output_shape
from .validation import compare, poisoned, random_inputs, tolerance, unwritten

TABLE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), BFLOAT16)
ID_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))

# (V, D, B, L). Host kernels: the benchmark's shape in small, then deliberately odd ones.
HOST_SHAPES = [(1000, 128, 16, 64), (50, 1, 7, 5), (50, 3, 1, 9), (300, 129, 5, 1), (17, 33, 3, 123)]
# The CUDA simulator runs one OS thread per CUDA thread: tiny. D = 1, odd, narrow (a
# sub-warp per bag), wide with a ragged last word; L = 37 crosses the ids' shared-memory stage.
SIMULATOR_SHAPES = [(50, 1, 2, 5), (50, 3, 1, 9), (40, 16, 3, 4), (20, 33, 2, 1), (30, 8, 2, 37), (300, 129, 1, 3)]
# A real GPU: many blocks, partial last blocks, column tiles (D = 512).
GPU_SHAPES = [(1000, 128, 257, 33), (50, 1, 64, 5), (400, 3, 33, 9), (1000, 16, 100, 40), (300, 129, 7, 3),
              (5000, 512, 65, 17), (100, 8, 1, 1)]


@dataclasses.dataclass(frozen=True)
class Case:
    """One conformance case: ``table [V][D]`` of ``table_dtype``, ``ids [B][L]`` of ``id_dtype``."""

    table_dtype: np.dtype
    id_dtype: np.dtype
    shape: tuple  # (V, D, B, L)
    axis: Axis
    mask_zero: bool

    @property
    def label(self) -> str:
        vocab, dim, batch, length = self.shape
        return (f"{self.table_dtype.name} {self.id_dtype.name} V={vocab} D={dim} B={batch} L={length} "
                f"axis={int(self.axis)}{' mask' if self.mask_zero else ''}")

    def inputs(self, rng):
        """Fresh (table, ids). Under a mask: about 30% padding, ids[0, 0] padding, the last
        bag all padding where B > 1 (zeros, not NaN), and NaN in the padding row, which no
        kernel may read."""
        table, ids = random_inputs(rng, *self.shape, self.table_dtype, self.id_dtype,
                                   padding_fraction=0.3 if self.mask_zero else 0.0)
        if self.mask_zero:
            if ids.size:
                ids[0, 0] = 0
                if ids.shape[0] > 1:
                    ids[-1, :] = 0
            table[0, :] = np.nan
        return table, ids

    def poisoned_output(self):
        vocab, dim, batch, length = self.shape
        return poisoned(output_shape(self.axis, batch, length, dim), self.table_dtype)

    def check(self, result, table, ids) -> str | None:
        """None when ``result`` (host) is this case's right answer, else what is wrong."""
        result = np.asarray(result)
        if result.dtype != self.table_dtype:
            return f"dtype {result.dtype}, expected {self.table_dtype}"
        if unwritten(result).any():
            return "output elements left unwritten (still poisoned)"
        expected = embedding_mean_reference(table, ids, self.axis, self.mask_zero)
        return compare(result, expected, **tolerance(self.table_dtype))


def run_poisoned(module, table, ids, axis, mask_zero, **options):
    """A backend module's launcher on host inputs and a poisoned host output (a GPU backend
    copies them over and back), so an element it never writes shows; returns that output."""
    out = poisoned(output_shape(Axis(axis), ids.shape[0], ids.shape[1], table.shape[1]), table.dtype)
    result = module.embedding_mean(table, ids, Axis(axis), mask_zero, out=out, **options)
    if result is not out:
        raise AssertionError(f"{module.__name__} returned a new array instead of writing the output it was given")
    return out


def cases(shapes, keep_one_in: int = 1) -> list[Case]:
    """Every table dtype x id dtype x axis x mask on each shape; with ``keep_one_in`` = k,
    every k-th of them counted on across shapes (k coprime to the 24 combinations gives
    each shape a different slice, and k shapes cover every combination)."""
    grid = [(dtype, id_dtype, axis, mask) for dtype in TABLE_DTYPES for id_dtype in ID_DTYPES
            for axis in Axis for mask in (False, True)]
    chosen, index = [], 0
    for shape in shapes:
        for dtype, id_dtype, axis, mask in grid:
            index += 1
            if index % keep_one_in == 0:
                chosen.append(Case(dtype, id_dtype, tuple(shape), axis, mask))
    return chosen
