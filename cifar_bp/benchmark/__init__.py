"""Throughput: the tutorial's training loop against this engine, side by side, on one machine,
with every figure also given as GFLOP/s and as a share of the machine's measured matmul peak.

variants: what is compared, and the FLOP count of a step; runner: processes and turns;
loops: the timed loops; machine: the peak, environment and memory; report: the table.
"""

from cifar_bp.benchmark.report import print_benchmark
from cifar_bp.benchmark.runner import BenchOptions, run_benchmark

__all__ = ["BenchOptions", "print_benchmark", "run_benchmark"]
