"""Tensor and expert parallelism."""
