"""Sharded loading: each rank reads only its slices of the split tensors and only its own experts.

A rank's tensor differs from the checkpoint's in at most one dim, by the factor tp_size (heads, width or
vocabulary split by tensor parallelism); its piece is the tp_rank-th. Expert parallelism splits nothing inside a
tensor: a rank just has fewer expert names.
"""

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from ..config import GlmConfig
from ..fusion import fuse
from ..glm import GlmForCausalLM
from ..loader import resolve_dtype
from ..weights import (
    SCALE_SUFFIX,
    check_names,
    checkpoint_files,
    fp8_tensors,
    keep_fp8,
    read_tensor,
    set_tensor,
    target_dtype,
)
from .comm import Comm, ParallelContext
from .glm import ParallelGlmForCausalLM

log = logging.getLogger(__name__)


def load_parallel_model(
    path: str | Path,
    ctx: ParallelContext,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    fused: bool = False,
) -> ParallelGlmForCausalLM:
    """This rank's share of the checkpoint at `path`, ready to run with the other ranks of `ctx`'s replica;
    `fused` as `load_model`'s."""
    path = Path(path)
    config = GlmConfig.from_pretrained(path)
    dtype = resolve_dtype(dtype)
    with torch.device("meta"):
        model = ParallelGlmForCausalLM(config, ctx)
        whole = GlmForCausalLM(config)
    files = checkpoint_files(path)
    keep_fp8(whole, files, dtype)
    full_shapes = {name: tuple(t.shape) for name, t in whole.state_dict(keep_vars=True).items()}
    keep_fp8(model, files, dtype, full_shapes)  # FP8 layers whose share is whole blocks; the rest is dequantized
    load_sharded_weights(model, full_shapes, path, dtype, device)
    return fuse(model.eval()) if fused else model.eval()


def load_sharded_weights(
    model: ParallelGlmForCausalLM,
    full_shapes: dict[str, tuple[int, ...]],
    path: Path,
    dtype: torch.dtype,
    device: torch.device | str,
) -> None:
    """Fill `model` (on the meta device) in place; `full_shapes` are the unsplit model's, checked against the
    checkpoint as an unsplit load would check them."""
    files = checkpoint_files(path)
    check_names([n for n in full_shapes if not n.endswith(SCALE_SUFFIX)], files, path)
    params = model.state_dict(keep_vars=True)
    local_shapes = {name: tuple(t.shape) for name, t in params.items()}
    kept = fp8_tensors(model)
    by_file: dict[Path, list[str]] = {}
    for name in local_shapes:
        by_file.setdefault(files[name], []).append(name)
    show = model.ctx.world.rank == 0 and len(local_shapes) >= 200
    bar = tqdm(total=len(local_shapes), desc="loading weight shards", unit="tensor", disable=not show)
    for file, names in by_file.items():
        with safe_open(file, "pt", device="cpu") as f:
            for name in names:
                dim, start, stop = _rank_slice(name, full_shapes[name], local_shapes[name], model.ctx.tp)
                want = kept.get(name) or target_dtype(name, dtype)
                tensor = read_tensor(f, name, files, full_shapes[name], want, dim, start, stop)
                set_tensor(model, name, tensor.to(device))
                bar.update()
    bar.close()
    log.info("rank %d loaded %d tensors from %s", model.ctx.world.rank, len(local_shapes), path)


def _rank_slice(name: str, full: tuple[int, ...], local: tuple[int, ...], tp: Comm) -> tuple[int, int, int | None]:
    """(dim, start, stop) of this rank's piece; (0, 0, None) for a whole tensor."""
    split = [d for d, (f, n) in enumerate(zip(full, local, strict=True)) if f != n]
    if not split:
        return 0, 0, None
    dim = split[0]
    if len(split) > 1 or full[dim] != local[dim] * tp.size:
        raise RuntimeError(f"{name}: shard shape {local} is not a 1/{tp.size} split of {full}")
    return dim, tp.rank * local[dim], (tp.rank + 1) * local[dim]
