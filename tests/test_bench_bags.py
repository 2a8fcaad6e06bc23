"""`fused-embedding bench --bags`: the workload, the providers against the reference, a real tiny run."""
import json

import numpy as np
import pytest

from fused_embedding import bytes_model, cli
from fused_embedding import providers as P
from test_cli import PNG_SIGNATURE, run_main

BAG_KEYS = {"kind", "device", "provider", "batch", "mean_length", "max_length", "dim", "vocab", "ids",
            "dtype", "combiner", "weighted", "id_sets", "status", "note"}
BAG_TIMED_KEYS = {"times_ms", "median_ms", "p20_ms", "p80_ms", "values", "bytes", "gb_per_s", "pct_of_copy",
                  "pct_of_read", "case_read_gb_per_s", "baseline", "speedup", "target"}
TINY = ["bench", "--bags", "--sizes", "16,4,8,300", "--repeats", "5", "--no-progress", "--seed", "11"]


# --- the workload --------------------------------------------------------------

def test_the_workload_is_the_issues():
    cases = P.bag_cases()
    assert [(c.dim, c.ids) for c in cases] == [(d, ids) for d in (64, 16, 256) for ids in ("zipf", "uniform")]
    for c in cases:
        assert (c.batch, c.mean_length, c.max_length, c.vocab, c.dtype, c.zipf_a) == \
            (4096, 32, 1000, 2_000_000, "fp32", 1.2)


def test_bag_sets_are_seeded_and_in_range():
    case = P.BagCase(5000, 32, 100, 8, 1000, "zipf")
    perm = np.random.default_rng(0).permutation(case.vocab)

    def draw(seed):
        rng = np.random.default_rng(seed)
        return P.random_bag_sets(rng, case, [P.bag_lengths(rng, case)], perm)[0]

    a, b = draw(3), draw(3)
    assert np.array_equal(a.values, b.values) and np.array_equal(a.offsets, b.offsets)
    assert not np.array_equal(draw(4).values, a.values)
    lengths = np.diff(a.offsets)
    assert a.offsets[0] == 0 and a.offsets[-1] == a.values.size == a.weights.size
    assert lengths.min() >= 1 and lengths.max() <= 100
    assert 28 < lengths.mean() < 34  # geometric, mean 32, a few capped at 100
    assert a.values.dtype == np.int64 and a.weights.dtype == np.float32
    assert 0 <= a.values.min() and a.values.max() < case.vocab
    # Zipf: the hottest row takes a large share (rank 1 has 1 / zeta(1.2) ~ 18%), and it is
    # the shuffled row perm[0], not row 0.
    hot, count = np.unique(a.values, return_counts=True)
    assert hot[np.argmax(count)] == perm[0] and count.max() > 0.1 * a.values.size
    uniform = P.random_bag_sets(np.random.default_rng(1), P.BagCase(5000, 32, 100, 8, 1000, "uniform"),
                                [lengths])[0]
    assert np.bincount(uniform.values, minlength=1000).max() < 0.01 * uniform.values.size


def test_bag_bytes_by_hand():
    # N=10 int64 ids, B=3 bags (4 int64 offsets), D=4 float32: 80 + 32 + rows 160 + output 48;
    # weighted adds 10 float32 weights.
    assert bytes_model.bag_bytes(10, 3, 4, np.float32, np.int64, False) == 80 + 32 + 160 + 48
    assert bytes_model.bag_bytes(10, 3, 4, np.float32, np.int64, True) == 80 + 32 + 40 + 160 + 48
    s = P.BagSet(np.zeros(10, np.int64), np.array([0, 3, 3, 10]), np.ones(10, np.float32))
    assert P.bag_set_bytes(s, 4, np.float32, True) == 80 + 32 + 40 + 160 + 48


@pytest.mark.parametrize("name", [p.name for p in P.bag_providers()])
def test_every_bag_provider_matches_the_reference(rng, name):
    provider = next(p for p in P.bag_providers() if p.name == name)
    if provider.unavailable_reason() is not None:
        pytest.skip(provider.unavailable_reason())
    assert P.validate_bag_provider(provider, rng) is None


