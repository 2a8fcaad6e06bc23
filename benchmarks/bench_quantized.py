"""Quantized tables on the CPU: int8 and int4 row-wise against float32, and against torch.

    python benchmarks/bench_quantized.py [--rounds 21] [--vocab 1000000]

One process, one float32 table (V, D), its int8 and int4 quantisations
(``fused_embedding.quantize_table``), and torch's packed forms of the same rows
(``embedding_bag_byte_prepack``'s layout built from our int8 data and parameters:
D bytes then float32 scale and bias; the 4-bit layout from our int4 data, its scale and
bias rounded to float16 as torch's 4-bit format stores them). Every round calls every
provider once, in an order rotated each round, each call on the next of several fresh
id sets (uniform over V) so the rows come from DRAM; the medians of the rounds are
reported, with the ratios taken from them.

Bytes model (axis 1, per call): B*L*id_bytes + B*L*bytes_per_row(D) + B*D*4 (the
output), with bytes_per_row = 4 D (float32), D + 8 (int8: data + scale + bias), D/2 + 8
(int4). Every provider's output is checked against the float64 dequantize-then-pool
reference before timing.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time

import numpy as np

import fused_embedding as fe
from fused_embedding.memory import empty_aligned
from fused_embedding.reference import embedding_bag_reference, embedding_mean_reference
from fused_embedding.spec import TableFormat


def torch_providers(qtables, offsets_np):
    """torch's quantized CPU ops on the same rows, or {} (with the reason printed) without torch."""
    try:
        import torch
    except ImportError as exc:
        print(f"torch: missing ({exc}); its baselines are not measured")
        return {}
    int8, int4 = qtables["int8"], qtables["int4"]
    vocab, dim = int8.shape
    packed8 = np.empty((vocab, dim + 8), dtype=np.uint8)             # [V][D + 8]
    packed8[:, :dim] = int8.data
    packed8[:, dim:] = int8.params.view(np.uint8)                    # scale, bias as float32 bytes
    packed4 = np.empty((vocab, dim // 2 + 4), dtype=np.uint8)        # [V][D/2 + 4]
    packed4[:, :dim // 2] = int4.data
    packed4[:, dim // 2:] = int4.params.astype(np.float16).view(np.uint8)
    weight8, weight4 = torch.from_numpy(packed8), torch.from_numpy(packed4)
    offsets = torch.from_numpy(offsets_np)
    byte_op = torch.ops.quantized.embedding_bag_byte_rowwise_offsets
    four_op = torch.ops.quantized.embedding_bag_4bit_rowwise_offsets

    def call(op, weight, mode):
        def run(ids):
            return op(weight, torch.from_numpy(ids.reshape(-1)), offsets, mode=mode,
                      include_last_offset=True).numpy()
        return run

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    # Sum only: these ops return the sums whatever ``mode`` says (torch 2.13: mode=1 gave the
    # same output as mode=0), so they are compared with the fused sum.
    return {"torch-int8[sum]": call(byte_op, weight8, 0), "torch-int4[sum]": call(four_op, weight4, 0)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--id-sets", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    batch, length, dim, vocab = args.batch, args.length, args.dim, args.vocab
    rng = np.random.default_rng(args.seed)
    table = empty_aligned((vocab, dim), np.float32)                  # [V][D], on cache lines
    table[...] = rng.standard_normal((vocab, dim), dtype=np.float32)
    qtables = {mode: fe.quantize_table(table, mode) for mode in ("int8", "int4")}
    id_sets = [rng.integers(0, vocab, (batch, length)).astype(np.int32) for _ in range(args.id_sets)]
    offsets = np.arange(batch + 1, dtype=np.int64) * length

    providers = {
        "fused-fp32": lambda ids: fe.embedding_mean(table, ids, backend="cpu"),
        "fused-int8": lambda ids: fe.embedding_mean(qtables["int8"], ids, backend="cpu"),
        "fused-int4": lambda ids: fe.embedding_mean(qtables["int4"], ids, backend="cpu"),
        "fused-int8[sum]": lambda ids: fe.embedding_bag(qtables["int8"], ids.reshape(-1), offsets,
                                                        combiner="sum", backend="cpu"),
        "fused-int4[sum]": lambda ids: fe.embedding_bag(qtables["int4"], ids.reshape(-1), offsets,
                                                        combiner="sum", backend="cpu"),
    }
    torch_calls = torch_providers(qtables, offsets)
    providers.update(torch_calls)

    # Correctness on the benchmark's own rows, before any timing.
    ids = id_sets[0]
    for name, run in providers.items():
        source = table if name == "fused-fp32" else qtables["int8" if "int8" in name else "int4"]
        if name.endswith("[sum]"):
            expected = embedding_bag_reference(source, ids.reshape(-1), offsets, None, "sum")
        else:
            expected = embedding_mean_reference(source, ids)
        got = run(ids)
        error = float(np.max(np.abs(got - expected)))
        # torch's int4 reads float16 scales and biases: its error is theirs, not float32 summation's.
        limit = 5e-2 if name.startswith("torch-int4") else 1e-3
        status = "ok" if error <= limit else "FAILED"
        print(f"check {name:18s} max |got - float64 reference| = {error:.3g} ({status})")

    for run in providers.values():  # compile and warm up
        for ids in id_sets[:3]:
            run(ids)
    times = {name: [] for name in providers}
    names = list(providers)
    call = 0
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            ids = id_sets[call % len(id_sets)]
            call += 1
            start = time.perf_counter()
            providers[name](ids)
            times[name].append(time.perf_counter() - start)

    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; uptime: {uptime}")
    print(f"B={batch} L={length} D={dim} V={vocab:,}, uniform int32 ids, {args.id_sets} id sets, "
          f"medians of {args.rounds} interleaved rounds")
    formats = {"fp32": TableFormat.FP32, "int8": TableFormat.INT8_ROWWISE, "int4": TableFormat.INT4_ROWWISE}
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"| provider | median ms | min-max ms | bytes model MB | GB/s | vs fused-fp32 |")
    print(f"| --- | --- | --- | --- | --- | --- |")
    for name in names:
        fmt = formats["int8" if "int8" in name else "int4" if "int4" in name else "fp32"]
        moved = batch * length * (4 + fmt.bytes_per_row(dim)) + batch * dim * 4
        ms = medians[name] * 1e3
        print(f"| {name} | {ms:.3f} | {min(times[name]) * 1e3:.3f}-{max(times[name]) * 1e3:.3f} | "
              f"{moved / 1e6:.1f} | {moved / medians[name] / 1e9:.1f} | "
              f"{medians['fused-fp32'] / medians[name]:.2f}x |")
    for mode in ("int8", "int4"):
        theirs = f"torch-{mode}[sum]"
        for fused in (f"fused-{mode}[sum]", f"fused-{mode}"):
            if theirs in medians:
                print(f"{fused} vs {theirs}: {medians[theirs] / medians[fused]:.2f}x")


if __name__ == "__main__":
    main()
