"""Validation helpers: per-dtype tolerances, a verbose comparison, poisoned outputs, random inputs.

One place for them: tests, the `validate` command and the GPU check use these.
"""
from __future__ import annotations

import numpy as np

from .semantics import BFLOAT16

# Against the float64 reference computed from the same (already rounded) table
# values: the error is float32 accumulation plus one rounding of the result to
# the table's dtype (2^-11 relative for float16, 2^-8 for bfloat16).
REFERENCE_TOLERANCES = {
    np.dtype(np.float32): dict(rtol=1e-5, atol=1e-6),
    np.dtype(np.float16): dict(rtol=1e-3, atol=1e-5),
    BFLOAT16: dict(rtol=8e-3, atol=1e-4),
}

# A framework's result (Keras, tf.gather + reduce_mean) against the float64 reference:
# Keras pools float16 and bfloat16 tables in that dtype, so its own error grows with
# L. For validating the benchmark's baselines; the package's own results are judged
# against a framework by ``compare_to_framework``, relative to that framework's error.
KERAS_TOLERANCES = {
    np.dtype(np.float32): dict(rtol=1e-5, atol=1e-6),
    np.dtype(np.float16): dict(rtol=5e-3, atol=5e-4),
    BFLOAT16: dict(rtol=4e-2, atol=4e-3),
}


def tolerance(dtype, against="reference") -> dict:
    table = REFERENCE_TOLERANCES if against == "reference" else KERAS_TOLERANCES
    return table[np.dtype(dtype)]


def compare(actual, expected, *, rtol, atol, max_report=5) -> str | None:
    """None when ``actual`` matches ``expected`` elementwise, else a report.

    NaN matches NaN only in the same place, +-inf only the same inf. The report
    says how many elements differ, where, by how much, and any NaN/inf mismatch.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    if actual.shape != expected.shape:
        return f"shape {actual.shape} != expected {expected.shape}"
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    both_nan = np.isnan(a) & np.isnan(e)
    same_inf = np.isinf(a) & np.isinf(e) & (np.sign(a) == np.sign(e))
    with np.errstate(invalid="ignore"):
        close = np.abs(a - e) <= atol + rtol * np.abs(e)
    ok = close | both_nan | same_inf
    if ok.all():
        return None
    bad = np.argwhere(~ok)
    nan_mismatch = int((np.isnan(a) != np.isnan(e)).sum())
    atol_text = atol if np.ndim(atol) == 0 else f"per element, {np.min(atol):.3g}-{np.max(atol):.3g}"
    lines = [f"{len(bad)} of {a.size} elements differ (rtol={rtol}, atol={atol_text}); "
             f"NaN mismatches: {nan_mismatch}"]
    for index in bad[:max_report]:
        i = tuple(int(v) for v in index)
        allowed = atol if np.ndim(atol) == 0 else np.broadcast_to(atol, a.shape)[i]
        lines.append(f"  at {i}: got {a[i]!r}, expected {e[i]!r}, diff {abs(a[i] - e[i]):.3g} "
                     f"(allowed {allowed + rtol * abs(e[i]):.3g})")
    return "\n".join(lines)


def assert_close(actual, expected, dtype, against="reference"):
    report = compare(actual, expected, **tolerance(dtype, against))
    if report:
        raise AssertionError(report)


FLOAT32_UNIT_ROUNDOFF = 2.0**-24


def exact_weights(rng, n) -> np.ndarray:
    """(n,) float32 bag weights for tests: multiples of 1/4 in [-2, 2], zero included.
    Their float32 sums (and those of their squares) are exact, so a bag's denominator
    is 0 in float32 exactly where it is in float64, and never a cancellation's rounding."""
    return (rng.integers(-8, 9, n) / 4).astype(np.float32)


def bag_error_bound(table, values, offsets, weights, combiner) -> np.ndarray:
    """(B, D): per element of a bags result, a bound on its float32 error against the
    float64 reference. A sum of n products in float32, in any order, errs by at most
    (n + 1) u sum |w x| (u = 2^-24); divided by the denominator (exact for
    ``exact_weights`` and unweighted bags), plus one rounding of the quotient; 0 where
    the denominator is 0 (both give zeros). A QuantizedTable: (n + 4) u sum |w| (|q scale|
    + |bias|) over the denominator (``quantized_term_sizes``)."""
    from .reference import embedding_bag_reference
    w = np.ones(values.shape[0], np.float32) if weights is None else weights
    if getattr(getattr(table, "format", None), "quantized", False):
        # A quantized row adds (w scale) q with two roundings (w * scale, the multiply-add)
        # and w * bias apart, then the two sums: terms of size |q scale| + |bias|.
        sizes, extra = quantized_term_sizes(table), 4
    else:
        sizes, extra = np.abs(np.asarray(table, np.float64)), 2
    magnitude = embedding_bag_reference(sizes, values, offsets, np.abs(w), "sum")
    return summation_bound(magnitude, offsets, weights, combiner, extra_roundings=extra)


def quantized_term_sizes(qtable) -> np.ndarray:
    """float64 (V, D): per value of a QuantizedTable, |q * scale| + |bias| (Keras' layout:
    |q / scale|), the size of the terms the kernels add (the scale-weighted q and the bias
    apart)."""
    from .reference import dequantized_rows
    rows = dequantized_rows(qtable, np.arange(qtable.shape[0]))
    if qtable.biases is None:
        return np.abs(rows)
    biases = qtable.biases.astype(np.float64)[:, None]
    return np.abs(rows - biases) + np.abs(biases)


