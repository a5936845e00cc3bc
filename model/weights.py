"""Loading (and saving) checkpoints in the Hub's safetensors layout.

Weights are read one tensor at a time into a model built on the meta device, so at no point do two copies of the
weights exist. FP8 block-quantized tensors are dequantized as they are read.
"""

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from .fp8 import dequantize_fp8_blockwise

log = logging.getLogger(__name__)

SCALE_SUFFIX = "_scale_inv"
# transformers keeps these in fp32 whatever the checkpoint dtype: routing and indexing are precision-sensitive.
FP32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias", "indexer.weights_proj.weight")


class CheckpointError(ValueError):
    """The checkpoint does not fit the model; the message names the tensors."""


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file, from `model.safetensors.index.json` or a single `model.safetensors`."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")
    with safe_open(single, "pt") as f:
        return dict.fromkeys(f.keys(), single)


def _names_list(names: set[str], limit: int = 12) -> str:
    shown = sorted(names)[:limit]
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(shown) + more


def target_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if name.endswith(FP32_SUFFIXES) else dtype


def load_weights(model: nn.Module, path: str | Path, dtype: torch.dtype, device: torch.device | str) -> None:
    """Fill `model` (built on the meta device) from the checkpoint at `path`, in place."""
    path = Path(path)
    files = checkpoint_files(path)
    expected = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    scales = {n for n in files if n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] in files}
    present = set(files) - scales
    missing, unexpected = set(expected) - present, present - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_names_list(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {_names_list(unexpected)}")
        raise CheckpointError(f"checkpoint {path} does not match the config: " + "; ".join(parts))

    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    bar = tqdm(total=len(expected), desc="loading weights", unit="tensor", disable=len(expected) < 200)
    for file, names in by_file.items():
        with safe_open(file, "pt", device="cpu") as f:
            for name in names:
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != expected[name]:
                    raise CheckpointError(
                        f"tensor {name} has shape {tuple(tensor.shape)} in {file.name}, config needs {expected[name]}"
                    )
                want = target_dtype(name, dtype)
                if tensor.dtype == torch.float8_e4m3fn:
                    scale_name = name + SCALE_SUFFIX
                    if scale_name not in files:
                        raise CheckpointError(f"fp8 tensor {name} has no {scale_name}")
                    with safe_open(files[scale_name], "pt", device="cpu") as fs:
                        tensor = dequantize_fp8_blockwise(tensor, fs.get_tensor(scale_name), want)
                _set_tensor(model, name, tensor.to(device=device, dtype=want))
                bar.update()
    bar.close()


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def save_weights(model: nn.Module, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write `model.safetensors` in the Hub layout (fp32-kept tensors stay fp32)."""
    state = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(target_dtype(name, dtype))
        state[name] = t.contiguous().cpu()
    save_file(state, str(Path(path) / "model.safetensors"), metadata={"format": "pt"})
