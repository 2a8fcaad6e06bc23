"""benchmarks/pytest_results_md.py: pytest-benchmark JSON -> the marked RESULTS.md section."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("pytest_results_md", ROOT / "benchmarks" / "pytest_results_md.py")
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)


def bench(group, provider, median, gbs=None):
    return dict(group=group, name=f"test_provider[{group}-{provider}]",
                stats=dict(median=median, iqr=median / 10, rounds=20),
                extra_info={} if gbs is None else dict(gb_per_s=gbs))


def report():
    group = "B1024-L64-D128-V1000000-fp32-axis1"
    return dict(machine_info=dict(cpu=dict(brand_raw="Test CPU", count=2)), datetime="2026-01-02T03:04:05",
                version="5.2.3",
                benchmarks=[bench(group, "tf-unfused", 4e-3, 9.0), bench(group, "fused[cpu]", 1e-3, 34.0),
                            bench(group, "tf-op", 2e-3),
                            dict(group="copy baseline", name="test_copy_baseline",
                                 stats=dict(median=0.0134, iqr=0.001, rounds=10), extra_info={}),
                            dict(group="read baseline", name="test_read_baseline",
                                 stats=dict(median=0.0061, iqr=0.001, rounds=10),
                                 extra_info=dict(bytes=256 << 20))])


def test_section_holds_every_provider_with_its_ratios(tmp_path):
    results = tmp_path / "RESULTS.md"
    begin = script.update_results_md("# Results\n", script.SECTION, "old", generator=script.GENERATOR)
    results.write_text(begin + "\nkept after\n")
    source = tmp_path / "bench.json"
    source.write_text(json.dumps(report()))
    assert script.main([str(source), "--results-md", str(results)]) == 0
    text = results.read_text()
    assert "old" not in text and "kept after" in text and "Test CPU, 2 cores" in text
    assert "Copy bandwidth: 40.1 GB/s" in text  # 2 x 256 MiB in 13.4 ms
    assert "Read bandwidth: 44.0 GB/s" in text  # 256 MiB in 6.1 ms
    assert "read baseline" not in text and "copy baseline" not in text  # references, not case tables
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert lines["fused[cpu]"].split("|")[2:7] == [" 1.000 ", " 0.100 ", " 34.0 ", " 4.00 ", " 1.00 "]
    assert lines["tf-op"].split("|")[4:7] == [" - ", " 2.00 ", " 2.00 "]
    assert text.index("| fused[cpu] |") < text.index("| tf-op |") < text.index("| tf-unfused |")


def test_unreadable_json_exits_2(tmp_path):
    assert script.main([str(tmp_path / "missing.json"), "--results-md", str(tmp_path / "R.md")]) == 2
