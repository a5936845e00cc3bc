"""`ServingConfig`: one description of a deployment (model, engine, replicas per role, resources, autoscaling,
KV transfer, SLOs), read from YAML and overridden by CLI flags. The Ray Serve app is built from it alone."""

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from glmserve.api.quota import ApiKey
from glmserve.batch.options import BatchOptions
from glmserve.engine.admission import AdmissionLimits
from glmserve.engine.engine_args import EngineArgs

DEFAULT_KEY_NAME = "default"


class Autoscaling(BaseModel):
    """Ray Serve autoscaling for one role; absent = a fixed replica count.

    `policy: slo` (the default) sizes the role from its SLO (`cluster/autoscaling.py`): prefill from the prompt
    tokens waiting against `slo_ttft_ms` (queue time counted), decode from KV use, running sequences and TPOT
    against `slo_tpot_ms`. `ongoing_requests` is Ray Serve's own policy on `target_ongoing_requests`. Serve applies
    the bounds and the delays either way."""

    model_config = ConfigDict(extra="forbid")

    policy: Literal["slo", "ongoing_requests"] = "slo"
    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    target_kv_cache_usage: float = Field(0.75, gt=0, le=1)  # decode, policy slo
    upscale_delay_s: float = Field(10, ge=0)
    downscale_delay_s: float = Field(120, ge=0)
    metrics_interval_s: float = Field(2, gt=0)  # how often replicas report
    look_back_period_s: float = Field(10, gt=0)  # the window their reports are averaged over


class RoleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(1, ge=0)
    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)  # tensor/expert-parallel replica: > 0 gives each rank one GPU (the replica none)
    max_ongoing_requests: int = Field(256, gt=0)
    # Requests Serve holds for this role once every replica has max_ongoing_requests; beyond it Serve answers 503
    # with Retry-After, so nothing queues without bound anywhere on the path.
    max_queued_requests: int = Field(256, gt=0)
    # A replica being removed (scale-down, upgrade, shutdown) takes no new requests and has this long to finish the
    # ones it holds; what is left then ends with a retryable 503 and its blocks freed.
    graceful_shutdown_timeout_s: float = Field(120, gt=0)
    autoscaling: Autoscaling | None = None


class TransferConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    transport: Literal["tcp", "cuda_ipc", "nccl"] = "tcp"  # the one transport receivers accept
    lease_s: float = Field(30, gt=0)  # a transfer not renewed within this is failed and its blocks freed
    timeout_s: float = Field(600, gt=0)  # a transfer not finished within this is given up (stuck but alive peer)
    on_failure: Literal["recompute", "fail"] = "recompute"
    # The cluster secret every KV peer must prove (kvtransfer/auth.py). Unset: GLMSERVE_KV_SECRET (a Kubernetes
    # Secret in k8s/), else the app draws one when it is built and hands it to every replica.
    secret: SecretStr | None = Field(None, min_length=16)


class ApiOptions(BaseModel):
    """What the HTTP API exposes, and bounds on what one request may make a replica do (each refusal is a 4xx naming
    the field, decided before the expensive work)."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int | None = Field(None, gt=0)  # default: 64 bytes per token of max_model_len, at least 1 MiB
    max_stop_strings: int = Field(16, ge=0)
    max_stop_string_chars: int = Field(256, gt=0)
    max_stop_token_ids: int = Field(256, ge=0)
    metrics_need_api_key: bool = False  # /metrics behind the API key too (it is open by default, for Prometheus)
    openapi: bool = False  # serve /openapi.json (behind the API key when there is one)


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
    api_key: str | None = None  # guards /v1/* (and /metrics, /openapi.json as `api` says); no quota
    api_keys: list[ApiKey] = Field(default_factory=list)  # more keys, each with a name and optional quotas (429)
    api: ApiOptions = Field(default_factory=ApiOptions)
    admission: AdmissionLimits = Field(default_factory=AdmissionLimits)  # per decode replica (503 when over)
    batch: BatchOptions = Field(default_factory=BatchOptions)  # /v1/files and /v1/batches: store path, priority
    slo_ttft_ms: float = Field(2000, gt=0)
    slo_tpot_ms: float = Field(200, gt=0)

    @model_validator(mode="after")
    def _decode_exists(self) -> "ServingConfig":
        if self.decode.replicas < 1 and not (self.decode.autoscaling and self.decode.autoscaling.min_replicas >= 1):
            raise ValueError("decode.replicas must be >= 1: decode workers orchestrate every request")
        names = [k.name for k in self.api_keys]
        if len(set(names)) != len(names) or DEFAULT_KEY_NAME in names:
            raise ValueError(f"api_keys: names must be unique and not {DEFAULT_KEY_NAME!r}")
        return self

    @property
    def api_key_table(self) -> dict[str, str]:
        """Every accepted key by its name (`api_key` is named "default")."""
        keys = {k.name: k.key.get_secret_value() for k in self.api_keys}
        if self.api_key:
            keys[DEFAULT_KEY_NAME] = self.api_key
        return keys

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
