"""Every CUDA C source in kernels/ compiles for sm_80 and sm_90 without register spills.

No GPU is needed: nvcc compiles (``-cubin``), ptxas reports registers and spills
(``-Xptxas -v``). The templates are instantiated with every name the "cupy"
backend can ask CuPy for with int64 ids (``all_kernel_names``), and with int32
ids for narrow rows (the id type changes one load, not the register budget), so
what is checked here is what NVRTC will build on a GPU machine.
"""
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fused_embedding.backends import cupy as cupy_backend

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
SOURCES = sorted(KERNELS.glob("*.cu"))
ARCHS = ["sm_80", "sm_90"]
NVCC = shutil.which("nvcc")
KERNEL_NAMES = sorted(set(cupy_backend.all_kernel_names(id_dtypes=[np.dtype(np.int64)]))
                      | set(cupy_backend.all_kernel_names(16, id_dtypes=[np.dtype(np.int32)])))
# The kernels' one parameter list (see kernels/gather_mean.cu).
PARAMETERS = "const void*, const void*, long long, long long, long long, long long, int, void*, long long*"

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed: CUDA C sources cannot be compiled here")


def instantiations(source: Path) -> str:
    """The source plus an explicit instantiation of every kernel the backend may launch."""
    lines = [f'#include "{source}"']
    if source.name == cupy_backend.SOURCE_FILE:
        lines += [f"template __global__ void {name}({PARAMETERS});" for name in KERNEL_NAMES]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def ptxas_reports(tmp_path_factory):
    """{(source name, arch): (returncode, nvcc output)}, the archs compiled in parallel."""
    folder = tmp_path_factory.mktemp("cuda")
    reports = {}
    for source in SOURCES:
        wrapper = folder / f"{source.stem}_instances.cu"
        wrapper.write_text(instantiations(source))
        runs = {arch: subprocess.Popen([NVCC, "-std=c++17", "-cubin", f"-arch={arch}", "-Xptxas", "-v",
                                        str(wrapper), "-o", str(folder / f"{source.stem}.{arch}.cubin")],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for arch in ARCHS}
        for arch, run in runs.items():
            output, _ = run.communicate(timeout=600)
            reports[source.name, arch] = (run.returncode, output)
    return reports


def test_there_are_sources():
    assert cupy_backend.SOURCE_FILE in [s.name for s in SOURCES]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", [s.name for s in SOURCES])
def test_compiles_without_spills(ptxas_reports, source, arch):
    returncode, output = ptxas_reports[source, arch]
    assert returncode == 0, f"nvcc failed for {source} on {arch}:\n{output[-4000:]}"
    functions = re.findall(r"Compiling entry function '(\w+)'", output)
    if source == cupy_backend.SOURCE_FILE:
        assert len(functions) == len(KERNEL_NAMES), "not every instantiation was compiled"
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", output)
    assert len(spills) == len(functions)
    spilled = [(name, stores, loads) for name, (stores, loads) in zip(functions, spills)
               if int(stores) or int(loads)]
    assert not spilled, (f"{len(spilled)} kernels spill registers on {arch}: " + "; ".join(
        f"{name}: {stores} B stored, {loads} B loaded" for name, stores, loads in spilled[:5]))
