"""Everything needed to run GLM-5.x on one device: config, weights, layers, tokenizer, cache, runner, sampling."""

from .config import ConfigError, GlmConfig
from .glm import GlmForCausalLM
from .loader import load_model
from .weights import CheckpointError

__all__ = ["CheckpointError", "ConfigError", "GlmConfig", "GlmForCausalLM", "load_model"]
