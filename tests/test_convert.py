"""``fused-embedding convert`` on SavedModels that stock Keras and TF wrote (tests/convert_models.py,
exported once per session in a fresh process that never imports fused_embedding).

The converted models are reloaded in a fresh process that imports fused_embedding.tf (as a
server would), run on fresh random ids, and checked against the original models' outputs and
a float64 NumPy reference. TensorFlow's import costs ~10 s a process on a loaded 2-core
machine: the subprocesses are few and shared.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_SEED

tf = pytest.importorskip("tensorflow")

from fused_embedding import tf_convert  # noqa: E402
from fused_embedding.reference import embedding_bag_reference  # noqa: E402
from fused_embedding.semantics import BFLOAT16  # noqa: E402
from fused_embedding.validation import (FLOAT32_UNIT_ROUNDOFF, bag_error_bound, compare,  # noqa: E402
                                        compare_to_framework, tolerance)

HERE = Path(__file__).resolve().parent
FUSABLE = ("text_classifier", "two_branch", "gather_mean", "sparse_lookup")
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def _run(args, **kwargs):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, timeout=600, **kwargs)


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Directory of the exported test models (one subprocess for all)."""
    out = tmp_path_factory.mktemp("convert_models")
    result = _run([str(HERE / "convert_models.py"), str(out), str(TEST_SEED % 2**31)])
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture(scope="session")
def converted(models, tmp_path_factory):
    """{model: (Report, printed lines, out dir)} for every fusable model, converted here."""
    out = tmp_path_factory.mktemp("converted")
    done = {}
    for name in FUSABLE:
        lines = []
        report = tf_convert.convert_saved_model(models / name, out / name, seed=TEST_SEED, report=lines.append)
        done[name] = (report, lines, out / name)
    return done


# ---------------------------------------------------------------------------
# What was matched


def _kinds(report):
    return sorted((m.signature, m.kind, m.axis, m.mask_zero, m.table_dtype, tuple(m.table_shape))
                  for m in report.rewritten)


def test_matches_keras_text_classifier(converted):
    report, lines, _ = converted["text_classifier"]
    assert _kinds(report) == [(s, "masked mean", 1, True, "float32", (500, 16)) for s in ("serve", "serving_default")]
    assert all(m.table[0] == "variable" and m.table[1].name.startswith("embedding/") for m in report.rewritten)
    assert any(line.startswith("rewrote serve: masked mean") and "axis 1, mask_zero True" in line for line in lines)
    assert any(line.startswith("wrote ") for line in lines)


def test_matches_both_keras_data_formats(converted):
    report, _, _ = converted["two_branch"]
    assert _kinds(report) == sorted((s, "mean", axis, False, "float32", shape) for s in ("serve", "serving_default")
                                    for axis, shape in ((1, (300, 8)), (2, (200, 6))))


def test_matches_raw_gather_mean_low_precision(converted):
    report, _, _ = converted["gather_mean"]
    assert _kinds(report) == [("constant", "mean", 1, False, "bfloat16", (250, 4)),
                              ("features", "mean", 2, False, "float16", (400, 8)),
                              ("masked", "masked mean", 1, True, "float16", (400, 8)),
                              ("serving_default", "mean", 1, False, "float16", (400, 8))]
    kinds = {m.signature: m.table[0] for m in report.rewritten}
    assert kinds == {"constant": "tensor", "features": "variable", "masked": "variable",
                     "serving_default": "variable"}


def test_matches_sparse_lookup_combiners(converted):
    report, _, _ = converted["sparse_lookup"]
    assert sorted((m.signature, m.kind) for m in report.rewritten) == [
        ("serving_default", "sparse mean"), ("sqrtn", "sparse sqrtn"), ("sum", "sparse sum")]


# ---------------------------------------------------------------------------
# What was written


def _graph_nodes(function):
    """(name, op type) of every node of a signature's graph and of the functions it calls."""
    graph_def = function.graph.as_graph_def()
    nodes = [(n.name, n.op) for n in graph_def.node]
    for f in graph_def.library.function:
        nodes += [(n.name, n.op) for n in f.node_def]
    return nodes


def _compiled_ops_available():
    from fused_embedding import tf_compiled
    return tf_compiled.op_module() is not None


