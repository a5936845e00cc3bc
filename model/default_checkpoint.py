"""The embedded default checkpoint, glm5-tiny: config, tokenizer, chat template and trained weights ship in the
package (`python -m glmserve.train.train_tiny` made them; see the model card beside them). A checkout without the
weights file falls back to weights drawn deterministically from a seed, cached outside the repository.
"""

import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch

from .config import GlmConfig

log = logging.getLogger(__name__)

PACKAGED = Path(__file__).parent / "checkpoints" / "glm5-tiny"
SEED = 0


def cache_root() -> Path:
    return Path(os.environ.get("GLMSERVE_CACHE", Path.home() / ".cache" / "glmserve"))


def random_init_(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """transformers-style init: normal(0, std) matrices and embeddings, unit norms, zero biases."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        with torch.no_grad():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight") or name.endswith("k_norm.weight"):
                p.fill_(1.0)
            elif p.ndim == 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def default_checkpoint() -> Path:
    """Directory of the embedded model; weights are the packaged ones, else generated once into the cache."""
    if (PACKAGED / "model.safetensors").exists():
        return PACKAGED
    digest = hashlib.sha256((PACKAGED / "config.json").read_bytes()).hexdigest()[:12]
    target = cache_root() / f"glm5-tiny-random-{digest}-seed{SEED}"
    if (target / "model.safetensors").exists():
        return target
    from .glm import GlmForCausalLM
    from .weights import save_weights

    log.info("generating random glm5-tiny weights (seed %d) into %s", SEED, target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(PACKAGED, tmp)
    model = GlmForCausalLM(GlmConfig.from_pretrained(PACKAGED))
    random_init_(model, SEED)
    save_weights(model, tmp, dtype=torch.bfloat16)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(tmp)
    return target
