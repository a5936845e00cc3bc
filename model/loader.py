"""`load_model`: a checkpoint directory (or the embedded default) -> a ready GlmForCausalLM."""

from pathlib import Path

import torch

from .config import GlmConfig
from .default_checkpoint import default_checkpoint
from .fusion import fuse
from .glm import GlmForCausalLM
from .weights import checkpoint_files, keep_fp8, load_weights


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ValueError(f"dtype must be one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


def load_model(
    path: str | Path | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    fused: bool = False,
    dequantize_fp8: bool = False,
) -> GlmForCausalLM:
    """Build the network from `path`'s config.json and load its safetensors. `None` loads the embedded glm5-tiny.
    `fused`: in its serving form (model/fusion.py: packed weights, Triton kernels; CUDA), else the reference.
    FP8 block-quantized Linear weights stay FP8 (`Fp8Linear`) unless `dequantize_fp8`.

    `model(input_ids)` returns full-sequence causal logits [B, T, vocab].
    """
    path = Path(path) if path is not None else default_checkpoint()
    config = GlmConfig.from_pretrained(path)
    with torch.device("meta"):
        model = GlmForCausalLM(config)
    dtype = resolve_dtype(dtype)
    if not dequantize_fp8:
        keep_fp8(model, checkpoint_files(path), dtype)
    load_weights(model, path, dtype, device)
    return fuse(model.eval()) if fused else model.eval()
