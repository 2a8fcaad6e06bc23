#!/usr/bin/env python
"""GPU check: validate every GPU backend, then time it against its baselines, in one run.

    python benchmarks/gpu_check.py              # on a GPU machine, from the repository root
    python benchmarks/gpu_check.py --simulate   # no GPU: the CUDA simulator, validation only

1. Prints the device and the versions of everything involved.
2. Validates "numba-cuda" and "cupy" on fresh random inputs, outputs poisoned
   before each launch, against the float64 reference with the per-dtype
   tolerances (fused_embedding.validation): both axes, masks, float32/float16/
   bfloat16, int32/int64 ids, odd shapes, empty batches, device inputs, and the
   out-of-range error, raised at once and deferred (bounds_check="deferred",
   raised by synchronize()). One PASS/FAIL line per case.
3. Times each backend (the kernel alone, and the whole call with the bounds
   check raised at once and deferred) against
   torch.nn.functional.embedding_bag(mode="mean"), the unfused gather+mean in
   CuPy and in PyTorch, and a device-to-device copy, all in this run, with CUDA
   events (warm-up, median of many, id sets rotated so the rows touched exceed
   L2). GB/s come from bytes_model.fused_bytes; % is of the copy's bandwidth.
   Then the speed targets, each met or not met, and the registers, local memory
   (where spills would land) and shared memory of every Numba kernel compiled.
4. With OUT set, writes gpu_check.json and gpu_check.md there.

Needs numba-cuda; CuPy and PyTorch are optional (reported "missing"). Imports
nothing that imports TensorFlow. Works from a checkout without installing: it
puts python/ on sys.path and maps kernels/ to fused_embedding.kernels. Any one
failure is reported and the run goes on; each section has a time budget.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.util
import json
import os
import platform
import shutil
import sys
import time
import traceback
import types
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The headline shape and its variants: (label, dtype name, D, B, L, axis).
V_TIMED = 4_000_000
MAIN = ("fp32 D=128", "float32", 128, 65536, 32, 1)
TIMED_CONFIGS = [
    MAIN,
    ("fp16 D=128", "float16", 128, 65536, 32, 1),
    ("bf16 D=128", "bfloat16", 128, 65536, 32, 1),
    ("fp32 D=16", "float32", 16, 524288, 32, 1),     # B x 8: the same rows' bytes as D=128
    ("fp32 D=512", "float32", 512, 16384, 32, 1),    # B / 4
    ("fp32 D=128 axis 2", "float32", 128, 65536, 32, 2),
]
# Distinct id sets cycled through the timed calls: each call reads B*L rows
# (1 GiB at the main shape), far past any L2; rotating the sets also keeps a
# call from finding the previous call's ids and last rows in cache.
ID_SETS = 4
TIMING_BUDGET_S = 120
VALIDATION_BUDGET_S_PER_BACKEND = 50

TARGETS = {
    "copy": 0.80, "torch": 1.2, "unfused": 2.5, "fp16": 1.7, "cupy": 1.25, "narrow_wide": 0.60,
}


# --- set-up: paths, CUDA, the package without installing ------------------------------
# A kernel compiled and run in a child process: numba-cuda's set-up (driver, NVVM,
# libdevice) is probed before this process imports numba, so CUDA_HOME can still be set.
SMOKE_TEST = """
import numpy as np
if not hasattr(np, "row_stack"):  # the same NumPy 2.5 shim as fused_embedding.kernels
    np.row_stack = np.vstack
from numba import cuda
@cuda.jit
def add_one(x):
    i = cuda.grid(1)
    if i < x.size:
        x[i] += 1.0
x = cuda.to_device(np.zeros(64, np.float32))
add_one[1, 64](x)
assert (x.copy_to_host() == 1.0).all()
print("ok")
"""


def prepare_environment(simulate: bool) -> list[str]:
    """Environment switches that must precede the first numba import; returns notes."""
    notes = []
    if simulate:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    warnings.filterwarnings("ignore", message=".*Grid size.*")          # tiny validation grids
    warnings.filterwarnings("ignore", message=".*Host array used in CUDA kernel.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if simulate:
        return notes
    # numba-cuda finds NVVM/libdevice through cuda-pathfinder (pip "nvidia-*" wheels)
    # or CUDA_HOME. Only when its own search fails, point it at nvcc's toolkit.
    first = smoke_test()
    if first is None:
        return notes
    nvcc = shutil.which("nvcc")
    home = Path(os.path.realpath(nvcc)).parents[1] if nvcc else Path("/usr/local/cuda")
    if "CUDA_HOME" not in os.environ and (home / "nvvm").is_dir():
        os.environ["CUDA_HOME"] = str(home)
        second = smoke_test()
        if second is None:
            notes.append(f"numba-cuda's own search failed ({last_error(first)}); "
                         f"CUDA_HOME={home} (nvcc's toolkit) works and is used")
            return notes
        del os.environ["CUDA_HOME"]
    notes.append("numba-cuda cannot compile and run a kernel here: " + last_error(first)
                 + ". Hints: set CUDA_HOME to a CUDA toolkit holding nvvm/ (or pip install the nvidia-nvvm / "
                   "nvidia-cuda-nvcc wheels); on CUDA 13 numba-cuda needs cuda-bindings 13 "
                   "(pip install 'numba-cuda[cu13]'); CUDA 13 needs a GPU of compute capability >= 7.5.")
    return notes


def last_error(output: str) -> str:
    """The last line of a traceback that names an error, else its last line."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    named = [line for line in lines if "Error" in line or "error" in line]
    return (named or lines or ["no output"])[-1][:400]


def smoke_test() -> str | None:
    """None if a numba-cuda kernel compiles and runs in a child process, else its error output."""
    import subprocess
    try:
        run = subprocess.run([sys.executable, "-c", SMOKE_TEST], capture_output=True, text=True, timeout=120)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if run.returncode == 0 and "ok" in run.stdout else (run.stderr or run.stdout or "no output")


