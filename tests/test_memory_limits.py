"""The host's memory bound (memory.host_memory_limit_bytes): MemAvailable, and the limit of
every memory-limited cgroup (v1 or v2) the process is in, read from a fake /proc and
/sys/fs/cgroup tree; the core op refuses an output past it before launching."""
import numpy as np
import pytest

import fused_embedding as fe
from fused_embedding import backends, memory

GIB = 2**30
MEMINFO = "MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n"


def make_tree(root, cgroup_lines, files, meminfo=MEMINFO):
    """A fake system under ``root``: proc/self/cgroup's lines, proc/meminfo, and
    ``files`` ({relative path: text}); memory.SYSTEM_ROOT must point at it."""
    (root / "proc/self").mkdir(parents=True)
    if cgroup_lines is not None:
        (root / "proc/self/cgroup").write_text("".join(line + "\n" for line in cgroup_lines))
    if meminfo is not None:
        (root / "proc/meminfo").write_text(meminfo)
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)


@pytest.fixture
def fake_root(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "SYSTEM_ROOT", str(tmp_path))
    return tmp_path


MEM_AVAILABLE = 20000000 * 1024
MEM_TOTAL = 32000000 * 1024
V2 = "sys/fs/cgroup"
V1 = "sys/fs/cgroup/memory"


