"""Launch-configuration heuristics, one place for all backends."""
from __future__ import annotations

# Parallel work items per CPU thread: a few, so a slow thread (the machine is
# shared) does not hold up the rest, while each chunk still amortises its
# accumulator allocation over many bags.
CPU_CHUNKS_PER_THREAD = 4


def cpu_bags_per_chunk(batch: int, threads: int) -> int:
    """Bags handled by one parallel iteration of a CPU kernel (>= 1)."""
    chunks = max(1, threads * CPU_CHUNKS_PER_THREAD)
    return max(1, -(-batch // chunks))
