"""10,000 calls of the TF op keep the process' resident memory within 20 MB of where it settled.

Runs benchmarks/leak_check.py in a fresh process (so the figure is the op's, not
the test session's), eagerly and through tf.function, and asserts its verdict.
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip("tensorflow", reason="TensorFlow is not installed")
pytest.importorskip("psutil", reason="psutil measures resident memory")

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "leak_check.py")


@pytest.mark.slow
def test_tf_op_10000_calls_keep_rss_flat(rng):
    result = subprocess.run(
        [sys.executable, SCRIPT, "--calls", "10000", "--warmup", "1000", "--bound-mb", "20",
         "--paths", "eager,tf.function", "--seed", str(int(rng.integers(2**32)))],
        capture_output=True, text=True, timeout=600)
    print(result.stdout)
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}"
    for path in ("eager", "tf.function"):
        assert any(line.startswith(path) and line.endswith("ok") for line in result.stdout.splitlines()), \
            result.stdout
