"""The TF op's compiled kernel (tf_compiled.py): where it can't be built the op keeps
its Python body and says why; a changed source or TF builds a new library; a damaged
cached library is built anew, never loaded; an output past the host's memory (a
container's limit included) is refused before it is allocated, in every form of the op."""
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import fused_embedding.tf as fused_tf  # noqa: E402
import fused_embedding.tf_compiled as tf_compiled  # noqa: E402
from fused_embedding import memory  # noqa: E402
from fused_embedding.reference import embedding_mean_reference  # noqa: E402
from fused_embedding.semantics import BFLOAT16  # noqa: E402
from fused_embedding.validation import POISON, assert_close, random_inputs  # noqa: E402

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


# --- a damaged cached library -----------------------------------------------------------------

def damaged_copies(data: bytes, rng) -> dict:
    """The damage of issue 19: truncated to 4096 or 20000 bytes, 5 KB of garbage written
    into the middle; and those a loader refused even before (empty, 100 bytes, random)."""
    middle = len(data) // 2
    return {"truncated-4096": data[:4096], "truncated-20000": data[:20000],
            "garbage-in-the-middle": data[:middle] + rng.bytes(5000) + data[middle + 5000:],
            "empty": b"", "100-bytes": data[:100], "random": rng.bytes(len(data))}


