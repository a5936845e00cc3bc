"""The `glm_moe_dsa` model configuration (GLM-5.x), read from a checkpoint's `config.json`.

Derived fields follow transformers' `GlmMoeDsaConfig` so the same file means the same network here and there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

IndexerType = Literal["full", "shared"]
MlpType = Literal["dense", "sparse"]


class ConfigError(ValueError):
    """A `config.json` that cannot describe a GLM-5.x model; the message names the field."""


class RopeParameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    rope_theta: float = Field(10000.0, gt=0)
    rope_type: Literal["default"] = "default"


class GlmConfig(BaseModel):
    """Pydantic model of a `glm_moe_dsa` config.json (unknown keys are ignored, known ones are validated)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model_type: Literal["glm_moe_dsa"] = "glm_moe_dsa"
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    moe_intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int | None = None

    # MLA
    q_lora_rank: int = Field(gt=0)
    kv_lora_rank: int = Field(gt=0)
    qk_nope_head_dim: int = Field(gt=0)
    qk_rope_head_dim: int = Field(gt=0)
    v_head_dim: int = Field(gt=0)
    attention_bias: bool = False
    rope_parameters: RopeParameters = Field(default_factory=RopeParameters)
    rope_interleave: bool = True
    max_position_embeddings: int = Field(gt=0)

    # DSA indexer and IndexShare
    index_n_heads: int = Field(gt=0)
    index_head_dim: int = Field(gt=0)
    index_topk: int = Field(gt=0)
    indexer_rope_interleave: bool = True
    index_topk_freq: int = 1
    index_skip_topk_offset: int = 2
    index_topk_pattern: str | list[str] | None = None
    indexer_types: list[IndexerType] = Field(default_factory=list)
    index_share_for_mtp_iteration: bool = False

    # MoE (sigmoid, noaux_tc)
    n_routed_experts: int = Field(gt=0)
    n_shared_experts: int = Field(ge=0)
    num_experts_per_tok: int = Field(gt=0)
    n_group: int = Field(1, gt=0)
    topk_group: int = Field(1, gt=0)
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    scoring_func: Literal["sigmoid"] = "sigmoid"
    topk_method: Literal["noaux_tc"] = "noaux_tc"
    first_k_dense_replace: int = Field(0, ge=0)
    mlp_layer_types: list[MlpType] = Field(default_factory=list)

    # MTP
    num_nextn_predict_layers: int = Field(0, ge=0, le=1)

    hidden_act: Literal["silu"] = "silu"
    rms_norm_eps: float = Field(1e-6, gt=0)
    tie_word_embeddings: Literal[False] = False
    eos_token_id: list[int] = Field(default_factory=list)
    pad_token_id: int | None = None
    bos_token_id: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        # Older configs spell RoPE as a top-level `rope_theta`; `num_experts` is an alias of `n_routed_experts`.
        if data.get("rope_parameters") is None:
            data["rope_parameters"] = {"rope_theta": data.get("rope_theta", 10000.0), "rope_type": "default"}
        if data.get("n_routed_experts") is None and data.get("num_experts") is not None:
            data["n_routed_experts"] = data["num_experts"]
        if isinstance(data.get("eos_token_id"), int):
            data["eos_token_id"] = [data["eos_token_id"]]
        for key in ("indexer_types", "mlp_layer_types", "eos_token_id"):
            if data.get(key) is None:
                data.pop(key, None)
        return data

    @field_validator("index_topk_freq")
    @classmethod
    def _freq_at_least_one(cls, v: int) -> int:
        return max(v, 1)  # transformers clamps the same way

    @model_validator(mode="after")
    def _derive_and_check(self) -> GlmConfig:
        n = self.num_hidden_layers
        if not self.indexer_types:
            object.__setattr__(self, "indexer_types", self._derive_indexer_types())
        if len(self.indexer_types) != n:
            raise ValueError(f"indexer_types has {len(self.indexer_types)} entries, num_hidden_layers is {n}")
        if self.indexer_types[0] != "full":
            raise ValueError("indexer_types[0] must be 'full': a shared layer reuses a previous full layer's top-k")
        if not self.mlp_layer_types:
            dense = min(self.first_k_dense_replace, n)
            object.__setattr__(self, "mlp_layer_types", ["dense"] * dense + ["sparse"] * (n - dense))
        if len(self.mlp_layer_types) != n:
            raise ValueError(f"mlp_layer_types has {len(self.mlp_layer_types)} entries, num_hidden_layers is {n}")
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"n_routed_experts ({self.n_routed_experts}) must divide into n_group ({self.n_group})")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
        if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            raise ValueError("num_experts_per_tok exceeds the experts available in topk_group groups")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.index_head_dim:
            raise ValueError("qk_rope_head_dim must be even and <= index_head_dim (the indexer ropes its first dims)")
        return self

    def _derive_indexer_types(self) -> list[str]:
        pattern = self.index_topk_pattern
        if pattern is not None:
            letters = {"F": "full", "S": "shared"}
            if isinstance(pattern, str):
                if set(pattern) - set(letters):
                    raise ValueError(f"index_topk_pattern may hold only 'F' and 'S', got {pattern!r}")
                return [letters[c] for c in pattern]
            return list(pattern)
        freq, offset = self.index_topk_freq, self.index_skip_topk_offset
        return ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(self.num_hidden_layers)]

    # ---- derived shapes ----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer by absorbed MLA: the normalized latent plus the roped key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def rope_theta(self) -> float:
        return self.rope_parameters.rope_theta

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim**-0.5

    @property
    def num_layers_with_mtp(self) -> int:
        return self.num_hidden_layers + self.num_nextn_predict_layers

    def is_full_indexer_layer(self, layer: int) -> bool:
        """The MTP layer (index num_hidden_layers) always runs its own indexer."""
        return layer >= self.num_hidden_layers or self.indexer_types[layer] == "full"

    def is_moe_layer(self, layer: int) -> bool:
        if layer >= self.num_hidden_layers:
            return layer >= self.first_k_dense_replace
        return self.mlp_layer_types[layer] == "sparse"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GlmConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(_describe(e)) from None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> GlmConfig:
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        try:
            data = json.loads(file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {file}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{file} must hold a JSON object")
        return cls.from_dict(data)


def _describe(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        field = ".".join(str(p) for p in err["loc"]) or "config"
        lines.append(f"config.json field '{field}': {err['msg']}")
    return "invalid GLM config:\n  " + "\n  ".join(lines)
