"""The ``fused-embedding`` command: arguments, the bytes model, the results files, a real quick run."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from fused_embedding import bytes_model, cli
from fused_embedding.semantics import BFLOAT16, Axis

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MEASUREMENT_KEYS = {"device", "provider", "batch", "length", "dim", "vocab", "dtype", "axis",
                    "id_sets", "status", "note"}
TIMED_KEYS = {"times_ms", "median_ms", "p20_ms", "p80_ms", "bytes", "gb_per_s", "pct_of_copy",
              "pct_of_read", "speedup_vs_unfused", "baseline"}


def run_main(argv, capsys):
    """(exit code, stdout, stderr) of the command run in this process."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


# --- arguments ----------------------------------------------------------------

@pytest.mark.parametrize("sizes, message", [
    ("1,2", "has 2 fields"),
    ("1,2,3,4,5", "has 5 fields"),
    ("8,x,16", "L must be a positive integer, got 'x'"),
    ("8,4,0", "D must be >= 1"),
    ("8,4,16,-3", "V must be >= 1"),
    (";", "no sizes"),
    ("1024,64,128,100000000000", "more than a quarter of this machine"),
])
def test_bad_sizes_exit_2_with_a_message(capsys, tmp_path, sizes, message):
    code, _, err = run_main(["bench", "--sizes", sizes, "--out", str(tmp_path)], capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir()), "nothing is written for bad arguments"


@pytest.mark.parametrize("argv, message", [
    (["bench", "--device", "tpu"], "invalid choice: 'tpu'"),
    (["validate", "--device", "npu"], "invalid choice: 'npu'"),
    (["bench", "--dtypes", "fp64"], "--dtypes must be a comma-separated list of fp32, fp16, bf16"),
    (["bench", "--axes", "3"], "--axes must be a comma-separated list of 1, 2"),
    (["bench", "--repeats", "0"], "expected a positive integer, got 0"),
    (["launch"], "invalid choice: 'launch'"),
    ([], "the following arguments are required"),
])
def test_bad_arguments_exit_2_with_a_message(capsys, argv, message):
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert message in err


def test_out_must_be_a_folder(capsys, tmp_path):
    a_file = tmp_path / "results"
    a_file.write_text("")
    code, _, err = run_main(["bench", "--quick", "--device", "cpu", "--out", str(a_file)], capsys)
    assert code == 2 and "expected a folder, found a file" in err