@pytest.mark.parametrize("name", FUSABLE)
def test_written_model_keeps_signatures_and_variables(converted, models, name):
    _, _, out = converted[name]
    original, written = tf.saved_model.load(str(models / name)), tf.saved_model.load(str(out))
    assert sorted(written.signatures) == sorted(original.signatures)
    for key, fn in original.signatures.items():
        new = written.signatures[key]
        assert new.structured_input_signature == fn.structured_input_signature
        assert {k: (v.dtype, v.shape.as_list()) for k, v in new.structured_outputs.items()} == \
               {k: (v.dtype, v.shape.as_list()) for k, v in fn.structured_outputs.items()}
        # Variables stay variables, with the original's values.
        assert sorted(v.name for v in new.variables) == sorted(v.name for v in fn.variables)
        values = {v.name: v.numpy() for v in fn.variables}
        for v in new.variables:
            np.testing.assert_array_equal(v.numpy(), values[v.name])
        # The signature runs the package's op (its name scope), whatever its traced form.
        scope = "fused_embedding_lookup_sparse" if name == "sparse_lookup" else "fused_embedding_mean"
        nodes = _graph_nodes(new)
        assert any(scope in n for n, _ in nodes), f"{key}: no {scope} in the written graph"
        if _compiled_ops_available():  # the default export form: the compiled ops
            assert any(op.startswith("FusedEmbedding") for _, op in nodes), f"{key}: no FusedEmbedding* op"
    assert not any(p.name.startswith(".") for p in out.parent.iterdir()), "a staging directory was left"


# ---------------------------------------------------------------------------
# Outputs, in a fresh process that imports fused_embedding.tf


RUNNER = """
import os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np
import tensorflow as tf
import fused_embedding.tf as fe
if hasattr(fe, "load_ops"):
    fe.load_ops()
plan = np.load(sys.argv[1], allow_pickle=True).item()
results = {}
for key, (directory, signature, inputs) in plan.items():
    fn = tf.saved_model.load(directory).signatures[signature]
    out = fn(**{k: tf.constant(v) for k, v in inputs.items()})
    results[key] = {k: tf.cast(v, tf.float64).numpy() for k, v in out.items()}
np.save(sys.argv[2], results, allow_pickle=True)
"""


def _dense_ids(rng, vocab, batch, length, dtype, masked):
    ids = rng.integers(0, vocab, (batch, length))
    if masked:
        ids[rng.random(ids.shape) < 0.3] = 0
        ids[:, 0] = rng.integers(1, vocab, batch)  # one real id per bag (Keras: NaN otherwise)
    return ids.astype(dtype)


def _sparse(rng, vocab, batch):
    lengths = rng.integers(0, 7, batch)
    lengths[-1] = max(lengths[-1], 1)  # TF's unsafe op drops trailing empty rows: keep B rows
    rows = np.repeat(np.arange(batch), lengths)
    cols = np.concatenate([np.arange(n) for n in lengths])
    values = rng.integers(0, vocab, rows.size)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    inputs = dict(indices=np.stack([rows, cols], 1).astype(np.int64), values=values.astype(np.int64),
                  dense_shape=np.array([batch, max(lengths.max(), 1)], np.int64))
    return inputs, values, offsets


def _dense_layer_bound(pooled, pooled_error, kernel, bias):
    """A bound on the float32 error of ``pooled @ kernel + bias`` against float64, given a bound
    ``pooled_error`` on the error of ``pooled``: n + 2 roundings of the products' magnitudes."""
    n = kernel.shape[0]
    return ((n + 2) * FLOAT32_UNIT_ROUNDOFF * (np.abs(pooled) @ np.abs(kernel) + np.abs(bias))
            + pooled_error @ np.abs(kernel))


def _mean_bound(rows_abs_sum, count):
    """Float32 error bound of a mean of ``count`` terms whose |sum| is ``rows_abs_sum``."""
    return (count + 2) * FLOAT32_UNIT_ROUNDOFF * rows_abs_sum / np.maximum(count, 1)


