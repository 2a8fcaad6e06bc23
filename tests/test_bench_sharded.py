"""benchmarks/bench_sharded.py at a small shape, in a fresh process (it starts its own
in-process cluster): every provider timed, the fused results equal the unfused ones, and
the bytes printed are the ones the shapes give."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("portpicker")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_small_run_prints_times_bytes_and_machine():
    batch, length, dim = 32, 8, 16
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_sharded.py"), "--vocab", "10001", "--batch", str(batch),
         "--length", str(length), "--dim", str(dim), "--rounds", "2", "--id-sets", "2", "--seed", "7"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert "load average" in out and "2 parameter servers" in out and "shards [5001, 5000] rows" in out
    max_diff = float(re.search(r"max \|fused - unfused\| = (\S+)", out).group(1))
    assert max_diff < 1e-5
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (fused|fused-tf-ops|unfused) \| (.*)$", out, re.M)}
    assert {"fused", "unfused"} <= set(rows)
    fused_bytes = 2 * (batch * dim * 4 + batch * 4) / 1e6
    assert f"= {fused_bytes:,.2f} MB" in rows["fused"]
    assert f"B*L*D*4 = {batch * length * dim * 4 / 1e6:,.2f} MB" in rows["unfused"]
    assert re.search(r"speed-up of fused \(median unfused / median fused\): [\d.]+x", out)
