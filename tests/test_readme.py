"""The README's Python examples run as written, in order, in a fresh process (what a
newcomer pasting them gets)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def test_the_readme_has_examples():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 4 and all(block.strip() for block in blocks)


@pytest.mark.slow
def test_the_readme_examples_run_in_order(tmp_path):
    pytest.importorskip("tensorflow")
    script = "\n".join(f"# --- README example {i + 1}\n{block}" for i, block in enumerate(
        python_blocks(README.read_text())))
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