def _cases(models, rng):
    """[(model, signature, inputs, reference, bound or None, table dtype)]: reference float64;
    bound: the elementwise float32 error bound of a Dense-topped output (None: the pooled
    output is judged by the dtype's tolerance against the reference)."""
    cases = []
    for batch, length in ((1, 5), (17, 13), (128, 32)):
        a = np.load(models / "text_classifier.npz")
        ids = _dense_ids(rng, 500, batch, length, np.int32, masked=True)
        rows = a["table"].astype(np.float64)[ids] * (ids != 0)[..., None]
        count = (ids != 0).sum(1, keepdims=True)
        pooled = rows.sum(1) / count
        error = _mean_bound(np.abs(rows).sum(1), count)
        ref = pooled @ a["kernel"] + a["bias"]
        for s in ("serve", "serving_default"):
            cases.append(("text_classifier", s, dict(ids=ids), dict(output_0=ref),
                          dict(output_0=_dense_layer_bound(pooled, error, a["kernel"], a["bias"])), np.float32))

        b = np.load(models / "two_branch.npz")
        words = _dense_ids(rng, 300, batch, length, np.int32, masked=False)
        tags = _dense_ids(rng, 200, batch, 12, np.int64, masked=False)
        w_rows, t_rows = b["words"].astype(np.float64)[words], b["tags"].astype(np.float64)[tags]
        pooled = np.concatenate([w_rows.mean(1), t_rows.mean(2)], 1)
        error = np.concatenate([_mean_bound(np.abs(w_rows).sum(1), length), _mean_bound(np.abs(t_rows).sum(2), 6)], 1)
        cases.append(("two_branch", "serve", dict(words=words, tags=tags),
                      dict(output_0=pooled @ b["kernel"] + b["bias"]),
                      dict(output_0=_dense_layer_bound(pooled, error, b["kernel"], b["bias"])), np.float32))

        c = np.load(models / "gather_mean.npz")
        ids = _dense_ids(rng, 400, batch, length, np.int32, masked=False)
        half = c["half"].astype(np.float64)
        cases.append(("gather_mean", "serving_default", dict(ids=ids), dict(pooled=half[ids].mean(1)), None,
                      np.float16))
        ids = _dense_ids(rng, 400, batch, length, np.int64, masked=False)
        cases.append(("gather_mean", "features", dict(ids=ids), dict(pooled=half[ids].mean(2)), None, np.float16))
        ids = _dense_ids(rng, 400, batch, length, np.int64, masked=True)
        kept = (ids != 0)[..., None]
        cases.append(("gather_mean", "masked", dict(ids=ids),
                      dict(pooled=(half[ids] * kept).sum(1) / kept.sum(1)), None, np.float16))
        ids = _dense_ids(rng, 250, batch, 5, np.int32, masked=False)
        cases.append(("gather_mean", "constant", dict(ids=ids), dict(pooled=2 * c["brain"].astype(np.float64)[ids].mean(1)),
                      None, BFLOAT16))

        d = np.load(models / "sparse_lookup.npz")
        inputs, values, offsets = _sparse(rng, 300, batch)
        for s, combiner in (("serving_default", "mean"), ("sum", "sum"), ("sqrtn", "sqrtn")):
            ref = embedding_bag_reference(d["table"], values, offsets, None, combiner)
            bound = bag_error_bound(d["table"], values, offsets, None, combiner)
            cases.append(("sparse_lookup", s, inputs, dict(pooled=ref), dict(pooled=bound), np.float32))
    return cases


@pytest.mark.slow
def test_converted_models_match_originals_and_reference_in_a_fresh_process(converted, models, rng, tmp_path):
    cases = _cases(models, rng)
    plan = {}
    for i, (name, signature, inputs, _, _, _) in enumerate(cases):
        plan[f"{i}/original"] = (str(models / name), signature, inputs)
        plan[f"{i}/converted"] = (str(converted[name][2]), signature, inputs)
    np.save(tmp_path / "plan.npy", plan, allow_pickle=True)
    result = _run(["-c", textwrap.dedent(RUNNER), str(tmp_path / "plan.npy"), str(tmp_path / "out.npy")])
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    outputs = np.load(tmp_path / "out.npy", allow_pickle=True).item()
    failures = []
    for i, (name, signature, inputs, reference, bound, dtype) in enumerate(cases):
        original, fused = outputs[f"{i}/original"], outputs[f"{i}/converted"]
        where = f"{name}/{signature} (B={next(iter(inputs.values())).shape[0]})"
        for key, ref in reference.items():
            if bound is None:
                # Pooled in the table's dtype: within the dtype's tolerance of float64, and as
                # close to the original as the original is to float64 (its own fp16/bf16 error).
                scale = 2.0 if signature == "constant" else 1.0  # that output is the mean doubled
                base = tolerance(dtype)
                against_ref = compare(fused[key], ref, rtol=base["rtol"], atol=base["atol"] * scale)
                against_original = compare_to_framework(fused[key], original[key], ref, dtype)
            else:
                against_ref = compare(fused[key], ref, rtol=0.0, atol=bound[key])
                against_original = compare(fused[key], original[key], rtol=0.0, atol=2 * bound[key])
            for what, report in (("the float64 reference", against_ref), ("the original", against_original)):
                if report:
                    failures.append(f"{where} {key} against {what}: {report}")
    assert not failures, "\n".join(failures)


def test_portable_conversion_writes_the_native_twin(models, tmp_path, rng):
    """portable=True: no compiled op in the written graph (TF alone serves it), same outputs.
    Called by its public name, fused_embedding.tf.convert_saved_model."""
    import fused_embedding.tf as fused_tf
    fused_tf.convert_saved_model(models / "two_branch", tmp_path / "out", seed=TEST_SEED, portable=True)
    original = tf.saved_model.load(str(models / "two_branch")).signatures["serve"]
    written = tf.saved_model.load(str(tmp_path / "out")).signatures["serve"]
    assert not any(op.startswith("FusedEmbedding") for _, op in _graph_nodes(written))
    assert any("fused_embedding_mean" in n for n, _ in _graph_nodes(written))
    inputs = dict(words=tf.constant(rng.integers(0, 300, (9, 4)), tf.int32),
                  tags=tf.constant(rng.integers(0, 200, (9, 12)), tf.int64))
    expected = original(**inputs)["output_0"].numpy()
    base = tolerance(np.float32)  # of the element or of the largest output (the Dense's sums), as the check
    report = compare(written(**inputs)["output_0"], expected, rtol=base["rtol"],
                     atol=base["atol"] + base["rtol"] * np.abs(expected).max())
    assert report is None, report


