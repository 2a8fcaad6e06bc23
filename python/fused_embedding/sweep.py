"""`fused-embedding bench --sweep`: the fused CPU op against torch's embedding_bag over shapes.

One case set, spanning B 1-32768, L 1-300, D 4-512 (the widths past a multiple of 16
among them), V 10,000-5,000,000, float32 with uniform ids, and the three table dtypes
at two shapes; timed by the bench's own interleaved rounds against
``torch.nn.functional.embedding_bag(mode="mean")`` and the unfused path in PyTorch
(gather, then mean: TF's unfused path would hold its own copy of tables up to 1.5 GB).
The figure of merit is fused / torch time per shape, measured in the same rounds;
the worst is called out.
"""
from __future__ import annotations

# Each table at most this many bytes: the machine this runs on is shared and has 23 GiB,
# and a (5,000,000, 384) float32 table would take 7.7 GB. V is cut per D to fit
# (``sweep_vocab``), so wide rows come from 1-2 M-row tables, still far past the caches.
SWEEP_TABLE_BYTES = 1_500_000_000

# The providers a sweep times, by their names in fused_embedding.providers: the one
# the ratios are over (torch's) and the unfused baseline the bench's speedups are over.
FUSED, TORCH, UNFUSED = "fused[cpu]", "torch-embedding-bag", "torch-unfused"
SWEEP_PROVIDERS = (FUSED, TORCH, UNFUSED)


def sweep_vocab(vocab: int, dim: int, item_bytes: int = 4) -> int:
    """``vocab``, or fewer rows (a multiple of 10,000) where a (vocab, dim) table would pass
    SWEEP_TABLE_BYTES."""
    return min(vocab, max(10_000, SWEEP_TABLE_BYTES // (dim * item_bytes) // 10_000 * 10_000))


# (B, L, D, V) in float32, V before the cut of sweep_vocab.
_FLOAT32_SHAPES = [
    (1, 16, 128, 1_000_000),        # one bag: latency
    (1, 300, 8, 10_000),            # one long bag of narrow rows, in cache
    (1024, 64, 128, 1_000_000),     # the headline shape
    (32768, 1, 128, 1_000_000),     # one id a bag: the output's writes dominate
    (16384, 4, 64, 1_000_000),
    (2048, 50, 4, 1_000_000),       # rows narrower than a vector
    (2048, 50, 8, 1_000_000),
    (2048, 300, 8, 5_000_000),
    (32768, 300, 8, 1_000_000),
    (2048, 50, 16, 1_000_000),
    (2048, 50, 24, 1_000_000),      # D % 16 != 0 from here to 300
    (2048, 50, 40, 1_000_000),
    (2048, 50, 50, 1_000_000),
    (2048, 50, 100, 1_000_000),
    (2048, 50, 200, 1_000_000),
    (2048, 50, 288, 1_000_000),     # a multiple of 16 beside 300
    (2048, 50, 300, 1_000_000),
    (32768, 50, 200, 5_000_000),
    (2048, 50, 384, 10_000),        # a table in the last-level cache
    (2048, 50, 384, 5_000_000),
    (512, 32, 512, 250_000),
    (64, 256, 128, 1_000_000),
    (128, 300, 64, 5_000_000),
    (8192, 20, 32, 5_000_000),
    (4096, 32, 32, 10_000),         # narrow rows in cache
    (256, 16, 64, 100_000),
    (8, 100, 300, 1_000_000),
    (32768, 10, 16, 5_000_000),
]

# Shapes timed in every table dtype.
DTYPE_SHAPES = [(1024, 64, 128, 1_000_000), (2048, 50, 100, 1_000_000)]
DTYPES = ("fp32", "fp16", "bf16")


def sweep_cases() -> list[tuple[int, int, int, int, str]]:
    """(B, L, D, V, table dtype) of every case, V cut to SWEEP_TABLE_BYTES (as float32)."""
    cases = [(b, l, d, sweep_vocab(v, d), "fp32") for b, l, d, v in _FLOAT32_SHAPES]
    for b, l, d, v in DTYPE_SHAPES:
        cases += [(b, l, d, sweep_vocab(v, d), dtype) for dtype in DTYPES
                  if (b, l, d, sweep_vocab(v, d), dtype) not in cases]
    return cases


def ratios(measurements) -> list[dict]:
    """One row per case the fused op and torch were both timed in: their medians, the
    unfused path's, and fused / torch (below 1: the fused op is faster)."""
    by_case: dict = {}
    for m in measurements:
        if m.get("status") == "ok" and "median_ms" in m and m["provider"] in SWEEP_PROVIDERS:
            key = (m["batch"], m["length"], m["dim"], m["vocab"], m["dtype"])
            by_case.setdefault(key, {})[m["provider"]] = m["median_ms"]
    rows = []
    for (batch, length, dim, vocab, dtype), ms in by_case.items():
        if FUSED in ms and TORCH in ms:
            rows.append(dict(batch=batch, length=length, dim=dim, vocab=vocab, dtype=dtype,
                             fused_ms=ms[FUSED], torch_ms=ms[TORCH], unfused_ms=ms.get(UNFUSED),
                             ratio=ms[FUSED] / ms[TORCH]))
    return rows


def ratio_lines(rows) -> list[str]:
    """Markdown: the fused / torch ratio per shape, then the worst one."""
    lines = ["fused / torch embedding_bag median time per shape (below 1: fused faster), "
             "interleaved in the same rounds:", "",
             "| B | L | D | V | dtype | fused ms | torch ms | unfused ms | fused / torch |",
             "| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        unfused = "-" if r["unfused_ms"] is None else f"{r['unfused_ms']:.3f}"
        lines.append(f"| {r['batch']} | {r['length']} | {r['dim']} | {r['vocab']:,} | {r['dtype']} | "
                     f"{r['fused_ms']:.3f} | {r['torch_ms']:.3f} | {unfused} | {r['ratio']:.2f} |")
    if rows:
        worst = max(rows, key=lambda r: r["ratio"])
        slower = sum(r["ratio"] > 1 for r in rows)
        lines += ["", f"Worst: {worst['ratio']:.2f} at B={worst['batch']} L={worst['length']} "
                      f"D={worst['dim']} V={worst['vocab']:,} {worst['dtype']}; "
                      f"{slower} of {len(rows)} shapes slower than torch."]
    return lines