# --- a real run on tiny shapes ---------------------------------------------------

@pytest.fixture(scope="module")
def bags_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-bags")
    results_md = out / "RESULTS.md"
    results_md.write_text("# Benchmark results\n\n## CPU\n\nkept as it is\n")
    code = cli.main(TINY + ["--out", str(out), "--results-md", str(results_md)])
    return code, out, results_md


def test_bags_run_writes_its_rows_json_plot_and_section(bags_run):
    code, out, results_md = bags_run
    assert code == 0
    results = json.loads((out / cli.RESULTS_JSON).read_text())
    assert results["kind"] == "bags" and results["schema"] == cli.SCHEMA_VERSION
    assert results["command"].startswith("fused-embedding bench --bags --sizes 16,4,8,300")
    assert {"date", "seed", "machine", "versions", "bytes_model", "copy", "read", "load_average", "skipped",
            "validation", "measurements", "targets"} <= set(results)
    assert results["read"]["cpu"]["gb_per_s"] > 0
    assert results["validation"] and all(v["passed"] for v in results["validation"])
    names = [p.name for p in P.bag_providers()]
    skipped = {s["provider"]: s["reason"] for s in results["skipped"]}
    ms = results["measurements"]
    # Every case (Zipf and uniform ids) x every provider that runs here; the others skipped with a reason.
    assert {(m["ids"], m["provider"]) for m in ms} == {(ids, n) for ids in ("zipf", "uniform")
                                                       for n in names if n not in skipped}
    assert all(reason for reason in skipped.values())
    timed = {(m["ids"], m["provider"]): m for m in ms}
    for m in ms:
        assert BAG_KEYS <= set(m) and m["status"] == "ok", m
        assert BAG_TIMED_KEYS <= set(m)
        assert (m["batch"], m["mean_length"], m["dim"], m["vocab"]) == (16, 4, 8, 300)
        assert 5 <= len(m["times_ms"]) <= 5 and m["p20_ms"] <= m["median_ms"] <= m["p80_ms"]
        assert m["bytes"] == pytest.approx(bytes_model.bag_bytes(m["values"], 16, 8, np.float32, np.int64,
                                                                 m["weighted"]), abs=1)
        assert m["gb_per_s"] == pytest.approx(m["bytes"] / (m["median_ms"] / 1e3) / 1e9, rel=1e-6)
        assert m["case_read_gb_per_s"] > 0  # the read baseline, timed in the case's rounds
        assert m["pct_of_read"] == pytest.approx(100 * m["gb_per_s"] / m["case_read_gb_per_s"])
        assert m["pct_of_copy"] == pytest.approx(100 * m["gb_per_s"] / results["copy"]["cpu"]["gb_per_s"])
        provider = next(p for p in P.bag_providers() if p.name == m["provider"])
        if provider.baseline is not None and provider.baseline not in skipped:
            base = timed[(m["ids"], provider.baseline)]
            assert m["baseline"] == provider.baseline and m["target"] == provider.target
            assert m["speedup"] == pytest.approx(base["median_ms"] / m["median_ms"])
        else:
            assert m["speedup"] is None
    # Every provider of a case rotates among the same bag lengths.
    for ids in ("zipf", "uniform"):
        assert len({m["values"] for m in ms if m["ids"] == ids}) == 1
    targets = {(t["what"], t["case"].split()[-2]) for t in results["targets"]}
    assert ("fused-bag[mean] % of read bandwidth", "uniform") in targets
    if "tf-lookup-sparse[ragged]" not in skipped:
        assert ("tf-op-bag[ragged] over tf-lookup-sparse[ragged]", "zipf") in targets

    assert (out / cli.RESULTS_PNG).read_bytes().startswith(PNG_SIGNATURE)
    text = results_md.read_text()
    assert "kept as it is" in text and cli.BAG_MD_HEADING in text
    begin = cli.MD_BEGIN.format(device="BAGS", generator=cli.BAG_MD_GENERATOR)
    assert text.index(cli.BAG_MD_HEADING) < text.index(begin) < text.index("| fused-bag[mean] |")
    assert "Targets:" in text and results["machine"]["cpu"] in text and "timed in each case's rounds" in text
    assert (out / cli.RESULTS_MD).read_text().startswith(cli.BAG_MD_HEADING)


