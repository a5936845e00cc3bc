"""glmserve: disaggregated serving of GLM-5.x models on Ray Serve.

`from glmserve import LLM, SamplingParams` for offline generation; heavy modules load on first use.
"""

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from glmserve.engine import LLM

        return LLM
    if name == "SamplingParams":
        from glmserve.engine import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'glmserve' has no attribute {name!r}")