def import_package() -> list[str]:
    """Import fused_embedding from this checkout (installed or not); returns notes."""
    notes = []
    sys.path.insert(0, str(ROOT / "python"))
    if importlib.util.find_spec("ml_dtypes") is None:
        # The package names bfloat16 through ml_dtypes (TF and JAX bring it). Without
        # it, stand in a 2-byte dtype so the package imports; bfloat16 cases are skipped.
        shim = types.ModuleType("ml_dtypes")
        import numpy as np
        shim.bfloat16 = np.dtype([("bfloat16_bits", "<u2")])
        shim.FUSED_EMBEDDING_STAND_IN = True
        sys.modules["ml_dtypes"] = shim
        notes.append("ml_dtypes is missing: bfloat16 cases are skipped (pip install ml_dtypes to run them)")
    import fused_embedding
    try:
        importlib.import_module("fused_embedding.kernels")
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "fused_embedding.kernels", ROOT / "kernels" / "__init__.py",
            submodule_search_locations=[str(ROOT / "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["fused_embedding.kernels"] = module
        spec.loader.exec_module(module)
        fused_embedding.kernels = module
        notes.append("fused_embedding.kernels mapped to kernels/ (package not installed)")
    return notes


def bfloat16_available() -> bool:
    return not getattr(sys.modules.get("ml_dtypes"), "FUSED_EMBEDDING_STAND_IN", False)


def optional(name):
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # missing, or present but broken (a CUDA mismatch, say)
        return None, f"{type(exc).__name__}: {exc}"


# --- the report ----------------------------------------------------------------------------
class Report:
    def __init__(self):
        self.lines: list[str] = []
        self.data: dict = {"environment": {}, "notes": [], "validation": [], "timings": [], "targets": []}

    def say(self, line=""):
        print(line, flush=True)
        self.lines.append(line)

    def note(self, text):
        self.data["notes"].append(text)
        self.say(f"note: {text}")

    def case(self, backend, label, ok, detail=""):
        status = "PASS" if ok is True else ("SKIP" if ok is None else "FAIL")
        self.data["validation"].append(dict(backend=backend, case=label, status=status, detail=detail))
        self.say(f"{status}  {backend:<10} {label}" + (f"  -- {detail}" if detail else ""))

    def markdown(self) -> str:
        """Ready to paste into benchmarks/RESULTS.md: card and date, the timings, the targets, the full log."""
        env, summary = self.data["environment"], self.data.get("summary", {})
        lines = [f"### {env.get('device', '?')}, {env.get('date', '?')}", "",
                 f"numba-cuda {env.get('numba_cuda')}, CuPy {env.get('cupy')}, PyTorch {env.get('torch')}, "
                 f"CUDA driver {env.get('cuda_driver', '?')}. Validation: {summary.get('passed', 0)} passed, "
                 f"{summary.get('failed', 0)} failed, {summary.get('skipped', 0)} skipped.", ""]
        timed = [r for r in self.data["timings"] if "ms" in r]
        if timed:
            lines += ["| config | provider | ms | GB/s | % of copy |", "| --- | --- | --- | --- | --- |"]
            lines += [f"| {r['config']} | {r['provider']} | {r['ms']:.3f} | {r['gbs']:.0f} | {r['pct_copy']:.0f}% |"
                      for r in timed]
            lines.append("")
        for target in self.data["targets"]:
            value = "not measured" if target["value"] is None else f"{target['value']:.2f}"
            lines.append(f"- {target['target']}: {value} (goal {target['goal']}): {target['status']}")
        lines += ["", "<details><summary>full output</summary>", "", "```", *self.lines, "```", "", "</details>", ""]
        return "\n".join(lines)

    def write(self, folder: str):
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps(self.data, indent=2, default=str))
        (out / "gpu_check.md").write_text(self.markdown())
        print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")


def environment(report, simulate, notes):
    import numpy as np
    report.say("== environment")
    env = report.data["environment"]
    env["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env["python"] = platform.python_version()
    env["numpy"] = np.__version__
    env["mode"] = "simulate (NUMBA_ENABLE_CUDASIM=1)" if simulate else "gpu"
    for name in ("numba", "numba_cuda", "cupy", "torch", "cuda.bindings", "cuda.pathfinder", "ml_dtypes"):
        module, error = optional(name)
        version = getattr(module, "__version__", "present") if module is not None else f"missing ({error})"
        if name == "ml_dtypes" and not bfloat16_available():
            version = "missing"
        env[name] = version
    env["device"] = "CUDA simulator (CPU)"
    if not simulate:
        try:
            from numba import cuda
            device = cuda.get_current_device()
            name = device.name.decode() if isinstance(device.name, bytes) else device.name
            free, total = cuda.current_context().get_memory_info()
            env["device"] = f"{name}, compute capability {device.compute_capability[0]}.{device.compute_capability[1]}, " \
                            f"{total / 2**30:.0f} GiB ({free / 2**30:.0f} GiB free)"
            try:
                env["cuda_driver"] = ".".join(map(str, cuda.cudadrv.driver.driver.get_version()))
                env["cuda_runtime"] = ".".join(map(str, cuda.runtime.get_version()))
            except Exception as exc:
                env["cuda_versions"] = f"not read: {type(exc).__name__}: {exc}"
        except Exception as exc:
            env["device"] = f"numba-cuda cannot open the GPU: {type(exc).__name__}: {exc}"
            report.note("numba-cuda could not open the GPU. If the message names NVVM/libdevice, set CUDA_HOME "
                        "to the CUDA toolkit (the folder holding nvvm/) or pip install the nvidia-nvvm / "
                        "nvidia-cuda-nvcc wheels; on CUDA 13, numba-cuda needs cuda-bindings 13 "
                        "(pip install 'numba-cuda[cu13]') and a GPU of compute capability >= 7.5.")
        torch, _ = optional("torch")
        if torch is not None and torch.cuda.is_available() and "device" in env:
            env["torch_device"] = torch.cuda.get_device_name()
    for key, value in env.items():
        report.say(f"{key:>16}: {value}")
    for text in notes:
        report.note(text)


# --- validation ------------------------------------------------------------------------
def validation_cases(simulate):
    """The conformance matrix (fused_embedding.conformance) on this run's shapes: every 5th
    of the 24 dtype x id dtype x axis x mask combinations per shape, so five shapes
    cover every combination once."""
    from fused_embedding import conformance
    shapes = conformance.SIMULATOR_SHAPES[:5] if simulate else conformance.GPU_SHAPES
    return conformance.cases(shapes, keep_one_in=5)


def numpy_dtype(name):
    import numpy as np

    from fused_embedding.semantics import BFLOAT16
    return BFLOAT16 if name == "bfloat16" else np.dtype(name)


def check_result(result, table, ids, axis, mask_zero, dtype):
    import numpy as np

    from fused_embedding.reference import embedding_mean_reference
    from fused_embedding.validation import compare, tolerance, unwritten
    result = np.asarray(result)
    if result.dtype != dtype:
        return f"dtype {result.dtype}, expected {dtype}"
    if unwritten(result).any():
        return "output elements left unwritten (still poisoned)"
    return compare(result, embedding_mean_reference(table, ids, axis, mask_zero), **tolerance(dtype))


DIRECT_LAUNCH_CHECK = """
import sys
sys.path.insert(0, {benchmarks!r})
import gpu_check
gpu_check.import_package()
import numpy as np
import fused_embedding as fe
from fused_embedding.reference import embedding_mean_reference
from fused_embedding.validation import assert_close, random_inputs
table, ids = random_inputs(np.random.default_rng(), 500, 64, 40, 9, np.float32, np.int64)
for axis in (1, 2):
    assert_close(fe.embedding_mean(table, ids, axis=axis, backend="numba-cuda"),
                 embedding_mean_reference(table, ids, axis), np.float32)
print("ok")
"""


def check_direct_launch(report):
    """numba-cuda's direct launch (backends/numba_cuda.py), tried first in a child process:
    a launch given wrong arguments could leave this process's CUDA context unusable.
    If it fails, this run falls back to Numba's own launch and says so."""
    import subprocess

    from fused_embedding.backends import numba_cuda
    code = DIRECT_LAUNCH_CHECK.format(benchmarks=str(ROOT / "benchmarks"))
    try:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
        ok, detail = run.returncode == 0 and "ok" in run.stdout, last_error(run.stderr or run.stdout)
    except Exception as exc:
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    report.case("numba-cuda", "direct launch, in a child process (both axes)", ok,
                "" if ok else detail + "; this run uses Numba's own launch")
    if not ok:
        numba_cuda.DIRECT_LAUNCH = False


def run_validation(report, names, simulate):
    import numpy as np

    import fused_embedding as fe
    from fused_embedding import backends
    from fused_embedding.semantics import Axis, output_shape
    from fused_embedding.validation import random_inputs
    report.say("\n== validation (poisoned outputs, float64 reference, per-dtype tolerances)")
    rng = np.random.default_rng()
    for name in names:
        reason = backends.unavailable_reason(name)
        if reason is not None:
            report.case(name, "all cases", None, f"unavailable: {reason}")
            continue
        module = backends.get(name)
        if name == "numba-cuda" and not simulate:
            check_direct_launch(report)
        deadline = time.monotonic() + VALIDATION_BUDGET_S_PER_BACKEND
        for case in validation_cases(simulate):
            if time.monotonic() > deadline:
                report.case(name, "remaining cases", None, "validation time budget spent")
                break
            if case.table_dtype.name == "bfloat16" and not bfloat16_available():
                report.case(name, case.label, None, "ml_dtypes missing")
                continue
            try:
                table, ids = case.inputs(rng)
                out = case.poisoned_output()
                result = module.embedding_mean(table, ids, case.axis, case.mask_zero, out=out)
                problem = case.check(result, table, ids)
                report.case(name, case.label, problem is None, problem or "")
            except Exception as exc:
                report.case(name, case.label, False, f"{type(exc).__name__}: {exc}")
        # Edge cases through the public op.
        edge = [("B=0", (0, 5), 1), ("L=0", (3, 0), 1), ("L=0 axis=2", (3, 0), 2)]
        for label, ids_shape, axis in edge:
            try:
                table, _ = random_inputs(rng, 20, 8, 1, 1)
                ids = np.zeros(ids_shape, np.int64)
                result = to_host(fe.embedding_mean(table, ids, axis=axis, backend=name), table.dtype)
                shape = output_shape(Axis(axis), ids_shape[0], ids_shape[1], 8)
                ok = result.shape == shape and not np.any(result)
                report.case(name, label, ok, "" if ok else f"got shape {result.shape}: {result!r}")
            except Exception as exc:
                report.case(name, label, False, f"{type(exc).__name__}: {exc}")
        for bad_id in (-1, 50, 2**40):
            for axis in (1, 2):
                label = f"bounds: id {bad_id} axis={axis}"
                table, ids = random_inputs(rng, 50, 4, 6, 7, id_dtype=np.int64)
                ids[5, 0] = bad_id
                ids[4, 5] = bad_id
                expected = (f"id {bad_id} at ids[4, 5] is out of range for a table of 50 rows "
                            f"(expected 0 <= id < 50)")
                try:
                    fe.embedding_mean(table, ids, axis=axis, backend=name)
                    report.case(name, label, False, "no IndexError raised")
                except IndexError as exc:
                    report.case(name, label, str(exc) == expected, "" if str(exc) == expected else f"message: {exc}")
                except Exception as exc:
                    report.case(name, label, False, f"{type(exc).__name__}: {exc}")
        check_deferred_bounds(report, name, rng)
        check_bags(report, name, module, rng, simulate)
        if not simulate:
            run_device_validation(report, name, module, rng)


# (table dtype, D, B, weighted): CSR bags of random lengths (0 included) on host inputs.
BAG_CASES_SIMULATED = [("float32", 3, 5, False), ("float16", 16, 4, True), ("bfloat16", 33, 3, True)]
BAG_CASES = [("float32", 128, 300, False), ("float32", 128, 300, True), ("float16", 64, 257, True),
             ("bfloat16", 512, 65, False), ("float32", 1, 64, True)]


def random_bags(rng, vocab, dim, batch, dtype, weighted, mean_length=6):
    import numpy as np
    table = rng.standard_normal((vocab, dim), dtype=np.float32).astype(dtype)
    lengths = rng.geometric(1 / mean_length, size=batch) - 1  # 0 included
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = rng.integers(0, vocab, size=int(offsets[-1]))
    from fused_embedding.validation import exact_weights  # exact denominators: see its docstring
    weights = exact_weights(rng, values.shape[0]) if weighted else None
    return table, values, offsets, weights


def check_bags(report, name, module, rng, simulate):
    """embedding_bag's CSR kernel: every combiner on poisoned outputs against the float64
    reference, then a bad id named by its position and bag."""
    from fused_embedding.spec import Pooling
    from fused_embedding.validation import compare_bags, poisoned
    for dtype_name, dim, batch, weighted in BAG_CASES_SIMULATED if simulate else BAG_CASES:
        if dtype_name == "bfloat16" and not bfloat16_available():
            continue
        for pooling in Pooling:
            label = f"bags {dtype_name} D={dim} B={batch} {pooling.value}{' weighted' if weighted else ''}"
            try:
                dtype = numpy_dtype(dtype_name)
                table, values, offsets, weights = random_bags(rng, 1000, dim, batch, dtype, weighted)
                out = poisoned((batch, dim), dtype)
                module.embedding_bag(table, values, offsets, weights, pooling, out=out)
                problem = compare_bags(out, table, values, offsets, weights, pooling.value)
                report.case(name, label, problem is None, problem or "")
            except Exception as exc:
                report.case(name, label, False, f"{type(exc).__name__}: {exc}")
    label = "bags: bad id named with its position and bag"
    try:
        table, values, offsets, _ = random_bags(rng, 50, 8, 6, numpy_dtype("float32"), False, mean_length=3)
        values = values.copy()
        if values.size:
            values[-1] = 50
        module.embedding_bag(table, values, offsets, None, Pooling.MEAN)
        report.case(name, label, not values.size, "no IndexError raised")
    except IndexError as exc:
        ok = str(exc).startswith(f"id 50 at values[{values.size - 1}] (bag ")
        report.case(name, label, ok, "" if ok else f"message: {exc}")
    except Exception as exc:
        report.case(name, label, False, f"{type(exc).__name__}: {exc}")


def check_deferred_bounds(report, name, rng):
    """bounds_check="deferred": the bad call returns; synchronize() raises its bad id, once;
    a good deferred call's result matches the reference."""
    import numpy as np

    import fused_embedding as fe
    from fused_embedding.validation import random_inputs
    label = "bounds: deferred, raised at synchronize()"
    table, ids = random_inputs(rng, 50, 4, 6, 7, id_dtype=np.int64)
    ids[4, 5] = 50
    try:
        fe.embedding_mean(table, ids, backend=name, bounds_check="deferred")
        try:
            fe.synchronize()
            report.case(name, label, False, "synchronize() raised nothing")
        except IndexError as exc:
            ok = str(exc).startswith("id 50 at ids[4, 5] is out of range for a table of 50 rows")
            fe.synchronize()  # read once: nothing left to raise
            report.case(name, label, ok, "" if ok else f"message: {exc}")
    except Exception as exc:
        report.case(name, label, False, f"{type(exc).__name__}: {exc}")
    label = "deferred: good call matches the reference"
    try:
        table, ids = random_inputs(rng, 300, 128, 9, 7)
        result = fe.embedding_mean(table, ids, backend=name, bounds_check="deferred")
        fe.synchronize()
        problem = check_result(result, table, ids, 1, False, np.float32)
        report.case(name, label, problem is None, problem or "")
    except Exception as exc:
        report.case(name, label, False, f"{type(exc).__name__}: {exc}")


def to_host(array, dtype):
    """A backend's GPU result on the host as ``dtype`` (bfloat16 from its bits): the bench's own transfer."""
    from fused_embedding.providers import to_numpy
    return to_numpy(array, dtype)


def run_device_validation(report, name, module, rng):
    """Device inputs: device table + device ids, device table + host ids, an unaligned table."""
    import numpy as np

    from fused_embedding import backends
    from fused_embedding.semantics import Axis
    from fused_embedding.validation import poisoned, random_inputs
    # Device arrays from the backend's own framework, so one broken framework fails only its backend.
    if name == "numba-cuda" or backends.unavailable_reason("cupy") is not None:
        from numba import cuda
        to_device = cuda.to_device
    else:
        import cupy
        to_device = cupy.asarray
    for label, dtype_name, offset, host_ids in [
            ("device table+ids fp32 D=128", "float32", 0, False),
            ("device table, host ids fp16 D=64", "float16", 0, True),
            ("device table offset by 1 element (no wide loads) fp32 D=64", "float32", 1, False),
            ("device table offset by 2 elements fp16 D=128", "float16", 2, False)]:
        for axis in (1, 2):
            try:
                dtype = numpy_dtype(dtype_name)
                dim = 128 if "D=128" in label else 64
                table, ids = random_inputs(rng, 3000, dim, 300, 20, dtype, np.int64)
                flat = to_device(np.concatenate([np.zeros(offset, dtype), table.ravel()]))
                d_table = flat[offset:].reshape(table.shape) if offset else flat.reshape(table.shape)
                d_ids = ids if host_ids else to_device(ids)
                out_shape = (300, dim) if axis == 1 else (300, 20)
                d_out = to_device(poisoned(out_shape, dtype))
                module.embedding_mean(d_table, d_ids, Axis(axis), False, out=d_out)
                result = to_host(d_out, dtype)
                problem = check_result(result, table, ids, axis, False, dtype)
                report.case(name, f"{label} axis={axis}", problem is None, problem or "")
            except Exception as exc:
                report.case(name, f"{label} axis={axis}", False, f"{type(exc).__name__}: {exc}")


# --- timing ----------------------------------------------------------------------------
def run_timings(report, deadline):
    """Times every provider on every TIMED_CONFIGS entry; returns the copy bandwidth (GB/s)."""
    cuda, _ = optional("numba.cuda")
    report.say("\n== timings (CUDA events, median; GB/s = bytes_model.fused_bytes / time)")
    torch, torch_error = optional("torch")
    cupy, cupy_error = optional("cupy")
    if torch is not None and not torch.cuda.is_available():
        torch, torch_error = None, "this torch build sees no CUDA GPU"
    if torch is None:
        report.note(f"torch missing ({torch_error}): torch baselines and bfloat16 tables skipped")
    if cupy is None:
        report.note(f"cupy missing ({cupy_error}): CuPy baselines skipped")
    from fused_embedding.gpu_timing import EventTimer
    timer = EventTimer(torch, cupy)
    if timer.name is None:
        report.note("no framework here can record CUDA events (numba-cuda, CuPy, PyTorch): timings skipped")
        return float("nan")
    report.say(f"events and copy from {timer.name}")
    copy_gbs = measure_copy(report, timer, torch, cupy)
    header = f"{'config':<18} {'provider':<34} {'ms':>8} {'GB/s':>7} {'% copy':>7} {'calls':>5}"
    report.say(header)
    report.say("-" * len(header))
    try:
        time_bags(report, timer, copy_gbs, torch)
    except Exception as exc:
        report.note(f"bags: stopped: {type(exc).__name__}: {exc}")
    free_memory(torch, cupy)
    for config in TIMED_CONFIGS:
        if time.monotonic() > deadline:
            report.note(f"timing budget spent: {config[0]} and later configs skipped")
            break
        if config[1] == "bfloat16" and (torch is None or not bfloat16_available()):
            report.note(f"{config[0]}: skipped (bfloat16 tables are made with torch and named with ml_dtypes)")
            continue
        try:
            time_config(report, timer, config, copy_gbs, torch, cupy, cuda, deadline)
            if config == TIMED_CONFIGS[0]:
                call_breakdown(report, torch, cupy, cuda, config)
        except Exception as exc:
            report.note(f"{config[0]}: stopped: {type(exc).__name__}: {exc}")
        free_memory(torch, cupy)
    return copy_gbs


BAG_BATCH, BAG_MEAN_LENGTH, BAG_DIM = 65536, 32, 128


def time_bags(report, timer, copy_gbs, torch):
    """CSR bags at B=65536, geometric lengths of mean 32, D=128 float32, V_TIMED rows: each
    backend's embedding_bag (mean, and sum with per-id weights) against torch's
    embedding_bag with offsets (mode="mean"; mode="sum" with per_sample_weights)."""
    import numpy as np

    from fused_embedding import backends, bytes_model
    from fused_embedding.spec import Pooling
    if torch is None:
        report.note("bags: torch missing: no device table to time on")
        return
    rng = np.random.default_rng()
    lengths = rng.geometric(1 / BAG_MEAN_LENGTH, size=BAG_BATCH)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    weight = torch.randn(V_TIMED, BAG_DIM, device="cuda")
    values = [torch.randint(0, V_TIMED, (n,), device="cuda") for _ in range(ID_SETS)]
    t_offsets = torch.from_numpy(offsets).cuda()
    per_sample = torch.rand(n, device="cuda")
    from fused_embedding.gpu_timing import DeviceTable
    table = DeviceTable.of_torch(weight, np.float32)
    d_values = [DeviceTable.of_torch(v, np.int64) for v in values]
    d_offsets = DeviceTable.of_torch(t_offsets, np.int64)
    d_weights = DeviceTable.of_torch(per_sample, np.float32)
    label = f"bags B={BAG_BATCH} mean L={BAG_MEAN_LENGTH}"

    def record(provider, fn, weighted=False):
        ms, calls = timer.measure(fn)
        nbytes = bytes_model.bag_bytes(n, BAG_BATCH, BAG_DIM, np.float32, np.int64, weighted)
        gbs = bytes_model.gb_per_s(nbytes, ms / 1e3)
        report.data["timings"].append(dict(config=label, provider=provider, ms=ms, calls=calls, gbs=gbs,
                                           pct_copy=100.0 * gbs / copy_gbs))
        report.say(f"{label:<18} {provider:<34} {ms:8.3f} {gbs:7.0f} {100.0 * gbs / copy_gbs:6.0f}% {calls:5d}")

    for name in ("numba-cuda", "cupy"):
        if backends.unavailable_reason(name) is not None:
            continue
        module = backends.get(name)
        record(f"{name} bags mean", lambda i: module.embedding_bag(table, d_values[i % ID_SETS], d_offsets,
                                                                    None, Pooling.MEAN))
        record(f"{name} bags sum weighted", lambda i: module.embedding_bag(
            table, d_values[i % ID_SETS], d_offsets, d_weights, Pooling.SUM), weighted=True)
    functional = torch.nn.functional
    record("torch embedding_bag(offsets, mean)",
           lambda i: functional.embedding_bag(values[i % ID_SETS], weight, t_offsets[:-1], mode="mean"))
    record("torch embedding_bag(offsets, sum, w)",
           lambda i: functional.embedding_bag(values[i % ID_SETS], weight, t_offsets[:-1], mode="sum",
                                              per_sample_weights=per_sample), weighted=True)


def call_breakdown(report, torch, cupy, cuda, config, calls=50):
    """Where a whole call's time goes, per backend: host clock around each step, device
    synchronised before and after (so it is latency, not throughput)."""
    import numpy as np

    from fused_embedding import backends
    label, dtype_name, dim, batch, length, axis = config
    setup = make_timed_inputs(torch, cupy, cuda, dtype_name, dim, batch, length)
    table, id_sets = setup["table"], setup["ids"]
    report.say(f"\n== whole-call breakdown, {label} (host ms per step, median of {calls}; device idle at each start)")
    for label_name, name, by_dispatcher in (("numba-cuda", "numba-cuda", False),
                                            ("numba-cuda, Numba's own launch", "numba-cuda", True),
                                            ("cupy", "cupy", False)):
        if backends.unavailable_reason(name) is not None:
            continue
        with numba_launch_by_dispatcher(by_dispatcher):
            steps = call_steps(name, table, id_sets, axis, cuda, calls)
        report.say(f"  {label_name:<31} " + "  ".join(f"{key} {np.median(v):.3f}" for key, v in steps.items()))
        report.data.setdefault("breakdown", []).append(
            dict(config=label, backend=label_name, **{key: float(np.median(v)) for key, v in steps.items()}))
    profile_host_time(report, table, id_sets, axis)


def call_steps(name, table, id_sets, axis, cuda, calls):
    """Host ms of each step of ``calls`` whole calls of backend ``name``: {step: [ms, ...]}."""
    from fused_embedding import api, backends
    from fused_embedding.semantics import Axis
    module = backends.get(name)
    steps = {"core checks": [], "prepare": [], "launch": [], "kernel (sync)": [], "finish": []}
    for i in range(calls):
        ids = id_sets[i % ID_SETS]
        cuda.synchronize()
        t0 = time.perf_counter()
        api._check_inputs(table, ids, False)
        api.choose_backend(name, api.device_of(table), api.device_of(ids))
        t1 = time.perf_counter()
        call = module.prepare(table, ids, Axis(axis), False)
        t2 = time.perf_counter()
        call.launch()
        t3 = time.perf_counter()
        cuda.synchronize()
        t4 = time.perf_counter()
        call.finish()
        t5 = time.perf_counter()
        for key, value in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            steps[key].append(value * 1e3)
    return steps


@contextlib.contextmanager
def numba_launch_by_dispatcher(enabled=True):
    """Inside, numba-cuda kernels are launched by Numba's dispatcher (what the direct
    launch is compared with); yields False when that was already so (the direct launch
    failed its check), else ``enabled``."""
    from fused_embedding.backends import numba_cuda
    before = numba_cuda.DIRECT_LAUNCH
    if enabled:
        numba_cuda.DIRECT_LAUNCH = False
    try:
        yield enabled and before
    finally:
        numba_cuda.DIRECT_LAUNCH = before


def profile_host_time(report, table, id_sets, axis, calls=200, top=14):
    """Where the numba-cuda call's host time goes: cProfile over ``calls`` whole calls,
    the functions with the most time of their own."""
    import cProfile
    import pstats

    import fused_embedding as fe
    profile = cProfile.Profile()
    profile.enable()
    for i in range(calls):
        fe.embedding_mean(table, id_sets[i % ID_SETS], axis=axis, backend="numba-cuda")
    profile.disable()
    stats = pstats.Stats(profile).stats
    rows = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    report.say(f"\n== numba-cuda whole call, host time by function (cProfile, {calls} calls; "
               f"us per call, own time / with callees)")
    for (filename, line, function), (_, ncalls, own, cumulative, _) in rows:
        where = f"{Path(filename).name}:{line}" if line else filename
        report.say(f"  {1e6 * own / calls:7.1f} {1e6 * cumulative / calls:8.1f}  {ncalls / calls:5.1f}x  "
                   f"{function} ({where})")


def measure_copy(report, timer, torch, cupy):
    """Bandwidth (GB/s, read + write) of a 1 GiB device-to-device copy: the roof for every number."""
    from fused_embedding.gpu_timing import device_copy
    try:
        copy = device_copy(timer, torch, cupy)
    except Exception as exc:
        report.note(f"copy bandwidth not measured: {type(exc).__name__}: {exc}")
        return float("nan")
    ms, calls, copy_gbs = copy["ms"], copy["calls"], copy["gb_per_s"]
    report.data["timings"].append(dict(config="copy 1 GiB", provider="device-to-device copy", ms=ms, calls=calls,
                                       gbs=copy_gbs, pct_copy=100.0))
    report.say(f"{copy['what']}: {ms:.3f} ms, {copy_gbs:.0f} GB/s (read + write)")
    return copy_gbs


def time_config(report, timer, config, copy_gbs, torch, cupy, cuda, deadline):
    import numpy as np

    import fused_embedding as fe
    from fused_embedding import backends, bytes_model
    from fused_embedding.semantics import Axis
    label, dtype_name, dim, batch, length, axis = config
    setup = make_timed_inputs(torch, cupy, cuda, dtype_name, dim, batch, length)
    nbytes = bytes_model.fused_bytes(batch, length, dim, numpy_dtype(dtype_name), np.int64, Axis(axis))
    rows = report.data["timings"]

    def record(provider, fn):
        try:
            ms, calls = timer.measure(fn)
            gbs = bytes_model.gb_per_s(nbytes, ms / 1e3)
            pct = 100.0 * gbs / copy_gbs
            rows.append(dict(config=label, provider=provider, ms=ms, calls=calls, gbs=gbs, pct_copy=pct))
            report.say(f"{label:<18} {provider:<34} {ms:8.3f} {gbs:7.0f} {pct:6.0f}% {calls:5d}")
        except Exception as exc:
            rows.append(dict(config=label, provider=provider, error=f"{type(exc).__name__}: {exc}"))
            report.say(f"{label:<18} {provider:<34} FAILED: {type(exc).__name__}: {str(exc)[:200]}")

    table, id_sets = setup["table"], setup["ids"]
    for name in ("numba-cuda", "cupy"):
        if time.monotonic() > deadline:
            break
        reason = backends.unavailable_reason(name)
        if reason is not None:
            report.say(f"{label:<18} {name:<34} unavailable: {reason[:80]}")
            continue
        module = backends.get(name)
        try:
            calls = [module.prepare(table, ids, Axis(axis), False) for ids in id_sets]
            record(f"{name} kernel", lambda i: calls[i % ID_SETS].launch())
            result = calls[0].finish()
            for call in calls[1:]:  # no bad ids: the flags read back clean
                call.finish()
            check_full_size(report, name, label, setup, result, axis)
        except Exception as exc:
            report.say(f"{label:<18} {name + ' kernel':<34} FAILED: {type(exc).__name__}: {exc}")
        record(f"{name} op (embedding_mean)",
               lambda i: fe.embedding_mean(table, id_sets[i % ID_SETS], axis=axis, backend=name))
        record(f"{name} op, deferred bounds check",
               lambda i: fe.embedding_mean(table, id_sets[i % ID_SETS], axis=axis, backend=name,
                                           bounds_check="deferred"))
        try:
            fe.synchronize()  # the timed ids are all in range: nothing to raise
        except IndexError as exc:
            report.say(f"{label:<18} {name + ' op, deferred':<34} FAILED: {exc}")
        if name == "numba-cuda" and config == MAIN:
            with numba_launch_by_dispatcher() as changed:
                if changed:
                    record("numba-cuda op, Numba's own launch",
                           lambda i: fe.embedding_mean(table, id_sets[i % ID_SETS], axis=axis, backend=name))
    if torch is not None:
        weight, torch_ids = setup["torch_table"], setup["torch_ids"]
        functional = torch.nn.functional
        if axis == 1:
            record("torch embedding_bag(mean)",
                   lambda i: functional.embedding_bag(torch_ids[i % ID_SETS], weight, mode="mean"))
            record("torch unfused embedding().mean(1)",
                   lambda i: functional.embedding(torch_ids[i % ID_SETS], weight).mean(1))
        else:
            record("torch unfused embedding().mean(2)",
                   lambda i: functional.embedding(torch_ids[i % ID_SETS], weight).mean(2))
    if cupy is not None and setup.get("cupy_table") is not None:
        cupy_table, cupy_ids = setup["cupy_table"], setup["cupy_ids"]
        record(f"cupy unfused table[ids].mean({axis})",
               lambda i: cupy_table[cupy_ids[i % ID_SETS]].mean(axis=axis))


CHECKED_BAGS = 64


def check_full_size(report, name, label, setup, result, axis):
    """The timed kernel's first CHECKED_BAGS bags against the float64 reference (rows fetched by torch/CuPy)."""
    import numpy as np

    from fused_embedding.reference import embedding_mean_reference
    from fused_embedding.validation import compare, tolerance
    case = f"full size {label}: first {CHECKED_BAGS} bags of the timed call"
    try:
        dtype = np.dtype(setup["table"].dtype)
        if "torch_table" in setup:
            import torch
            ids = setup["torch_ids"][0][:CHECKED_BAGS]
            rows = setup["torch_table"][ids.reshape(-1)].cpu()  # [bags * L][D], gathered on the GPU
            # torch -> NumPy through 16-bit ints: NumPy has no bfloat16 of its own.
            host_rows = rows.view(torch.int16).numpy().view(dtype) if dtype.itemsize == 2 else rows.numpy()
            host_ids = ids.cpu().numpy()
        elif setup.get("cupy_table") is not None:
            host_ids = setup["cupy_ids"][0][:CHECKED_BAGS].get()
            host_rows = setup["cupy_table"][setup["cupy_ids"][0][:CHECKED_BAGS].reshape(-1)].get()
        else:
            report.case(name, case, None, "needs torch or CuPy to fetch rows")
            return
        bags, length = host_ids.shape
        # The fetched rows as a small table, indexed by position: same values, same means.
        local_ids = np.arange(bags * length).reshape(bags, length)
        expected = embedding_mean_reference(host_rows, local_ids, axis)
        actual = to_host(result, dtype)[:CHECKED_BAGS]
        problem = compare(actual, expected, **tolerance(dtype))
        report.case(name, case, problem is None, problem or "")
    except Exception as exc:
        report.case(name, case, False, f"{type(exc).__name__}: {exc}")


def make_timed_inputs(torch, cupy, cuda, dtype_name, dim, batch, length):
    """A (V_TIMED, D) table on the GPU and ID_SETS (B, L) int64 id sets, as every provider takes them."""
    import numpy as np

    from fused_embedding.gpu_timing import DeviceTable
    dtype = numpy_dtype(dtype_name)
    setup = {}
    if torch is not None:
        torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype_name]
        weight = torch.randn(V_TIMED, dim, device="cuda", dtype=torch_dtype)
        ids = [torch.randint(0, V_TIMED, (batch, length), device="cuda", dtype=torch.int64)
               for _ in range(ID_SETS)]
        torch.cuda.synchronize()
        setup.update(torch_table=weight, torch_ids=ids,
                     table=DeviceTable.of_torch(weight, dtype),
                     ids=[DeviceTable.of_torch(i, np.int64) for i in ids])
        if cupy is not None and dtype_name != "bfloat16":
            setup.update(cupy_table=cupy.asarray(setup["table"]),
                         cupy_ids=[cupy.asarray(i) for i in setup["ids"]])
    elif cupy is not None:
        if dtype_name == "bfloat16":
            raise RuntimeError("bfloat16 tables need torch here")
        rng = cupy.random.default_rng()
        table = rng.standard_normal((V_TIMED, dim), dtype=cupy.float32).astype(dtype)
        ids = [rng.integers(0, V_TIMED, (batch, length), dtype=cupy.int64) for _ in range(ID_SETS)]
        setup.update(table=table, ids=ids, cupy_table=table, cupy_ids=ids)
    else:
        rng = np.random.default_rng()
        table = cuda.to_device(rng.standard_normal((V_TIMED, dim), dtype=np.float32).astype(dtype))
        ids = [cuda.to_device(rng.integers(0, V_TIMED, (batch, length))) for _ in range(ID_SETS)]
        setup.update(table=table, ids=ids)
    return setup


def free_memory(torch, cupy):
    import gc
    gc.collect()
    if torch is not None:
        torch.cuda.empty_cache()
    if cupy is not None:
        cupy.get_default_memory_pool().free_all_blocks()


# --- targets ---------------------------------------------------------------------------
def evaluate_targets(report, copy_gbs):
    rows = [r for r in report.data["timings"] if "ms" in r]

    def ms(config, provider):
        for r in rows:
            if r["config"] == config and r["provider"] == provider:
                return r["ms"]
        return None

    def pct(config, provider):
        for r in rows:
            if r["config"] == config and r["provider"] == provider:
                return r["pct_copy"] / 100.0
        return None

    main = MAIN[0]
    ours = "numba-cuda kernel"
    ours_op = "numba-cuda op (embedding_mean)"
    ours_deferred = "numba-cuda op, deferred bounds check"
    checks = []

    def check(what, value, goal, higher_is_better=True, unit="x"):
        if value is None:
            checks.append(dict(target=what, value=None, goal=goal, status="not measured"))
            report.say(f"  {what}: not measured")
            return
        met = value >= goal if higher_is_better else value <= goal
        checks.append(dict(target=what, value=value, goal=goal, status="met" if met else "not met"))
        shown = f"{100 * value:.0f}%" if unit == "%" else f"{value:.2f}x"
        aim = f"{100 * goal:.0f}%" if unit == "%" else f"{goal}x"
        report.say(f"  {what}: {shown} (target {'>=' if higher_is_better else '<='} {aim}): "
                   f"{'met' if met else 'NOT met'}")

    def ratio(a, b):
        return a / b if a is not None and b is not None else None

    report.say(f"\n== targets ({main}, V={V_TIMED:,}; kernel = the launch alone, op = the whole call)")
    for provider in (ours, ours_op, ours_deferred):
        check(f"{provider} at >= 80% of copy bandwidth", pct(main, provider), TARGETS["copy"], unit="%")
        check(f"{provider} vs torch embedding_bag", ratio(ms(main, "torch embedding_bag(mean)"), ms(main, provider)),
              TARGETS["torch"])
        check(f"{provider} vs torch unfused", ratio(ms(main, "torch unfused embedding().mean(1)"), ms(main, provider)),
              TARGETS["unfused"])
        check(f"{provider} vs cupy unfused", ratio(ms(main, "cupy unfused table[ids].mean(1)"), ms(main, provider)),
              TARGETS["unfused"])
    check("float16 table faster than float32 (numba-cuda kernel)", ratio(ms(main, ours), ms("fp16 D=128", ours)),
          TARGETS["fp16"])
    check("cupy kernel time / numba-cuda kernel time", ratio(ms(main, "cupy kernel"), ms(main, ours)),
          TARGETS["cupy"], higher_is_better=False)
    for config in ("fp32 D=16", "fp32 D=512"):
        check(f"{config}: numba-cuda kernel at >= 60% of copy bandwidth", pct(config, ours),
              TARGETS["narrow_wide"], unit="%")
    report.data["targets"] = checks


# --- main ------------------------------------------------------------------------------
def report_kernel_resources(report):
    """Registers, local memory (spills land there) and shared memory of every Numba kernel
    this run compiled, as the driver reports them."""
    from fused_embedding.kernels import cuda as kernels
    report.say("\n== Numba kernels compiled in this run (driver's figures)")
    for name, dispatcher in kernels.BUILT_KERNELS:
        for signature, kernel in dispatcher.overloads.items():
            report.say(f"{name}: {kernel.regs_per_thread} registers/thread, {kernel.local_mem_per_thread} B "
                       f"local/thread, {kernel.shared_mem_per_block} B shared/block "
                       f"({', '.join(str(t) for t in signature)})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--simulate", action="store_true",
                        help="run under the CUDA simulator (set automatically when there is no nvidia-smi)")
    args = parser.parse_args(argv)
    simulate = (args.simulate or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
                or shutil.which("nvidia-smi") is None)
    started = time.monotonic()
    notes = prepare_environment(simulate)
    report = Report()
    try:
        notes += import_package()
    except Exception:
        report.say("FAIL  cannot import fused_embedding from this checkout:\n" + traceback.format_exc())
        finish(report)
        return 1
    environment(report, simulate, notes)

    names = ["numba-cuda"] if simulate else ["numba-cuda", "cupy"]
    try:
        run_validation(report, names, simulate)
    except Exception:
        report.say("FAIL  validation stopped:\n" + traceback.format_exc())
        report.data["validation"].append(dict(backend="-", case="validation", status="FAIL",
                                              detail=traceback.format_exc()))

    if simulate:
        report.say("\n== timings skipped: the CUDA simulator runs kernels on the CPU and has no timing")
    else:
        try:
            copy_gbs = run_timings(report, time.monotonic() + TIMING_BUDGET_S)
            evaluate_targets(report, copy_gbs)
        except Exception:
            report.say("FAIL  timings stopped:\n" + traceback.format_exc())
        try:
            report_kernel_resources(report)
        except Exception as exc:
            report.note(f"kernel resources not read: {type(exc).__name__}: {exc}")

    statuses = [c["status"] for c in report.data["validation"]]
    passed, failed, skipped = statuses.count("PASS"), statuses.count("FAIL"), statuses.count("SKIP")
    report.data["summary"] = dict(passed=passed, failed=failed, skipped=skipped,
                                  seconds=round(time.monotonic() - started, 1))
    report.say(f"\n== summary: {passed} passed, {failed} failed, {skipped} skipped in "
               f"{time.monotonic() - started:.0f} s")
    finish(report)
    return 1 if failed or not passed else 0


def finish(report):
    if os.environ.get("OUT"):
        try:
            report.write(os.environ["OUT"])
        except Exception as exc:
            print(f"could not write to OUT={os.environ['OUT']}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
