"""Parameter counts of a config, built on the meta device (no memory): total, with MTP, activated per token."""

from dataclasses import dataclass

import torch

from .config import GlmConfig
from .glm import GlmForCausalLM


@dataclass(frozen=True)
class ModelSize:
    main: int  # every parameter of the main model (embedding and lm_head included)
    with_mtp: int  # main + the MTP layer(s)
    activated: int  # parameters one token touches in the main model, not counting the embedding table

    def table(self) -> str:
        return "\n".join(
            f"{label:<42}{_human(value):>10}"
            for label, value in [
                ("parameters (main model)", self.main),
                ("parameters (with MTP layer)", self.with_mtp),
                ("activated per token (without embedding)", self.activated),
            ]
        )


def model_size(config: GlmConfig) -> ModelSize:
    with torch.device("meta"):
        model = GlmForCausalLM(config)
    n_main = config.num_hidden_layers
    main = with_mtp = inactive_experts = 0
    unused = config.n_routed_experts - config.num_experts_per_tok
    for name, p in model.named_parameters():
        with_mtp += p.numel()
        parts = name.split(".")
        is_mtp = parts[:2] == ["model", "layers"] and int(parts[2]) >= n_main
        if is_mtp:
            continue
        main += p.numel()
        if ".mlp.experts.0." in name:  # each token skips `unused` of the identically shaped routed experts
            inactive_experts += p.numel() * unused
    activated = main - inactive_experts - model.model.embed_tokens.weight.numel()
    return ModelSize(main=main, with_mtp=with_mtp, activated=activated)


def _human(count: int) -> str:
    return f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.2f}M"
