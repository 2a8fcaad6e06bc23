"""Write the pytest-benchmark CPU results into benchmarks/RESULTS.md, ratios and all.

    pytest benchmarks/bench_cpu.py --benchmark-only --benchmark-json=bench.json
    python benchmarks/pytest_results_md.py bench.json --results-md benchmarks/RESULTS.md

pytest-benchmark times each provider in a block of consecutive calls (the command
``fused-embedding bench`` interleaves them call by call instead); both take the next
of several fresh id sets every call. This script rewrites only the text between the
file's ``CPU PYTEST-BENCHMARK`` markers, from the JSON alone: machine, date, medians,
GB/s at the median (the bytes model, from each benchmark's extra_info), and each
provider's speedup over the unfused TF path and its time over the fused op's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fused_embedding.bytes_model import copy_bytes, gb_per_s
from fused_embedding.cli import update_results_md
from fused_embedding.providers import COPY_BYTES

SECTION = "cpu pytest-benchmark"
GENERATOR = "python benchmarks/pytest_results_md.py"
BASELINE, FUSED = "tf-unfused", "fused[cpu]"
BASELINE_GROUPS = ("copy baseline", "read baseline")  # bandwidth references, not cases


def provider_of(bench: dict) -> str:
    """'test_provider[B1024-...-axis1-fused[cpu]]' -> 'fused[cpu]' (the case id is the group)."""
    inner = bench["name"][len("test_provider["):-1]
    return inner[len(bench["group"]) + 1:]


def markdown(report: dict) -> str:
    machine = report["machine_info"]
    cpu = machine.get("cpu", {})
    baselines = {b["group"]: b for b in report["benchmarks"] if b["group"] in BASELINE_GROUPS}
    copy, read = baselines.get("copy baseline"), baselines.get("read baseline")
    lines = [f"Machine: {cpu.get('brand_raw', machine.get('processor', '?'))}, {cpu.get('count', '?')} cores. "
             f"Date: {report['datetime']}. pytest-benchmark {report['version']}, "
             f"`pytest benchmarks/bench_cpu.py --benchmark-only --benchmark-json=...`.  "]
    if copy is not None:
        bandwidth = gb_per_s(copy_bytes(COPY_BYTES), copy["stats"]["median"])
        lines.append(f"Copy bandwidth: {bandwidth:.1f} GB/s (np.copyto of {COPY_BYTES >> 20} MiB, "
                     f"median of {copy['stats']['rounds']}).  ")
    if read is not None:
        bandwidth = gb_per_s(read["extra_info"]["bytes"], read["stats"]["median"])
        lines.append(f"Read bandwidth: {bandwidth:.1f} GB/s (a parallel sum of {COPY_BYTES >> 20} MiB on every "
                     f"thread, median of {read['stats']['rounds']}): how fast memory that is only read streams.  ")
    lines.append("Each provider timed in its own block of calls; median (IQR) ms; "
                 f"x {BASELINE} = its median over the provider's; / {FUSED} = the provider's over {FUSED}'s.")
    groups: dict[str, list] = {}
    for bench in report["benchmarks"]:
        if bench["group"] not in BASELINE_GROUPS:
            groups.setdefault(bench["group"], []).append(bench)
    for group, benches in groups.items():
        medians = {provider_of(b): b["stats"]["median"] for b in benches}
        lines += ["", f"**{group}**", "", f"| provider | median ms | IQR ms | GB/s | x {BASELINE} | / {FUSED} |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for bench in sorted(benches, key=lambda b: b["stats"]["median"]):
            name, stats = provider_of(bench), bench["stats"]
            speedup = f"{medians[BASELINE] / stats['median']:.2f}" if BASELINE in medians else "-"
            over_fused = f"{stats['median'] / medians[FUSED]:.2f}" if FUSED in medians else "-"
            gbs = bench.get("extra_info", {}).get("gb_per_s")
            lines.append(f"| {name} | {stats['median'] * 1e3:.3f} | {stats['iqr'] * 1e3:.3f} | "
                         f"{'-' if gbs is None else f'{gbs:.1f}'} | {speedup} | {over_fused} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="the file pytest-benchmark wrote (--benchmark-json)")
    parser.add_argument("--results-md", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args(argv)
    try:
        report = json.loads(args.json.read_text())
    except (OSError, ValueError) as exc:
        print(f"cannot read {args.json}: {exc}", file=sys.stderr)
        return 2
    block = markdown(report)
    text = args.results_md.read_text() if args.results_md.exists() else None
    args.results_md.write_text(update_results_md(text, SECTION, block, generator=GENERATOR))
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
