"""Benchmark definitions (split digits / MNIST / CIFAR, ...) and the activation-memory bench."""

from .registry import (
    BENCHMARKS,
    BenchmarkSpec,
    available_benchmarks,
    benchmark_from_tensors,
    get_benchmark,
    register_benchmark,
)

__all__ = [
    "BENCHMARKS",
    "BenchmarkSpec",
    "available_benchmarks",
    "benchmark_from_tensors",
    "get_benchmark",
    "register_benchmark",
]
