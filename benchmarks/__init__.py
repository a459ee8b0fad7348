"""Benchmark definitions (split digits / MNIST / CIFAR, ...) and the activation-memory bench."""