def test_a_cached_library_is_loaded_only_when_it_matches_its_digest(tmp_path, rng):
    path = tmp_path / "tf_host_op-0123.so"
    assert tf_compiled.why_rebuild(path) == "none is cached yet"
    data = rng.bytes(30000)
    path.write_bytes(data)
    assert "has no readable digest beside it (tf_host_op-0123.so.sha256)" in tf_compiled.why_rebuild(path)
    tf_compiled.digest_path(path).write_text(f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")
    assert tf_compiled.why_rebuild(path) is None
    for name, damaged in damaged_copies(data, rng).items():
        path.write_bytes(damaged)
        assert "does not match its digest" in tf_compiled.why_rebuild(path), name
    tf_compiled.digest_path(path).write_text("")
    assert "has no readable digest" in tf_compiled.why_rebuild(path)


def test_a_build_leaves_the_library_and_its_digest_or_nothing(tmp_path, monkeypatch, caplog):
    """The digest is written after the library's rename, each through a private file; a
    failed build leaves neither. A build is announced once, as a warning naming the
    command that builds ahead; a verified library loads without one."""
    monkeypatch.setenv(tf_compiled.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setattr(tf_compiled, "_build_command",
                        lambda compiler, output, include_dir: [compiler, "-c", f"printf 'a library' > '{output}'"])
    path = tf_compiled.library_path("sh")
    with caplog.at_level(logging.WARNING, logger="fused_embedding"):
        assert tf_compiled.ensure_library("sh") == path
        assert tf_compiled.ensure_library("sh") == path  # verified: not built again
    assert [record.levelno for record in caplog.records] == [logging.WARNING]
    assert "`fused-embedding build` builds it ahead of time): none is cached yet" in caplog.text
    assert tf_compiled.digest_path(path).read_text() == (
        f"{hashlib.sha256(b'a library').hexdigest()}  {path.name}\n")  # as sha256sum writes it
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".sha256"]

    monkeypatch.setattr(tf_compiled, "_build_command",
                        lambda compiler, output, include_dir: [compiler, "-c", f"printf half > '{output}'; exit 1"])
    path.unlink()
    tf_compiled.digest_path(path).unlink()
    with pytest.raises(RuntimeError, match="sh failed \\(1\\)"):
        tf_compiled.ensure_library("sh")
    assert not any(path.parent.iterdir())


@pytest.mark.slow
def test_a_damaged_cached_library_is_built_anew_in_a_fresh_process(tmp_path, rng):
    """A fresh process meeting a damaged cached library (issue 19's three kinds of damage)
    rebuilds it and runs the compiled kernel, where it used to die of SIGBUS or SIGSEGV."""
    compiler = tf_compiled._compiler()
    if compiler is None or tf_compiled.op_module() is None:
        pytest.skip(f"the compiled kernel can't be built here: {tf_compiled.unavailable_reason()}")
    built = tf_compiled.library_path(compiler)  # the one this process loaded, with its digest
    cache = tmp_path / "cache"
    cache.mkdir()
    cached = cache / built.name
    data = built.read_bytes()
    shutil.copy(tf_compiled.digest_path(built), tf_compiled.digest_path(cached))
    env = dict(os.environ, FUSED_EMBEDDING_CACHE_DIR=str(cache))
    env.pop(tf_compiled.ENABLE_ENV_VAR, None)
    damages = damaged_copies(data, rng)
    for name in ("truncated-4096", "truncated-20000", "garbage-in-the-middle"):
        cached.write_bytes(damages[name])
        done = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, f"{name}: exit {done.returncode}: {done.stderr[-3000:]}"
        lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
        assert lines["kinds"] == "['FusedEmbeddingMean']", (name, done.stderr[-3000:])
        assert lines["result"] == "[[1.5, 2.5, 3.5], [7.5, 8.5, 9.5]]", name
        assert lines["reason"] == "None", name
        assert done.stderr.count("building the TF op's compiled kernel") == 1, name
        assert f"{cached.name} does not match its digest" in done.stderr, name
        assert tf_compiled.why_rebuild(cached) is None, name  # rebuilt, with a digest that matches


# --- an output past the host's memory ----------------------------------------------------------

needs_compiled_kernel = pytest.mark.skipif(
    "tf_compiled.op_module() is None",
    reason="the compiled TF kernel can't be built here (test_tf_op.py: test_compiled_kernel_builds_where_a_compiler_is)")

TF_DTYPES = {np.dtype(np.float32): tf.float32, np.dtype(np.float16): tf.float16, BFLOAT16: tf.bfloat16}


def graph_op(**kwargs):
    return tf.function(lambda table, ids: fused_tf.embedding_mean(table, ids, **kwargs))


def uses_compiled_kernel(function, table, ids) -> bool:
    graph = function.get_concrete_function(table, ids).graph
    return "FusedEmbeddingMean" in {op.type for op in graph.get_operations()}


@needs_compiled_kernel
@pytest.mark.parametrize("dtype", list(TF_DTYPES), ids=str)
def test_the_compiled_kernel_refuses_an_output_past_the_hosts_memory(dtype):
    """(2**18, 2**18): 128 or 256 GiB, more than any host here; refused with the core op's
    message before TF is asked for it (TF's allocator would fail with its own)."""
    table = tf.zeros((1, 2**18), TF_DTYPES[dtype])  # 0.5-1 MiB in, nothing like that out
    ids = tf.zeros((2**18, 1), tf.int32)
    function = graph_op()
    assert uses_compiled_kernel(function, table, ids)
    gib = 2**36 * dtype.itemsize / 2**30
    with pytest.raises(tf.errors.ResourceExhaustedError,
                       match=rf"the output \(262144, 262144\) {dtype} needs {gib:.1f} GiB, more than the "
                             r"[0-9.]+ GiB the 'cpu' backend's device has"):
        function(table, ids)


def container(root: Path, free_bytes: int) -> None:
    """A fake system under ``root`` whose process is in a cgroup v2 with ``free_bytes`` left
    (on a host with 20 GiB available)."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text("0::/job\n")
    (root / "proc/meminfo").write_text("MemTotal: 33554432 kB\nMemAvailable: 20971520 kB\n")
    (root / "sys/fs/cgroup/job").mkdir(parents=True)
    (root / "sys/fs/cgroup/job/memory.max").write_text(f"{2**30 + free_bytes}\n")
    (root / "sys/fs/cgroup/job/memory.current").write_text(f"{2**30}\n")


@needs_compiled_kernel
def test_every_form_of_the_op_refuses_an_output_past_a_containers_limit(rng, tmp_path, monkeypatch):
    """A 128 MiB output with 100 MiB left in the cgroup: the compiled kernel and the
    numpy_function form fail with ResourceExhaustedError, the eager call with
    MemoryError, each with the core op's message, before anything is written. A 64 MiB
    output, the smallest the kernel checks, fits and is computed."""
    monkeypatch.setattr(memory, "SYSTEM_ROOT", str(tmp_path))
    container(tmp_path, 100 << 20)
    table = tf.ones((1, 1024), tf.float32)
    ids = tf.zeros((2**15, 1), tf.int32)
    message = (r"the output \(32768, 1024\) float32 needs 0\.1 GiB, more than the 0\.1 GiB the "
               r"'{}' backend's device has")
    compiled = graph_op()
    assert uses_compiled_kernel(compiled, table, ids)
    with pytest.raises(tf.errors.ResourceExhaustedError, match=message.format("cpu")):
        compiled(table, ids)
    python_body = graph_op(backend="numpy")
    assert not uses_compiled_kernel(python_body, table, ids)
    with pytest.raises(tf.errors.ResourceExhaustedError, match="MemoryError: " + message.format("numpy")):
        python_body(table, ids)
    with pytest.raises(MemoryError, match=message.format("cpu")):
        fused_tf.embedding_mean(table, ids)

    from fused_embedding.api import MEMORY_CHECK_MIN_BYTES
    table, ids = random_inputs(rng, 7, 1024, MEMORY_CHECK_MIN_BYTES // 4096, 2)
    assert uses_compiled_kernel(compiled, table, ids)
    tf_compiled.poison_outputs(POISON)  # every element must be written by the kernel
    try:
        out = np.asarray(compiled(table, ids))
    finally:
        tf_compiled.poison_outputs(None)
    assert out.nbytes == MEMORY_CHECK_MIN_BYTES
    assert_close(out, embedding_mean_reference(table, ids), np.float32)
