"""The engine both roles run: scheduler, block manager with prefix hashing, sequences, sampling, stop checks,
detokenization, outputs, speculative decoding (`spec/`), the async driver and the offline `LLM`."""

from .async_engine import AsyncEngine, EngineDeadError, EngineStopped
from .engine_args import EngineArgs
from .llm import LLM
from .llm_engine import LLMEngine
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams
from .validation import InvalidRequest

__all__ = [
    "LLM",
    "AsyncEngine",
    "CompletionOutput",
    "EngineArgs",
    "EngineDeadError",
    "EngineStopped",
    "InvalidRequest",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
]
