"""Property tests of embedding_bag on the host backends, against the float64 reference.

Hypothesis draws V and D (from 1), the bag lengths (empty bags and, at times, one huge
bag among them), the table and id dtypes, the ids themselves, weights (or none) with
zeros and negatives, the combiner, and how many chunks the cpu kernel splits the call
into (so bags are cut at every place a boundary can fall); each call writes a poisoned
output, judged by ``test_bags.check_against_reference`` (a bound on float32 summation
error). Weights are multiples of 1/4, whose float32 sums are exact: a denominator is
zero in float32 exactly where it is in float64. Examples are not derandomised; a failure
prints the example and a ``@reproduce_failure`` blob to replay it.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fused_embedding import bags
from conftest import ID_DTYPES, TABLE_DTYPES
from test_bags import HOST_BACKENDS, check_against_reference, offsets_of, run_poisoned

EXAMPLES_PER_BACKEND = 300

MAX_VOCAB, MAX_DIM, MAX_BAGS, MAX_LENGTH, HUGE_LENGTH = 40, 40, 20, 6, 400


@st.composite
def bag_cases(draw):
    """(table [V][D], values [N], offsets [B + 1], weights [N] or None, combiner, n_chunks)."""
    vocab = draw(st.integers(1, MAX_VOCAB))
    dim = draw(st.integers(1, MAX_DIM))
    lengths = draw(st.lists(st.integers(0, MAX_LENGTH), max_size=MAX_BAGS))
    if lengths and draw(st.booleans()):  # one huge bag among the short ones
        lengths[draw(st.integers(0, len(lengths) - 1))] = draw(st.integers(MAX_LENGTH, HUGE_LENGTH))
    offsets = offsets_of(lengths)
    total = int(offsets[-1])
    id_dtype = draw(st.sampled_from(ID_DTYPES))
    values = draw(arrays(id_dtype, total, elements=st.integers(0, vocab - 1)))
    weights = None
    if draw(st.booleans()):
        quarters = draw(arrays(np.int8, total, elements=st.integers(-8, 8)))  # zeros and negatives
        weights = (quarters / 4).astype(np.float32)
    combiner = draw(st.sampled_from(["mean", "sum", "sqrtn"]))
    # None: the launcher's own choice; else any count from 1 to one chunk per step.
    n_chunks = draw(st.none() | st.integers(1, max(1, total + len(lengths))))
    seed = draw(st.integers(0, 2**32 - 1))
    table_dtype = draw(st.sampled_from(TABLE_DTYPES))
    table = np.random.default_rng(seed).standard_normal((vocab, dim), dtype=np.float32).astype(table_dtype)
    return table, values, offsets, weights, combiner, n_chunks


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@settings(max_examples=EXAMPLES_PER_BACKEND, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=bag_cases())
def test_embedding_bag_matches_reference(backend, case):
    table, values, offsets, weights, combiner, n_chunks = case
    out = run_poisoned(table, values, offsets, weights, combiner, backend, n_chunks=n_chunks)
    check_against_reference(out, table, values, offsets, weights, combiner)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@settings(max_examples=100, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=bag_cases(), data=st.data())
def test_first_bad_id_is_named(backend, case, data):
    """Any mix of bad ids (negative, >= V, up to the id dtype's limits): the first in
    values order is named, with its bag, on every chunk count."""
    table, values, offsets, weights, combiner, n_chunks = case
    if values.shape[0] == 0:
        return  # no id to spoil (an empty call is covered above)
    info = np.iinfo(values.dtype)
    vocab = table.shape[0]
    bad_value = st.one_of(st.integers(int(info.min), -1), st.integers(vocab, int(info.max)))
    spoiled = data.draw(st.lists(st.tuples(st.integers(0, values.shape[0] - 1), bad_value), min_size=1,
                                 max_size=4))
    for position, value in spoiled:
        values[position] = value
    first = min(position for position, _ in spoiled)
    bag = int(np.searchsorted(offsets, first, side="right")) - 1
    assert offsets[bag] <= first < offsets[bag + 1]
    with pytest.raises(IndexError, match=rf"^id {values[first]} at values\[{first}\] \(bag {bag}\) "
                                         rf"is out of range for a table of {vocab} rows"):
        bags._embedding_bag(table, values, offsets, weights, combiner, backend, n_chunks=n_chunks)