def test_a_wrong_bag_provider_fails_validation_and_is_not_timed(capsys, tmp_path, monkeypatch):
    from fused_embedding import bags
    correct = bags.embedding_bag

    def off_by_a_little(*args, **kwargs):
        out = correct(*args, **kwargs)
        out[:, -1] += np.float32(1e-2)
        return out

    monkeypatch.setattr(bags, "embedding_bag", off_by_a_little)
    code, out, err = run_main(TINY + ["--out", str(tmp_path)], capsys)
    assert code == 1
    assert "VALIDATION FAILED fused-bag[mean]" in err and "elements differ" in err
    results = json.loads((tmp_path / cli.RESULTS_JSON).read_text())
    failed = {v["provider"] for v in results["validation"] if not v["passed"]}
    assert {"fused-bag[mean]", "fused-bag[sum,w]"} <= failed
    for m in results["measurements"]:
        if m["provider"] in failed:
            assert m["status"] == "skipped" and m["note"] == "failed validation: not timed"
    assert "skipped: failed validation: not timed" in out


def test_without_torch_its_rows_are_skipped_with_the_reason(capsys, tmp_path, monkeypatch):
    missing = "torch is not installed (simulated)"
    for name in ("torch-bag[mean]", "torch-bag[sum,w]"):
        monkeypatch.setitem(P._probes, name, missing)
    code, out, _ = run_main(TINY + ["--out", str(tmp_path)], capsys)
    assert code == 0
    results = json.loads((tmp_path / cli.RESULTS_JSON).read_text())
    assert {("torch-bag[mean]", missing), ("torch-bag[sum,w]", missing)} <= \
        {(s["provider"], s["reason"]) for s in results["skipped"]}
    core = [m for m in results["measurements"] if m["provider"].startswith("fused-bag")]
    assert core and all(m["status"] == "ok" and m["speedup"] is None for m in core)
    assert "Not run: torch-bag[mean] (torch is not installed (simulated))" in \
        (tmp_path / cli.RESULTS_MD).read_text()