@pytest.mark.parametrize("cgroup_lines, files, limit, total", [
    pytest.param(["0::/app.slice/job"], {
        f"{V2}/app.slice/job/memory.max": f"{3 * GIB}\n",
        f"{V2}/app.slice/job/memory.current": f"{GIB}\n",
        f"{V2}/app.slice/job/memory.stat": f"anon 100\nfile 900\ninactive_file {GIB // 2}\nactive_file 7\n",
    }, 3 * GIB - GIB // 2, 3 * GIB, id="v2-own-limit-less-inactive-cache"),
    pytest.param(["0::/app.slice/job"], {
        f"{V2}/app.slice/job/memory.max": "max\n",
        f"{V2}/app.slice/job/memory.current": f"{GIB}\n",
        f"{V2}/app.slice/memory.max": f"{2 * GIB}\n",
        f"{V2}/app.slice/memory.current": f"{GIB // 4}\n",
    }, 2 * GIB - GIB // 4, 2 * GIB, id="v2-ancestor-limit-binds"),
    pytest.param(["0::/app.slice/job"], {
        f"{V2}/app.slice/job/memory.max": "max\n",
        f"{V2}/app.slice/job/memory.current": f"{GIB}\n",
    }, MEM_AVAILABLE, MEM_TOTAL, id="v2-max-is-no-limit"),
    pytest.param(["0::/"], {
        "sys/fs/cgroup/unified/memory.max": f"{GIB}\n", "sys/fs/cgroup/unified/memory.current": "0\n",
    }, GIB, GIB, id="v2-hybrid-mount"),
    pytest.param(["12:cpu,cpuacct:/docker/abc", "4:memory:/docker/abc", "0::/docker/abc"], {
        # the container's own cgroup mounted at the controller's root: /docker/abc isn't there
        f"{V1}/memory.limit_in_bytes": f"{3 * GIB}\n",
        f"{V1}/memory.usage_in_bytes": f"{2 * GIB}\n",
        f"{V1}/memory.stat": f"cache 5\ninactive_file 1\ntotal_inactive_file {GIB}\n",
    }, 2 * GIB, 3 * GIB, id="v1-container-root"),
    pytest.param(["4:memory:/batch/job"], {
        f"{V1}/batch/job/memory.limit_in_bytes": "9223372036854771712\n",  # v1's "no limit"
        f"{V1}/batch/job/memory.usage_in_bytes": f"{5 * GIB}\n",
        f"{V1}/batch/memory.limit_in_bytes": f"{4 * GIB}\n",
        f"{V1}/batch/memory.usage_in_bytes": f"{GIB}\n",
        f"{V1}/memory.limit_in_bytes": "9223372036854771712\n",
    }, 3 * GIB, 4 * GIB, id="v1-ancestor-limit-binds"),
    pytest.param(["4:memory:/job"], {
        f"{V1}/job/memory.limit_in_bytes": f"{64 * GIB}\n", f"{V1}/job/memory.usage_in_bytes": "0\n",
    }, MEM_AVAILABLE, MEM_TOTAL, id="meminfo-lower-than-the-cgroup"),
    pytest.param(["4:memory:/job"], {
        f"{V1}/job/memory.limit_in_bytes": f"{2 * GIB}\n",  # no usage file: counts as none used
    }, 2 * GIB, 2 * GIB, id="v1-usage-missing"),
    pytest.param(["0::/job"], {
        f"{V2}/job/memory.max": "garbage\n", f"{V2}/job/memory.current": "1\n",
    }, MEM_AVAILABLE, MEM_TOTAL, id="unreadable-limit-is-no-limit"),
    pytest.param(["0::/job"], {}, MEM_AVAILABLE, MEM_TOTAL, id="cgroup-files-missing"),
    pytest.param(None, {}, MEM_AVAILABLE, MEM_TOTAL, id="no-proc-self-cgroup"),
])
def test_host_memory_bound_reads_cgroup_limits(fake_root, cgroup_lines, files, limit, total):
    make_tree(fake_root, cgroup_lines, files)
    assert memory.host_memory_limit_bytes() == limit
    assert memory.host_memory_total_bytes() == total
    for name in ("cpu", "numpy"):  # the host backends' bound is this one
        assert backends.get(name).memory_limit_bytes() == limit


def test_without_meminfo_the_bound_falls_back_on_sysconf(fake_root):
    make_tree(fake_root, ["0::/job"], {f"{V2}/job/memory.max": f"{GIB}\n"}, meminfo=None)
    assert memory.host_memory_limit_bytes() == GIB  # the cgroup is lower than any real host
    (fake_root / f"{V2}/job/memory.max").write_text("max\n")
    assert 0 < memory.host_memory_limit_bytes() < memory.NO_LIMIT
    assert 0 < memory.host_memory_total_bytes() < memory.NO_LIMIT


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize("axis", [1, 2])
def test_an_output_past_the_cgroup_limit_raises_memory_error_before_launching(
        rng, fake_root, monkeypatch, backend, axis):
    """A 4 GiB output in a 3 GiB cgroup on a host with 20 GiB available: MemoryError,
    not the OOM killer (exit 137) halfway through the kernel."""
    make_tree(fake_root, ["0::/job"], {f"{V2}/job/memory.max": f"{3 * GIB}\n",
                                       f"{V2}/job/memory.current": f"{GIB // 8}\n"})
    dim = 1024
    table = rng.standard_normal((3, dim)).astype(np.float32)
    ids_shape = (2**20, 1) if axis == 1 else (2**10, 2**20)  # 4 GiB of float32 out either way
    ids = np.broadcast_to(np.zeros((1, 1), np.int32), ids_shape)  # no memory behind it
    module = backends.get(backend)
    launched = []
    monkeypatch.setattr(module, "embedding_mean", lambda *args, **kwargs: launched.append(1))
    with pytest.raises(MemoryError, match=rf"the output \({ids_shape[0]}, {(dim, ids_shape[1])[axis - 1]}\) "
                                          rf"float32 needs 4\.0 GiB, more than the 2\.9 GiB the '{backend}' "
                                          r"backend's device has"):
        fe.embedding_mean(table, ids, axis=axis, backend=backend)
    assert not launched


def test_output_too_large_error_wording():
    error = memory.output_too_large_error((2**20, 1024), np.float16, 2 * GIB, 3 * GIB // 2, "cpu")
    assert isinstance(error, MemoryError)
    assert str(error) == ("the output (1048576, 1024) float16 needs 2.0 GiB, more than the 1.5 GiB "
                          "the 'cpu' backend's device has")


def test_the_bench_sizes_tables_by_the_containers_memory(fake_root, capsys):
    """`fused-embedding bench` refuses a table over a quarter of the memory: a container's."""
    from fused_embedding import cli
    make_tree(fake_root, ["0::/job"], {f"{V2}/job/memory.max": f"{3 * GIB}\n"})
    assert cli._memory_bytes() == 3 * GIB
    parser = cli.make_parser()
    args = parser.parse_args(["bench", "--sizes", "8,4,256,1000000"])  # a 1 GiB float32 table
    with pytest.raises(SystemExit):
        cli.build_cases(args, parser)
    assert "more than a quarter of this machine's 3.0 GiB" in capsys.readouterr().err