# ---------------------------------------------------------------------------
# Left alone, refused, errors


def test_nothing_to_fuse_writes_nothing(models, tmp_path):
    import fused_embedding.tf as fused_tf
    lines = []
    with pytest.raises(fused_tf.NothingToFuse, match="nothing to fuse"):
        fused_tf.convert_saved_model(models / "nothing_to_fuse", tmp_path / "out", report=lines.append)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    assert lines == []


def test_near_misses_are_left_with_reasons(models, tmp_path):
    lines = []
    with pytest.raises(tf_convert.NothingToFuse) as info:
        tf_convert.convert_saved_model(models / "left_alone", tmp_path / "out", report=lines.append)
    assert info.value.exit_status == tf_convert.EXIT_NOTHING_TO_FUSE
    text = "\n".join(lines)
    assert "left serving_default:" in text and "mean over axes [0]" in text
    assert "left batch_dims:" in text and "batch_dims=1" in text
    assert "left shared_rows:" in text and "also feed" in text
    assert "left padding_one:" in text and "padding id is 1" in text
    assert not (tmp_path / "out").exists()


def test_outputs_that_differ_are_not_written(models, tmp_path, monkeypatch):
    """A fused op that is off by a little: the check names the signature and output, and
    nothing is written."""
    import fused_embedding.tf as fused_tf
    real = fused_tf.embedding_mean

    def off(table, ids, **kwargs):
        out = real(table, ids, **kwargs)
        return out * tf.constant(1.001, out.dtype)

    monkeypatch.setattr(fused_tf, "embedding_mean", off)
    out = tmp_path / "out"
    out.mkdir()  # an empty OUT_DIR is accepted, and left as it was on a failure
    with pytest.raises(tf_convert.CheckFailed, match=r"signature '(serve|serving_default)' output 'output_0' "
                                                      r"differs.*elements differ"):
        tf_convert.convert_saved_model(models / "text_classifier", out)
    assert list(out.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _cli(argv, capsys):
    from fused_embedding.cli import main
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_cli_errors_name_what_was_expected(models, tmp_path, capsys):
    status, _, err = _cli(["convert", str(tmp_path / "missing"), str(tmp_path / "out")], capsys)
    assert status == 2 and "does not exist; expected a SavedModel directory" in err
    (tmp_path / "empty").mkdir()
    status, _, err = _cli(["convert", str(tmp_path / "empty"), str(tmp_path / "out")], capsys)
    assert status == 2 and "is not a SavedModel: expected a directory holding saved_model.pb" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    status, _, err = _cli(["convert", str(models / "text_classifier"), str(busy)], capsys)
    assert status == 2 and "exists and is not an empty directory" in err
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_cli_convert_output_and_exit_statuses(models, tmp_path):
    """``python -m fused_embedding convert``: 0 and what it rewrote; 3 where nothing fuses."""
    script = (f"{sys.executable} -m fused_embedding convert {models / 'two_branch'} {tmp_path / 'a'} --seed 5; "
              f"echo status=$?; "
              f"{sys.executable} -m fused_embedding convert {models / 'nothing_to_fuse'} {tmp_path / 'b'}; "
              f"echo status=$?")
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=ENV, timeout=600)
    out = result.stdout
    first = out.split("status=")[0]
    assert out.count("status=") == 2 and "status=0" in out and "status=3" in out, out + result.stderr
    assert out.index("status=0") < out.index("status=3")
    assert "rewrote serve: mean" in first and "axis 2, mask_zero False" in first and "axis 1" in first
    assert "checked serve: output_0 max |diff|" in first and "wrote " in first
    assert "nothing to fuse" in result.stderr and "nothing written" in result.stderr
    assert (tmp_path / "a" / "saved_model.pb").is_file() and not (tmp_path / "b").exists()


def test_cli_portable_writes_the_native_twin(models, tmp_path, capsys):
    """``convert --portable``: written, and no compiled op in the graph."""
    status, out, err = _cli(["convert", str(models / "gather_mean"), str(tmp_path / "out"), "--portable",
                             "--seed", str(TEST_SEED % 2**31)], capsys)
    assert status == 0, out + err
    assert "wrote " in out
    written = tf.saved_model.load(str(tmp_path / "out"))
    for key, fn in written.signatures.items():
        ops = [op for _, op in _graph_nodes(fn)]
        assert not any(op.startswith("FusedEmbedding") for op in ops), (key, ops)
