"""The TF op's compiled kernel (tf_compiled.py): where it can't be built the op keeps
its Python body and says why; a changed source or TF builds a new library."""
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

tf = pytest.importorskip("tensorflow")

import fused_embedding.tf_compiled as tf_compiled  # noqa: E402

FALLBACK_SCRIPT = textwrap.dedent("""
    import logging, numpy as np, tensorflow as tf
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import fused_embedding.tf as fused_tf, fused_embedding.tf_compiled as tf_compiled
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    ids = np.array([[0, 1], [2, 3]], np.int32)
    graph_fn = tf.function(lambda t, i: fused_tf.embedding_mean(t, i))
    kinds = {op.type for op in graph_fn.get_concrete_function(table, ids).graph.get_operations()}
    print("kinds", sorted(kinds & {"PyFunc", "FusedEmbeddingMean"}))
    print("result", np.asarray(graph_fn(table, ids)).tolist())
    print("reason", tf_compiled.unavailable_reason())
""")


@pytest.mark.parametrize("setting,reason", [
    ({"CXX": "/nonexistent/c++"}, "no C++ compiler"),
    ({"CXX": "false"}, "false failed (1)"),
    ({"NUMBA_THREADING_LAYER": "workqueue"}, "'workqueue' threading layer can't take launches"),
    ({tf_compiled.ENABLE_ENV_VAR: "0"}, f"turned off by {tf_compiled.ENABLE_ENV_VAR}=0"),
], ids=["no-compiler", "build-fails", "workqueue", "turned-off"])
def test_where_the_kernel_cannot_be_used_the_op_keeps_its_python_body(tmp_path, setting, reason):
    env = dict(os.environ, FUSED_EMBEDDING_CACHE_DIR=str(tmp_path / "cache"))
    env.pop(tf_compiled.ENABLE_ENV_VAR, None)
    env.update(setting)
    done = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert lines["kinds"] == "['PyFunc']"
    assert lines["result"] == "[[1.5, 2.5, 3.5], [7.5, 8.5, 9.5]]"
    assert reason in lines["reason"]
    assert "the TF op keeps its Python body" in done.stderr  # said once, as a warning


def test_the_library_is_named_by_its_source_and_tf(monkeypatch, tmp_path):
    """A changed source, TF version or compiler gets a library of its own, never a stale one."""
    monkeypatch.setenv(tf_compiled.CACHE_ENV_VAR, str(tmp_path))
    source = tmp_path / "op.cc"
    source.write_text("// one\n")
    monkeypatch.setattr(tf_compiled, "SOURCE", source)
    first = tf_compiled.library_path("c++")
    assert first.parent == tmp_path
    assert tf_compiled.library_path("c++") == first
    assert tf_compiled.library_path("clang++") != first
    monkeypatch.setattr(tf, "__version__", tf.__version__ + ".post1")
    assert tf_compiled.library_path("c++") != first
    monkeypatch.undo()
    monkeypatch.setenv(tf_compiled.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.setattr(tf_compiled, "SOURCE", source)
    source.write_text("// two\n")
    assert tf_compiled.library_path("c++") != first


def test_the_cache_falls_back_to_the_temporary_folder_when_home_is_read_only(monkeypatch, tmp_path):
    monkeypatch.delenv(tf_compiled.CACHE_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert tf_compiled.cache_dir() == tmp_path / "cache" / "fused_embedding"
    monkeypatch.setattr(tf_compiled.os, "access", lambda path, mode: False)  # root may write anywhere
    fallback = tf_compiled.cache_dir()
    assert fallback.parent == Path(tempfile.gettempdir()) and fallback.name.startswith("fused_embedding-")
    monkeypatch.setenv(tf_compiled.CACHE_ENV_VAR, str(tmp_path / "explicit"))
    assert tf_compiled.cache_dir() == tmp_path / "explicit"
