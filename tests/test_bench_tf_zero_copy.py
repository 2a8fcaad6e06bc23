"""benchmarks/bench_tf_zero_copy.py: the crossover sentence written under its table."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_tf_zero_copy", ROOT / "benchmarks" / "bench_tf_zero_copy.py")
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)


@pytest.mark.parametrize("wins, sentence", [
    ([(16, False), (128, True), (256, False), (512, True), (1024, True)],
     "The op beats the unfused path at every B from 512 on (it also won at B=128, and lost between)."),
    ([(16, False), (64, False), (128, True), (256, True)], "The op beats the unfused path at every B from 128 on."),
    ([(16, True), (32, True)], "The op beats the unfused path at every B from 16 on."),
    ([(16, True), (32, False)], "The op does not beat the unfused path at B=32, the largest tried."),
])
def test_crossover_names_the_batch_from_which_the_op_always_wins(wins, sentence):
    assert script.crossover_sentence(wins) == sentence
