"""What ``spatialbench demo`` says while it evaluates names the demo benchmark's own numbers."""

from __future__ import annotations

from evaluator.benchmarks import benchmark_from_mapping, get_benchmark
from spatialbench.demo import evaluating_line


def test_the_evaluating_line_states_the_benchmarks_k_and_grid_size() -> None:
    assert "worst-of-10, the 775-point grid" in evaluating_line(get_benchmark("digits"))
    tiny = benchmark_from_mapping("digits", {"base": "digits", "grid": [5, 3, 3], "worst_of_k": 4})
    line = evaluating_line(tiny)
    assert "worst-of-4, the 45-point grid" in line and "775" not in line