def test_bags_arguments(capsys, tmp_path):
    code, _, err = run_main(["bench", "--bags", "--sizes", "8,4", "--out", str(tmp_path)], capsys)
    assert code == 2 and "has 2 fields" in err
    code, _, err = run_main(["bench", "--bags", "--device", "gpu", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--device gpu" in err
    code, _, err = run_main(["bench", "--bags", "--sizes", "8,4,4096,100000000", "--out", str(tmp_path)],
                            capsys)
    assert code == 2 and "more than a quarter of this machine" in err
    assert not any(tmp_path.iterdir())


# --- the fast forms the bench times: tf.function on ragged and sparse ids ------------

@pytest.mark.parametrize("kind", ["sparse", "ragged"])
@pytest.mark.parametrize("combiner", ["mean", "sum", "sqrtn"])
@pytest.mark.parametrize("mode", ["eager", "tf.function"])
def test_safe_drop_in_prunes_in_its_body_with_tfs_results_and_gradients(rng, kind, combiner, mode):
    """The safe drop-in drops ids < 0 and weights <= 0 inside its body (no tf.sparse.retain
    on the forward path): results, table gradients and weight gradients (zero where pruned)
    equal TF's safe_embedding_lookup_sparse."""
    tf = pytest.importorskip("tensorflow")
    from fused_embedding.tf import safe_embedding_lookup_sparse
    vocab, dim = 50, 12
    table = rng.standard_normal((vocab, dim), dtype=np.float32)
    lengths = rng.integers(0, 6, size=9)
    lengths[0] = 0
    values = rng.integers(0, vocab, size=int(lengths.sum())).astype(np.int64)
    values[::4] = -1
    weights = rng.uniform(0.1, 2.0, size=values.size).astype(np.float32)
    weights[1::5] = 0.0
    weights[2::7] = -0.5
    upstream = tf.constant(rng.standard_normal((lengths.size, dim), dtype=np.float32))

    def gradients(lookup, as_function):
        variable, w = tf.Variable(table), tf.Variable(weights)

        def loss_and_grads():
            with tf.GradientTape() as tape:
                ids = tf.RaggedTensor.from_row_lengths(tf.constant(values), lengths)
                sp_w = tf.RaggedTensor.from_row_lengths(w, lengths)
                if kind == "sparse" or lookup is tf.nn.safe_embedding_lookup_sparse:
                    ids, sp_w = ids.to_sparse(), sp_w.to_sparse()
                out = lookup(variable, ids, sp_w, combiner=combiner)
                loss = tf.reduce_sum(out * upstream)
            table_grad, weight_grad = tape.gradient(loss, [variable, w])
            return out, tf.convert_to_tensor(table_grad), weight_grad
        run = tf.function(loss_and_grads) if as_function else loss_and_grads
        return [np.asarray(t) for t in run()]

    ours = gradients(safe_embedding_lookup_sparse, mode == "tf.function")
    theirs = gradients(tf.nn.safe_embedding_lookup_sparse, False)
    for got, expected in zip(ours, theirs):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    pruned = (values < 0) | ((weights <= 0) if combiner != "sum" else False)
    assert np.all(ours[2][pruned] == 0)


def test_sparse_rows_are_checked_in_the_body(rng):
    tf = pytest.importorskip("tensorflow")
    from fused_embedding.tf import embedding_lookup_sparse
    table = tf.constant(rng.standard_normal((20, 4), dtype=np.float32))
    lookup = tf.function(lambda t, i: embedding_lookup_sparse(t, i))
    disordered = tf.SparseTensor([[1, 0], [0, 0]], tf.constant([3, 4], tf.int64), [2, 1])
    with pytest.raises(tf.errors.InvalidArgumentError, match="canonical row-major order"):
        lookup(table, disordered)
    outside = tf.SparseTensor([[0, 0], [3, 0]], tf.constant([3, 4], tf.int64), [2, 1])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"row 3 \(values\[1\]\), outside its dense_shape's 2"):
        lookup(table, outside)
    fine = tf.SparseTensor([[0, 0], [0, 1], [3, 0]], tf.constant([3, 4, 5], tf.int64), [5, 2])
    ours = np.asarray(lookup(table, fine))
    theirs = np.asarray(tf.nn.embedding_lookup_sparse(table, fine, None))  # drops the trailing empty row
    np.testing.assert_allclose(ours[:4], theirs, rtol=1e-6)
    assert ours.shape == (5, 4) and not ours[4].any()


def test_the_tf_bag_providers_trace_once_per_case(rng):
    """Bag sets of different longest bags share one dense shape: TF's functions trace once,
    so no call times a trace (TF logs "triggered tf.function retracing" otherwise)."""
    pytest.importorskip("tensorflow")
    import logging
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    tf_logger = logging.getLogger("tensorflow")
    tf_logger.addHandler(handler)
    case = P.BagCase(12, 3, 40, 8, 100, "uniform")
    table = P.random_table(rng, case.vocab, case.dim, np.float32)
    lengths = [P.bag_lengths(rng, case) for _ in range(7)]
    for k, length in enumerate(lengths):
        length[0] = k + 1  # a different longest bag in each set
        length[1:] = 1
    try:
        for provider in P.bag_providers():
            if provider.name.startswith("tf") and provider.unavailable_reason() is None:
                run = provider.prepare(P.BagInputs(table, P.random_bag_sets(rng, case, lengths)))
                for k in list(range(len(lengths))) * 2:
                    run(k)
    finally:
        tf_logger.removeHandler(handler)
    retracing = [r.getMessage() for r in records if "retracing" in r.getMessage()]
    assert not retracing, retracing[0]