def test_gpu_without_a_gpu_is_refused(capsys, tmp_path):
    from fused_embedding.providers import real_gpu_reason
    if real_gpu_reason() is None:
        pytest.skip("a GPU is present: --device gpu is valid here")
    code, _, err = run_main(["bench", "--device", "gpu", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--device gpu: no GPU to benchmark here" in err


def test_parse_sizes():
    assert cli.parse_sizes("1024,64,128") == [(1024, 64, 128, cli.DEFAULT_VOCAB)]
    assert cli.parse_sizes(" 8, 4 ,16,500 ; 1,1,1,1;") == [(8, 4, 16, 500), (1, 1, 1, 1)]
    assert cli.parse_sizes("2,3,4,1_000") == [(2, 3, 4, 1000)]


def test_bad_arguments_in_a_fresh_process_give_no_traceback():
    # The installed entry point and `python -m fused_embedding` share main().
    done = subprocess.run([sys.executable, "-m", "fused_embedding", "bench", "--sizes", "1,2"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "error: size '1,2' has 2 fields" in done.stderr
    assert "Traceback" not in done.stderr


# --- the bytes model ------------------------------------------------------------

def test_bytes_model_by_hand():
    # B=2, L=3, D=4, float32 table, int32 ids:
    # ids 2*3*4 = 24, rows 2*3*4*4 = 96, output (2, 4) floats = 32 (axis 1) or (2, 3) = 24 (axis 2).
    assert bytes_model.fused_bytes(2, 3, 4, np.float32, np.int32, Axis.SEQUENCE) == 24 + 96 + 32
    assert bytes_model.fused_bytes(2, 3, 4, np.float32, np.int32, Axis.EMBEDDING) == 24 + 96 + 24
    assert bytes_model.fused_bytes(2, 3, 4, np.float32, np.int32, -1) == 24 + 96 + 24
    # float16 / bfloat16 table, int64 ids: ids 48, rows 48, output 16 (axis 1).
    assert bytes_model.fused_bytes(2, 3, 4, np.float16, np.int64, 1) == 48 + 48 + 16
    assert bytes_model.fused_bytes(2, 3, 4, BFLOAT16, np.int64, 1) == 48 + 48 + 16
    assert bytes_model.copy_bytes(1000) == 2000
    assert bytes_model.gb_per_s(3_000_000_000, 1.5) == pytest.approx(2.0)


# --- the results file ------------------------------------------------------------

def test_results_md_rewrites_only_its_section(tmp_path):
    first = cli.update_results_md(None, "cpu", "CPU table v1")
    assert "CPU table v1" in first and "## GPU" in first
    begin, end = cli.MD_BEGIN.format(device="CPU", generator=cli.MD_GENERATOR), cli.MD_END.format(device="CPU")
    assert first.index("## CPU") < first.index(begin) < first.index("CPU table v1") < first.index(end) \
        < first.index("## GPU")
    # What is pasted by hand under GPU, and notes anywhere outside the markers, survive.
    pasted = first + "\n| H100 | numba-cuda | 0.9 ms |\n"
    pasted = pasted.replace("## CPU\n", "## CPU\n\nA note kept by hand.\n")
    second = cli.update_results_md(pasted, "cpu", "CPU table v2")
    assert "CPU table v1" not in second and "CPU table v2" in second
    assert "| H100 | numba-cuda | 0.9 ms |" in second and "A note kept by hand." in second
    assert cli.update_results_md(second, "cpu", "CPU table v2") == second
    # A GPU run of the command gets its own marked section, the pasted text kept.
    third = cli.update_results_md(second, "gpu", "GPU bench table")
    assert "GPU bench table" in third and "| H100 | numba-cuda | 0.9 ms |" in third
    assert third.count(cli.MD_BEGIN.format(device="GPU", generator=cli.MD_GENERATOR)) == 1


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`bench --quick` on a tiny size, run for real, its files and exit code."""
    out = tmp_path_factory.mktemp("bench")
    results_md = out / "RESULTS.md"
    code = cli.main(["bench", "--quick", "--device", "cpu", "--sizes", "8,4,16,500",
                     "--dtypes", "fp32,bf16", "--repeats", "6", "--out", str(out),
                     "--results-md", str(results_md), "--no-progress", "--seed", "7"])
    return code, out, results_md


def test_quick_bench_writes_its_files(quick_run):
    code, out, results_md = quick_run
    assert code == 0
    results = json.loads((out / cli.RESULTS_JSON).read_text())
    assert results["schema"] == cli.SCHEMA_VERSION
    assert results["command"].startswith("fused-embedding bench --quick --device cpu --sizes 8,4,16,500")
    assert {"command", "date", "duration_s", "seed", "machine", "versions", "bytes_model", "copy", "read",
            "load_average", "skipped", "validation", "measurements"} <= set(results)
    assert {"cpu", "cores", "gpu", "python"} <= set(results["machine"])
    assert results["versions"]["numpy"] == np.__version__
    assert results["copy"]["cpu"]["gb_per_s"] > 0 and results["read"]["cpu"]["gb_per_s"] > 0
    assert results["validation"] and all(v["passed"] for v in results["validation"])

    measurements = results["measurements"]
    # Every case x axis x CPU provider appears: timed, or skipped with a reason.
    cases = {(m["batch"], m["length"], m["dim"], m["vocab"], m["dtype"], m["axis"]) for m in measurements}
    assert cases == {(8, 4, 16, 500, dt, ax) for dt in ("fp32", "bf16") for ax in (1, 2)}
    for m in measurements:
        assert MEASUREMENT_KEYS <= set(m)
        if m["status"] != "ok":
            assert m["status"] == "skipped" and m["note"]
            continue
        assert TIMED_KEYS <= set(m)
        assert 5 <= len(m["times_ms"]) <= 6
        assert m["p20_ms"] <= m["median_ms"] <= m["p80_ms"]
        assert m["median_ms"] == pytest.approx(float(np.median(m["times_ms"])), rel=1e-3)
        expected_bytes = bytes_model.fused_bytes(m["batch"], m["length"], m["dim"],
                                                 BFLOAT16 if m["dtype"] == "bf16" else np.float32,
                                                 np.int32, m["axis"])
        assert m["bytes"] == expected_bytes
        assert m["gb_per_s"] == pytest.approx(expected_bytes / (m["median_ms"] / 1e3) / 1e9, rel=1e-6)
        assert m["pct_of_copy"] == pytest.approx(100 * m["gb_per_s"] / results["copy"]["cpu"]["gb_per_s"])
        assert m["pct_of_read"] == pytest.approx(100 * m["gb_per_s"] / results["read"]["cpu"]["gb_per_s"])
    fused = [m for m in measurements if m["provider"] == "fused[cpu]"]
    assert len(fused) == len(cases) and all(m["status"] == "ok" for m in fused)
    # Speedups are over TF's unfused path where TF runs, else PyTorch's, in the same case.
    timed = {(m["provider"], m["dtype"], m["axis"]): m for m in measurements if m["status"] == "ok"}
    for m in timed.values():
        base = timed[(m["baseline"], m["dtype"], m["axis"])]
        assert m["baseline"] in ("tf-unfused", "torch-unfused")
        assert m["speedup_vs_unfused"] == pytest.approx(base["median_ms"] / m["median_ms"])

    png = (out / cli.RESULTS_PNG).read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    text = results_md.read_text()
    assert cli.MD_BEGIN.format(device="CPU", generator=cli.MD_GENERATOR) in text and "## GPU" in text
    assert "| B=8 L=4 D=16 V=500 fp32 axis 1 | fused[cpu] |" in text
    assert results["machine"]["cpu"] in text
    assert f"Read bandwidth: {results['read']['cpu']['gb_per_s']:.1f} GB/s" in text and "% read BW" in text
    assert (out / cli.RESULTS_MD).read_text().startswith("## CPU")
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"


def test_without_tensorflow_speedups_are_over_torch(capsys, tmp_path, monkeypatch):
    # As on the GPU test machine: the TF providers are skipped with their reason,
    # and PyTorch's unfused path becomes the baseline.
    from fused_embedding import providers
    if providers._torch_probe() is not None:
        pytest.skip("PyTorch is not installed")
    missing = "tensorflow is not installed (simulated)"
    for name in ("tf-op", "tf-unfused", "keras", "tf-lookup-sparse"):
        monkeypatch.setitem(providers._probes, name, missing)
    code, out, _ = run_main(["bench", "--device", "cpu", "--sizes", "16,4,8,300", "--axes", "1",
                             "--repeats", "5", "--out", str(tmp_path), "--no-progress"], capsys)
    assert code == 0
    results = json.loads((tmp_path / cli.RESULTS_JSON).read_text())
    assert {(s["provider"], s["reason"]) for s in results["skipped"]} >= {("tf-unfused", missing)}
    timed = [m for m in results["measurements"] if m["status"] == "ok"]
    assert {m["provider"] for m in timed} >= {"fused[cpu]", "torch-unfused", "torch-embedding-bag"}
    assert all(m["baseline"] == "torch-unfused" for m in timed)
    assert "speedup over torch-unfused" in out


# --- bench --sweep ----------------------------------------------------------------

def test_the_sweep_spans_the_shapes_it_promises():
    from fused_embedding import sweep
    from fused_embedding.providers import DTYPE_NAMES
    cases = sweep.sweep_cases()
    float32 = [c for c in cases if c[4] == "fp32"]
    assert len(float32) >= 25 and len(set(cases)) == len(cases)
    batches, lengths, dims, vocabs = (sorted({c[i] for c in float32}) for i in range(4))
    assert (batches[0], batches[-1], lengths[0], lengths[-1]) == (1, 32768, 1, 300)
    assert {4, 8, 16, 24, 40, 50, 100, 200, 300} <= set(dims) and dims[-1] >= 384
    assert (vocabs[0], vocabs[-1]) == (10_000, 5_000_000)
    for batch, length, dim, vocab, dtype in cases:
        assert vocab * dim * DTYPE_NAMES[dtype].itemsize <= sweep.SWEEP_TABLE_BYTES
    # The cut keeps V where the table fits and only then shrinks it.
    assert sweep.sweep_vocab(5_000_000, 8) == 5_000_000
    assert sweep.sweep_vocab(5_000_000, 384) * 384 * 4 <= sweep.SWEEP_TABLE_BYTES
    for shape in sweep.DTYPE_SHAPES:
        v = sweep.sweep_vocab(shape[3], shape[2])
        assert {c[4] for c in cases if c[:4] == (*shape[:3], v)} == {"fp32", "fp16", "bf16"}


def test_a_sweep_times_fused_torch_and_unfused_and_reports_the_worst(capsys, tmp_path, monkeypatch):
    from fused_embedding import providers, sweep
    if providers._torch_probe() is not None:
        pytest.skip("PyTorch is not installed")
    monkeypatch.setattr(sweep, "sweep_cases", lambda: [(8, 4, 24, 500, "fp32"), (3, 2, 8, 300, "bf16")])
    code, out, _ = run_main(["bench", "--sweep", "--repeats", "5", "--out", str(tmp_path),
                             "--no-progress", "--seed", "3"], capsys)
    assert code == 0
    results = json.loads((tmp_path / cli.RESULTS_JSON).read_text())
    timed = [m for m in results["measurements"] if m["status"] == "ok"]
    assert {m["provider"] for m in timed} == set(sweep.SWEEP_PROVIDERS)
    assert {(m["dim"], m["dtype"], m["axis"]) for m in timed} == {(24, "fp32", 1), (8, "bf16", 1)}
    medians = {(m["dim"], m["provider"]): m["median_ms"] for m in timed}
    rows = results["sweep"]
    assert len(rows) == 2
    for r in rows:
        assert r["ratio"] == pytest.approx(medians[(r["dim"], sweep.FUSED)] / medians[(r["dim"], sweep.TORCH)])
        assert r["unfused_ms"] == medians[(r["dim"], sweep.UNFUSED)]
    worst = max(rows, key=lambda r: r["ratio"])
    called_out = f"Worst: {worst['ratio']:.2f} at B={worst['batch']} L={worst['length']} D={worst['dim']}"
    assert called_out in out and called_out in (tmp_path / cli.RESULTS_MD).read_text()


@pytest.mark.parametrize("extra", [["--sizes", "8,4,16"], ["--dtypes", "fp16"], ["--quick"], ["--bags"]])
def test_sweep_refuses_the_options_it_ignores(capsys, tmp_path, extra):
    code, _, err = run_main(["bench", "--sweep", *extra, "--out", str(tmp_path)], capsys)
    assert code == 2 and "--sweep" in err
    assert not any(tmp_path.iterdir())


# --- validate ------------------------------------------------------------------

def test_validate_passes_on_the_host_backends(capsys):
    code, out, _ = run_main(["validate", "--device", "cpu", "--seed", "3"], capsys)
    assert code == 0, out
    assert "cpu      reference" in out and "numpy    reference" in out
    assert "FAIL" not in out
    assert "checks passed" in out


def test_validate_fails_on_a_wrong_backend(capsys, monkeypatch):
    from fused_embedding.backends import numpy as numpy_backend
    correct = numpy_backend.embedding_mean

    def off_by_a_little(table, ids, axis, mask_zero, out=None):
        result = correct(table, ids, axis, mask_zero, out)
        result[..., -1] += np.asarray(1e-2, dtype=result.dtype)
        return result

    monkeypatch.setattr(numpy_backend, "embedding_mean", off_by_a_little)
    code, out, _ = run_main(["validate", "--device", "cpu", "--seed", "3"], capsys)
    assert code == 1
    assert "FAIL" in out and "elements differ" in out


def test_validate_checks_bags_and_fails_on_a_wrong_bags_kernel(capsys, monkeypatch):
    from fused_embedding import bags
    correct = bags._launch_numpy

    def off_by_a_little(table, values, offsets, weights, combiner, out, n_chunks):
        correct(table, values, offsets, weights, combiner, out, n_chunks)
        out[..., -1] += np.asarray(1e-2, dtype=out.dtype)

    monkeypatch.setattr(bags, "_launch_numpy", off_by_a_little)
    code, out, _ = run_main(["validate", "--device", "cpu", "--seed", "4"], capsys)
    assert code == 1
    for kind in ("fp32", "fp16", "bf16", "int8", "int4"):
        assert re.search(rf"cpu +bags +{kind} +24 +PASS", out), out
    assert re.search(r"numpy +bags +fp32 +24 +FAIL", out), out
    assert "FAIL numpy bags fp32" in out


def test_the_bench_validates_and_times_tf_providers_without_retracing_warnings(rng):
    """Every TF provider validated and prepared per case, axis and table dtype, as `bench`
    does (one tf.function each): TF logs no "triggered tf.function retracing"."""
    pytest.importorskip("tensorflow")
    import logging

    from fused_embedding import providers as P
    from fused_embedding.validation import random_inputs
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    tf_logger = logging.getLogger("tensorflow")
    tf_logger.addHandler(handler)
    try:
        tf_providers = [p for p in P.providers_for("cpu") if p.name in
                        ("tf-op", "tf-unfused", "keras", "tf-lookup-sparse") and p.probe() is None]
        assert len(tf_providers) == 4
        for provider in tf_providers:
            for axis in Axis:
                for dtype in P.DTYPE_NAMES.values():
                    if provider.supports(axis, dtype) is not None:
                        continue
                    assert P.validate_provider(provider, rng, axis, dtype) is None
                    for batch, length in ((5, 3), (9, 4)):  # two timed cases, two id sets each
                        table, ids = random_inputs(rng, 60, 8, batch, length, dtype)
                        _, other = random_inputs(rng, 60, 8, batch, length, dtype)
                        run = provider.prepare(P.Inputs(table, [ids, other], axis))
                        for k in (0, 1, 0, 1):
                            run(k)
    finally:
        tf_logger.removeHandler(handler)
    retracing = [r.getMessage() for r in records if "retracing" in r.getMessage()]
    assert not retracing, retracing[0]
