"""``fused-embedding convert``: SavedModels from elsewhere, their gather-then-mean subgraphs fused."""
from __future__ import annotations


def run_convert_command(args, parser) -> int:
    parser.error("convert is not available yet")
