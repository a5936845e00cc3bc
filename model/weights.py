"""Loading (and saving) checkpoints in the Hub's safetensors layout.

Weights are read one tensor at a time into a model built on the meta device, so at no point do two copies of the
weights exist. FP8 block-quantized Linear weights stay FP8 (`Fp8Linear`, with their scales) unless the caller asks
for them dequantized, which is then done as they are read.
"""

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from .fp8 import BLOCK as FP8_BLOCK
from .fp8 import dequantize_fp8_blockwise
from .fp8_linear import Fp8Linear

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


def check_names(expected: Iterable[str], files: dict[str, Path], path: Path) -> None:
    """The checkpoint holds every expected tensor and nothing else (an fp8 weight's scale counts with its weight)."""
    expected = set(expected)
    scales = {n for n in files if n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] in files}
    present = set(files) - scales
    missing, unexpected = expected - present, present - expected
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_names_list(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {_names_list(unexpected)}")
        raise CheckpointError(f"checkpoint {path} does not match the config: " + "; ".join(parts))


def read_tensor(
    f: Any,
    name: str,
    files: dict[str, Path],
    expected_shape: tuple[int, ...],
    dtype: torch.dtype,
    dim: int = 0,
    start: int = 0,
    stop: int | None = None,
) -> torch.Tensor:
    """Tensor `name` from the open file `f`, cut to [start, stop) along `dim` (whole by default), in `dtype`.

    Only the cut is read from disk, so a tensor-parallel rank reads just its slice; fp8 is dequantized unless `dtype`
    is fp8 (the caller keeps it, with its scale).
    """
    view = f.get_slice(name)
    shape = tuple(view.get_shape())
    if shape != expected_shape:
        raise CheckpointError(f"tensor {name} has shape {shape} in {files[name].name}, config needs {expected_shape}")
    stop = shape[dim] if stop is None else stop
    if view.get_dtype() != "F8_E4M3" or dtype == torch.float8_e4m3fn:
        return view[_cut(dim, start, stop)].to(dtype)
    scale_name = name + SCALE_SUFFIX
    if scale_name not in files:
        raise CheckpointError(f"fp8 tensor {name} has no {scale_name}")
    # Read whole 128-blocks so every scale covers its own block, then trim to the cut.
    first, end = start // FP8_BLOCK, -(-stop // FP8_BLOCK)
    weight = view[_cut(dim, first * FP8_BLOCK, min(end * FP8_BLOCK, shape[dim]))]
    with safe_open(files[scale_name], "pt", device="cpu") as fs:
        scale = fs.get_slice(scale_name)[_cut(dim, first, end)]
    blocks = dequantize_fp8_blockwise(weight, scale, dtype)
    return blocks.narrow(dim, start - first * FP8_BLOCK, stop - start).contiguous()


def _cut(dim: int, start: int, stop: int) -> tuple[slice, ...]:
    return (slice(None),) * dim + (slice(start, stop),)


def keep_fp8(
    model: nn.Module, files: dict[str, Path], dtype: torch.dtype, full_shapes: dict[str, tuple[int, ...]] | None = None
) -> int:
    """Swap every Linear of `model` (on the meta device) whose checkpoint weight is FP8 with a block scale for an
    `Fp8Linear` computing in `dtype`; returns how many. Subclasses (parallel layers) keep their own weights. With
    `full_shapes` (a rank's share of a split model), a layer split along a dim stays FP8 only if its share is whole
    128-blocks, so that its scales split with it."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or f"{name}.weight{SCALE_SUFFIX}" not in files:
            continue
        if full_shapes is not None:
            full = full_shapes[f"{name}.weight"]
            if any(n != f and n % FP8_BLOCK for n, f in zip(module.weight.shape, full, strict=True)):
                continue  # a share that cuts a scale block: dequantized instead
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, Fp8Linear.like(module, dtype))
        swapped += 1
    return swapped


def load_weights(model: nn.Module, path: str | Path, dtype: torch.dtype, device: torch.device | str) -> None:
    """Fill `model` (built on the meta device) from the checkpoint at `path`, in place. `Fp8Linear` weights and
    scales are read as stored; every other FP8 tensor is dequantized to `dtype`."""
    path = Path(path)
    files = checkpoint_files(path)
    params = model.state_dict(keep_vars=True)
    expected = {name: tuple(t.shape) for name, t in params.items()}
    kept = fp8_tensors(model)
    check_names([n for n in expected if not (n in kept and n.endswith(SCALE_SUFFIX))], files, path)

    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    bar = tqdm(total=len(expected), desc="loading weights", unit="tensor", disable=len(expected) < 200)
    for file, names in by_file.items():
        with safe_open(file, "pt", device="cpu") as f:
            for name in names:
                tensor = read_tensor(f, name, files, expected[name], kept.get(name) or target_dtype(name, dtype))
                set_tensor(model, name, tensor.to(device))
                bar.update()
    bar.close()


def fp8_tensors(model: nn.Module) -> dict[str, torch.dtype]:
    """The tensors of `model`'s Fp8Linear layers (weights and scales) and the dtype each is read in, as stored."""
    return {
        f"{name}.{leaf}": p.dtype
        for name, module in model.named_modules()
        if isinstance(module, Fp8Linear)
        for leaf, p in module.named_parameters(recurse=False)
    }


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
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
