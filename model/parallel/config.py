"""How one replica's ranks share the model: attention heads over `tp_size` ranks, routed experts over `ep_size`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import GlmConfig


class ParallelConfig(BaseModel):
    """A replica has `world_size = max(tp_size, ep_size)` ranks; the smaller size must divide the larger.

    Ranks [i * tp_size, (i + 1) * tp_size) form a tensor-parallel group (attention and dense MLPs split by heads and
    width, vocabulary split for embedding and lm_head); with fewer TP than world ranks, each TP group computes the
    same attention. Ranks [j * ep_size, (j + 1) * ep_size) form an expert-parallel group holding all routed experts
    between them. TP=2 with EP=2 is one replica of 2 ranks: both split attention, and both split the experts.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tp_size: int = Field(1, ge=1)
    ep_size: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _sizes_nest(self) -> ParallelConfig:
        if max(self.tp_size, self.ep_size) % min(self.tp_size, self.ep_size):
            raise ValueError(f"tp_size ({self.tp_size}) and ep_size ({self.ep_size}) must divide one another")
        return self

    @property
    def world_size(self) -> int:
        return max(self.tp_size, self.ep_size)

    def tp_groups(self) -> list[list[int]]:
        return _consecutive(self.world_size, self.tp_size)

    def ep_groups(self) -> list[list[int]]:
        return _consecutive(self.world_size, self.ep_size)

    def check_model(self, config: GlmConfig) -> None:
        """Raise ValueError naming each model size these ranks cannot split evenly."""
        splits = {
            "num_attention_heads": (config.num_attention_heads, self.tp_size),
            "intermediate_size": (config.intermediate_size, self.tp_size),
            "vocab_size": (config.vocab_size, self.tp_size),
            "n_routed_experts": (config.n_routed_experts, self.ep_size),
        }
        bad = [f"{field} ({n}) is not divisible by {by}" for field, (n, by) in splits.items() if n % by]
        if bad:
            raise ValueError(
                f"tp_size={self.tp_size}, ep_size={self.ep_size} cannot split this model: " + "; ".join(bad)
            )


def _consecutive(world_size: int, group_size: int) -> list[list[int]]:
    return [list(range(start, start + group_size)) for start in range(0, world_size, group_size)]