def summation_bound(magnitude, offsets, weights, combiner, extra_roundings: int) -> np.ndarray:
    """(B, D): (n + extra_roundings) u ``magnitude`` / |denominator| per bag of n ids, 0 where
    the denominator is 0; ``magnitude`` (B, D) the bag's sum of |terms|, the denominator
    the combiner's (1, sum of w, or sqrt of the sum of w^2; w = 1 unweighted)."""
    lengths = np.diff(offsets)
    if combiner == "sum":
        divisor = np.ones(lengths.shape[0])
    else:
        w = np.ones(int(offsets[-1])) if weights is None else np.asarray(weights, np.float64)
        bag_of = np.repeat(np.arange(lengths.shape[0]), lengths)
        divisor = np.abs(np.bincount(bag_of, w if combiner == "mean" else w ** 2, minlength=lengths.shape[0]))
        divisor = divisor if combiner == "mean" else np.sqrt(divisor)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(divisor[:, None] > 0, (lengths[:, None] + extra_roundings) * FLOAT32_UNIT_ROUNDOFF
                        * magnitude / divisor[:, None], 0.0)


def compare_bags(out, table, values, offsets, weights, combiner) -> str | None:
    """None when a bags result ``out`` (B, D) of the table's dtype, written into a poisoned
    buffer, is fully written and within ``bag_error_bound`` (plus the dtype's reference
    tolerance) of the float64 reference; else a report."""
    from .reference import embedding_bag_reference
    if out.dtype != table.dtype or out.shape != (offsets.shape[0] - 1, table.shape[1]):
        return f"got {out.dtype} {out.shape}, expected {table.dtype} {(offsets.shape[0] - 1, table.shape[1])}"
    if unwritten(out).any():
        return f"{int(unwritten(out).sum())} elements never written"
    expected = embedding_bag_reference(table, values, offsets, weights, combiner)
    base = tolerance(table.dtype)
    return compare(out, expected, rtol=base["rtol"],
                   atol=bag_error_bound(table, values, offsets, weights, combiner) + base["atol"])


def compare_to_framework(actual, framework, reference, dtype) -> str | None:
    """None when ``actual`` is as close to a framework's result as that framework is to
    the float64 ``reference``, else a report.

    Judged as flash-attention judges low precision: elementwise,
    ``|actual - framework| <= |framework - reference| + reference tolerance``. A fixed
    tolerance fails at random once in a few thousand seeds, where Keras' own float16
    rounding of a long sum happens to land far from ours; this bound moves with it.
    """
    framework64 = np.asarray(framework).astype(np.float64)
    reference64 = np.asarray(reference).astype(np.float64)
    if framework64.shape != reference64.shape:
        return f"framework shape {framework64.shape} != reference shape {reference64.shape}"
    base = tolerance(dtype)
    with np.errstate(invalid="ignore"):
        framework_error = np.abs(framework64 - reference64)
    # Where the framework is NaN/inf, compare() matches NaN to NaN and inf to inf alone.
    framework_error = np.where(np.isfinite(framework_error), framework_error, 0.0)
    return compare(actual, framework64, rtol=base["rtol"], atol=framework_error + base["atol"])


def assert_close_to_framework(actual, framework, reference, dtype):
    report = compare_to_framework(actual, framework, reference, dtype)
    if report:
        raise AssertionError(report)


# A value no correct output takes (means of the test tables stay far below it),
# written into outputs before a kernel runs so an element it never writes fails.
POISON = -12345.0


def poisoned(shape, dtype):
    """An output buffer filled with POISON."""
    return np.full(shape, POISON, dtype=dtype)


def unwritten(out) -> np.ndarray:
    """Where host array ``out`` still holds POISON's bits (bool, out's shape).

    Compared as bits: float16 and bfloat16 round the poison (to -12344 and -12352),
    so a value compare against POISON would never see it.
    """
    out = np.asarray(out)
    bits = f"u{out.dtype.itemsize}"
    return out.view(bits) == poisoned((1,), out.dtype).view(bits)[0]


def short_bag_lengths(rng, batch, max_length=6) -> np.ndarray:
    """[B] bag lengths in [0, max_length], the first bag empty (it pools to zeros) and the
    last one not, so every batch has both."""
    lengths = rng.integers(0, max_length + 1, size=batch)
    lengths[0] = 0
    lengths[-1] = max(lengths[-1], 1)
    return lengths


def random_bags(rng, vocab, dim, lengths, table_dtype=np.float32, id_dtype=np.int32, weighted=False):
    """Fresh random CSR bags of the given ``lengths`` [B]: (table [V][D] normal values,
    values [N] uniform ids, offsets [B + 1] int64, weights [N] float32 from ``exact_weights``
    or None)."""
    table = rng.standard_normal((vocab, dim), dtype=np.float32).astype(table_dtype)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    values = rng.integers(0, vocab, int(offsets[-1])).astype(id_dtype)
    weights = exact_weights(rng, values.shape[0]) if weighted else None
    return table, values, offsets, weights


def random_inputs(rng, vocab, dim, batch, length, table_dtype=np.float32, id_dtype=np.int32,
                  padding_fraction=0.0):
    """Fresh random (table [V][D], ids [B][L]) for validation: uniform ids, normal table values.

    padding_fraction of the ids are set to 0 (the padding id under mask_zero).
    """
    table = rng.standard_normal((vocab, dim), dtype=np.float32).astype(table_dtype)
    ids = rng.integers(0, vocab, size=(batch, length)).astype(id_dtype)
    if padding_fraction:
        ids[rng.random((batch, length)) < padding_fraction] = 0
    return table, ids
