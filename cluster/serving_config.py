"""`ServingConfig`: one description of a deployment (model, engine, replicas per role, resources, autoscaling,
KV transfer, SLOs), read from YAML and overridden by CLI flags. The Ray Serve app is built from it alone."""

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from glmserve.engine.engine_args import EngineArgs


class Autoscaling(BaseModel):
    """Ray Serve autoscaling for one role; absent = a fixed replica count."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    upscale_delay_s: float = Field(10, ge=0)
    downscale_delay_s: float = Field(120, ge=0)


class RoleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(1, ge=0)
    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)  # tensor/expert-parallel replica: > 0 gives each rank one GPU (the replica none)
    max_ongoing_requests: int = Field(256, gt=0)
    autoscaling: Autoscaling | None = None


class TransferConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    transport: Literal["tcp", "cuda_ipc", "nccl"] = "tcp"
    lease_s: float = Field(30, gt=0)  # a transfer not renewed within this is failed and its blocks freed
    timeout_s: float = Field(600, gt=0)  # a transfer not finished within this is given up (stuck but alive peer)
    on_failure: Literal["recompute", "fail"] = "recompute"


class PrefillEngine(BaseModel):
    """How prefill replicas' engines differ from `engine`: their own split (each role has its own `--tp`, as in vLLM's
    and SGLang's disaggregated serving). TP or EP > 1 spreads a prefill replica over rank actors
    (`cluster/prefill_ranks.py`)."""

    model_config = ConfigDict(extra="forbid")

    tensor_parallel_size: int = Field(1, ge=1)
    expert_parallel_size: int = Field(1, ge=1)


class ServingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: EngineArgs = Field(default_factory=EngineArgs)
    served_model_name: str | None = None  # default: the checkpoint directory's name, or "glm5-tiny"
    prefill: RoleConfig = Field(default_factory=RoleConfig)
    prefill_engine: PrefillEngine = Field(default_factory=PrefillEngine)
    decode: RoleConfig = Field(default_factory=RoleConfig)
    local_prefill_threshold: int = Field(256, ge=0)  # uncached prompt tokens below this prefill on the decode worker
    kv_transfer: TransferConfig = Field(default_factory=TransferConfig)
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    api_key: str | None = None
    slo_ttft_ms: float = Field(2000, gt=0)
    slo_tpot_ms: float = Field(200, gt=0)

    @model_validator(mode="after")
    def _decode_exists(self) -> "ServingConfig":
        if self.decode.replicas < 1 and not (self.decode.autoscaling and self.decode.autoscaling.min_replicas >= 1):
            raise ValueError("decode.replicas must be >= 1: decode workers orchestrate every request")
        return self

    @property
    def has_prefill(self) -> bool:
        return self.prefill.replicas > 0 or self.prefill.autoscaling is not None

    @property
    def prefill_engine_args(self) -> EngineArgs:
        return self.engine.model_copy(update=self.prefill_engine.model_dump())

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return Path(self.engine.model).name if self.engine.model else "glm5-tiny"

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ServingConfig":
        return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})
