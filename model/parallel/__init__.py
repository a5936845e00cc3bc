"""Tensor and expert parallelism inside one replica: split modules, process groups and sharded loading."""

from .comm import Comm, ParallelContext, free_port, init_parallel
from .config import ParallelConfig
from .glm import ParallelGlmForCausalLM
from .weights import load_parallel_model

__all__ = [
    "Comm",
    "ParallelConfig",
    "ParallelContext",
    "ParallelGlmForCausalLM",
    "free_port",
    "init_parallel",
    "load_parallel_model",
]
