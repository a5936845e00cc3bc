"""From a `ServingConfig` (the YAML `glmserve serve` reads) and the planner's settings (hardware, formats, profile)
to what the simulator runs: per role its engine arguments, KV blocks, cost model, replicas and GPUs, and the KV
transfer between them. Whatever cannot be deployed (the weights do not fit, TP/EP do not divide the model, no cost
model for the hardware) fails here with a message that says why.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from glmserve.cluster.serving_config import ServingConfig
from glmserve.engine.engine_args import EngineArgs
from glmserve.engine.kv_sizing import num_kv_blocks
from glmserve.model.config import GlmConfig
from glmserve.model.default_checkpoint import PACKAGED
from glmserve.model.kv_cache import KVCacheSpec
from glmserve.model.parallel.config import ParallelConfig

from .cost_model import (
    AnalyticCostModel,
    CostModel,
    Efficiencies,
    ProfileCostModel,
    ScaledCostModel,
    TransferModel,
    default_transfer,
    fit_efficiencies,
)
from .hardware import Hardware, get_hardware
from .model_ops import ModelOps
from .profile import Profile, ProfileError, config_sha256, find_profile
from .simulator import ClusterSpec, Overheads, RoleSpec
from .workload import ENGINE_BLOCK

log = logging.getLogger(__name__)

Format = Literal["auto", "fp32", "bf16", "fp16", "fp8"]
_TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ENGINE_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class InfeasibleConfig(ValueError):
    """A deployment that cannot run as configured; the message says what does not fit."""


class PlannerSettings(BaseModel):
    """What the planner needs beyond the ServingConfig."""

    model_config = ConfigDict(extra="forbid")

    hardware: str = "cpu"
    hardware_file: str | None = None  # more catalogue entries (YAML, as data/hardware.yaml)
    model_config_file: str | None = None  # config.json to plan for (default: the ServingConfig's engine.model)
    weights: Format = "auto"  # auto: fp8 for a checkpoint with an fp8 quantization_config, else the engine dtype
    kv_cache: Format = "auto"  # auto: the engine dtype
    profile: str | None = None  # a profile JSON (default: a shipped one for this model and hardware, if any)
    fit_profile: str | None = None  # fit the analytic model's efficiencies to this profile
    analytic: bool = False  # ignore profiles of this model: the analytic roofline (with fitted efficiencies if any)
    efficiencies: Efficiencies = Field(default_factory=Efficiencies)
    mtp_acceptance: list[float] = Field(default_factory=lambda: [0.8], min_length=1)  # per draft position
    activation_reserve_gb: float = Field(4.0, ge=0)  # per GPU, besides weights and KV (activations, graphs, NCCL)
    overheads: Overheads = Field(default_factory=Overheads)
    routing_stats_period_s: float = Field(1.0, gt=0)  # request_routing_stats_period_s in cluster/app.py
    gpu_hour_usd: float | None = Field(None, gt=0)  # for cost per million tokens
    cuda_graphs: bool | None = None  # step graphs (adaptive K offers only 0 and K); default: on for GPUs
    # served step times / the cost model's (host contention of the serving stack: the API's event loop beside the
    # engine thread, Ray's processes, several engines on shared cores); 1 = as profiled. `--calibrate` fits it.
    step_time_scale: float = Field(1.0, gt=0)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "PlannerSettings":
        import yaml

        try:
            return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})
        except ValidationError as e:
            raise InfeasibleConfig(f"{path}: {e}") from None


class RoleInfo(BaseModel):
    """What one replica of a role is, for reports."""

    replicas: int
    tensor_parallel_size: int
    expert_parallel_size: int
    gpus_per_replica: int
    weights_gb_per_gpu: float | None
    kv_blocks: int
    kv_tokens: int
    max_model_len: int
    cost_model: str


@dataclass
class Deployment:
    """The simulated deployment: roles, GPUs, formats; `spec` is what the simulator runs."""

    hardware: str
    model: str
    weights: str
    kv_cache: str
    gpus: int
    decode: RoleInfo
    prefill: RoleInfo | None
    local_prefill_threshold: int
    transfer: str
    spec: ClusterSpec

    def model_dump(self, mode: str = "json") -> dict:
        return {
            "hardware": self.hardware, "model": self.model, "weights": self.weights, "kv_cache": self.kv_cache,
            "gpus": self.gpus, "decode": self.decode.model_dump(mode=mode),
            "prefill": self.prefill.model_dump(mode=mode) if self.prefill else None,
            "local_prefill_threshold": self.local_prefill_threshold, "transfer": self.transfer,
        }  # fmt: skip


def resolve_model(config: ServingConfig, settings: PlannerSettings) -> tuple[GlmConfig, str, dict]:
    """The model config to plan for, its name, and the raw JSON (for its quantization_config)."""
    if settings.model_config_file:
        path = Path(settings.model_config_file)
    elif config.engine.model:
        path = Path(config.engine.model)
    else:
        path = PACKAGED
    file = path / "config.json" if path.is_dir() else path
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InfeasibleConfig(f"cannot read the model config {file}: {e}") from None
    name = config.served_model_name or (path.name if path.is_dir() else path.parent.name)
    return GlmConfig.from_pretrained(file), name, raw


def resolve_formats(config: ServingConfig, settings: PlannerSettings, hardware: Hardware, raw: dict) -> tuple[str, str]:
    engine = config.engine.dtype
    default = _ENGINE_DTYPE.get(engine, "fp32" if hardware.calibrated_only else "bf16")
    weights = settings.weights
    if weights == "auto":
        quant = raw.get("quantization_config") or {}
        weights = "fp8" if "fp8" in str(quant.get("quant_method", "")).lower() else default
    kv = default if settings.kv_cache == "auto" else settings.kv_cache
    return weights, kv


_COST_MODELS: dict[tuple, tuple[CostModel, Profile | None]] = {}


def _cached_cost_model(
    gconfig: GlmConfig,
    hardware: Hardware,
    settings: PlannerSettings,
    weights: str,
    kv: str,
    args: EngineArgs,
    efficiencies: Efficiencies,
) -> tuple[CostModel, Profile | None]:
    """One cost model per (model, hardware, formats, split, MTP, calibration): a search's candidates share them and
    their step-time caches."""
    key = (
        config_sha256(gconfig), hardware.key, weights, kv, args.tensor_parallel_size, args.expert_parallel_size,
        args.num_speculative_tokens > 0, efficiencies.model_dump_json(), settings.profile, settings.fit_profile,
        settings.analytic,
    )  # fmt: skip
    if key not in _COST_MODELS:
        if len(_COST_MODELS) > 256:
            _COST_MODELS.clear()
        _COST_MODELS[key] = _cost_model(gconfig, hardware, settings, weights, kv, args, efficiencies)
    return _COST_MODELS[key]


def _cost_model(
    gconfig: GlmConfig,
    hardware: Hardware,
    settings: PlannerSettings,
    weights: str,
    kv: str,
    args: EngineArgs,
    efficiencies: Efficiencies,
) -> tuple[CostModel, Profile | None]:
    tp, ep = args.tensor_parallel_size, args.expert_parallel_size
    mtp = args.num_speculative_tokens > 0
    if not settings.analytic:
        profile = None
        if settings.profile:
            profile = Profile.load(settings.profile)
            if profile.model_config_sha256 != config_sha256(gconfig):
                raise ProfileError(
                    f"{settings.profile} was measured on {profile.model}, another model config than the one "
                    "planned: use --fit-profile to calibrate the analytic model with it instead"
                )
            if profile.hardware != hardware.key:
                raise ProfileError(f"{settings.profile} was measured on {profile.hardware}, not {hardware.key}")
            if (profile.tensor_parallel_size, profile.expert_parallel_size) != (tp, ep):
                profile = None  # a single-device profile says nothing of TP/EP: the analytic model takes over
        else:
            profile = find_profile(gconfig, hardware.key, None, tp, ep)
        if profile is not None:
            return ProfileCostModel(profile, mtp_layers=gconfig.num_nextn_predict_layers if mtp else 0), profile
    nominal = None
    if hardware.calibrated_only:
        if not settings.fit_profile:
            raise InfeasibleConfig(
                f"no profile of {gconfig.hidden_size}-wide model on {hardware.key} at tp={tp}, ep={ep}, and "
                f"{hardware.key} has no roofline: measure one (`glmserve profile`) or give --fit-profile"
            )
        from .cost_model import CPU_NOMINAL_BYTES_PER_S, CPU_NOMINAL_FLOPS

        nominal = (CPU_NOMINAL_FLOPS, CPU_NOMINAL_BYTES_PER_S)
    model = AnalyticCostModel(
        gconfig, hardware, weights, kv, tp, ep, mtp=mtp, efficiencies=efficiencies, nominal=nominal
    )  # type: ignore[arg-type]
    return model, None


def _num_blocks(
    args: EngineArgs, ops: ModelOps, hardware: Hardware, settings: PlannerSettings, world: int, role: str
) -> tuple[int, float | None]:
    """KV blocks of one replica of `role`, and the weights each of its GPUs holds (GB; None on a CPU)."""
    bytes_per_block = ops.kv_bytes_per_token() * ENGINE_BLOCK
    if hardware.calibrated_only:
        dtype = _TORCH.get(ops.kv, torch.float32)
        spec = KVCacheSpec.from_config(ops.config, dtype)
        return num_kv_blocks(args, spec, torch.device("cpu")), None
    weights = ops.weight_bytes_per_rank(args.tensor_parallel_size, args.expert_parallel_size)
    if args.num_gpu_blocks_override:
        blocks = args.num_gpu_blocks_override
    elif args.kv_cache_memory_bytes:
        blocks = int(args.kv_cache_memory_bytes // bytes_per_block)
    else:
        budget = hardware.hbm_bytes * args.gpu_memory_utilization - weights - settings.activation_reserve_gb * 1e9
        blocks = int(budget // bytes_per_block) if budget > 0 else 0
    if blocks < 1:
        raise InfeasibleConfig(
            f"{role}: the model does not fit: {weights / 1e9:.1f} GB of {ops.weights} weights per GPU at "
            f"tp={args.tensor_parallel_size}, ep={args.expert_parallel_size} plus a {settings.activation_reserve_gb:g} "
            f"GB reserve exceed {args.gpu_memory_utilization:g} x {hardware.hbm_gb:g} GB of {hardware.key} HBM, "
            f"leaving no room for the KV cache ({bytes_per_block / 1e6:.2f} MB per 64-token block); "
            f"use more GPUs per replica (tp/ep), FP8 weights or a larger GPU"
        )
    return blocks, weights / 1e9


_FITS: dict[tuple, Efficiencies] = {}


def fitted_efficiencies(path: str, hardware: Hardware, base: Efficiencies) -> Efficiencies:
    """The analytic model's efficiencies fitted to a profile (once per process)."""
    key = (str(path), hardware.key, base.model_dump_json())
    if key not in _FITS:
        fit = fit_efficiencies(Profile.load(path), hardware, base=base)
        log.info(
            "fitted %s to %s: rms log error %.3f, max %.1f%% (%s)",
            ", ".join(fit.fitted), path, fit.rms_log_error, 100 * fit.max_rel_error, hardware.key,
        )  # fmt: skip
        _FITS[key] = fit.efficiencies
    return _FITS[key]


def build_deployment(config: ServingConfig, settings: PlannerSettings) -> Deployment:
    hardware = get_hardware(settings.hardware, settings.hardware_file)
    gconfig, name, raw = resolve_model(config, settings)
    weights, kv = resolve_formats(config, settings, hardware, raw)
    efficiencies = settings.efficiencies
    if settings.fit_profile:
        efficiencies = fitted_efficiencies(settings.fit_profile, hardware, settings.efficiencies)
    ops = ModelOps(gconfig, weights, kv)  # type: ignore[arg-type]
    graphs = settings.cuda_graphs if settings.cuda_graphs is not None else not hardware.calibrated_only

    def role(args: EngineArgs, replicas: int, max_ongoing: int, label: str) -> tuple[RoleSpec, RoleInfo]:
        tp, ep = args.tensor_parallel_size, args.expert_parallel_size
        try:
            ParallelConfig(tp_size=tp, ep_size=ep).check_model(gconfig)
        except ValueError as e:
            raise InfeasibleConfig(f"{label}: {e}") from None
        world = max(tp, ep)
        blocks, weights_gb = _num_blocks(args, ops, hardware, settings, world, label)
        cost, _ = _cached_cost_model(gconfig, hardware, settings, weights, kv, args, efficiencies)
        if settings.step_time_scale != 1.0:
            cost = ScaledCostModel(cost, settings.step_time_scale)
        max_len = min(args.max_model_len or gconfig.max_position_embeddings, blocks * ENGINE_BLOCK)
        spec = RoleSpec(
            args=args, cost=cost, num_blocks=blocks, max_model_len=max_len, replicas=replicas, world=world,
            max_ongoing_requests=max_ongoing, acceptance=tuple(settings.mtp_acceptance), graph_k_choices=graphs,
        )  # fmt: skip
        info = RoleInfo(
            replicas=replicas, tensor_parallel_size=tp, expert_parallel_size=ep, gpus_per_replica=world,
            weights_gb_per_gpu=weights_gb, kv_blocks=blocks, kv_tokens=blocks * ENGINE_BLOCK, max_model_len=max_len,
            cost_model=cost.describe(),
        )  # fmt: skip
        return spec, info

    if config.decode.replicas < 1:
        raise InfeasibleConfig("decode.replicas must be >= 1 (autoscaled deployments: plan a fixed count)")
    decode, decode_info = role(config.engine, config.decode.replicas, config.decode.max_ongoing_requests, "decode")
    prefill = prefill_info = None
    if config.prefill.replicas > 0:
        prefill, prefill_info = role(
            config.prefill_engine_args, config.prefill.replicas, config.prefill.max_ongoing_requests, "prefill"
        )
    spec_on = config.engine.num_speculative_tokens > 0
    layers = gconfig.num_hidden_layers + (gconfig.num_nextn_predict_layers if spec_on else 0)
    transfer = _transfer_model(settings, hardware, config, decode, prefill)
    spec = ClusterSpec(
        decode=decode,
        prefill=prefill,
        local_prefill_threshold=config.local_prefill_threshold,
        transfer=transfer,
        transfer_bytes_per_token=ops.kv_bytes_per_token(layers),
        transfer_layers=layers,
        on_failure=config.kv_transfer.on_failure,
        overheads=settings.overheads,
        routing_stats_period_s=settings.routing_stats_period_s,
    )
    gpus = decode.replicas * decode.world + (prefill.replicas * prefill.world if prefill else 0)
    return Deployment(
        hardware=hardware.key, model=name, weights=weights, kv_cache=kv, gpus=gpus, decode=decode_info,
        prefill=prefill_info, local_prefill_threshold=config.local_prefill_threshold,
        transfer=f"{config.kv_transfer.transport}: {transfer.latency_s * 1e3:.1f} ms + "
        f"{transfer.bytes_per_s / 1e9:.1f} GB/s ({transfer.source})",
        spec=spec,
    )  # fmt: skip


def _transfer_model(
    settings: PlannerSettings, hardware: Hardware, config: ServingConfig, decode: RoleSpec, prefill: RoleSpec | None
) -> TransferModel:
    transport = config.kv_transfer.transport
    for role in (prefill, decode):
        cost = getattr(role, "cost", None)
        if isinstance(cost, ProfileCostModel) and cost.profile.transfer and cost.profile.transport == transport:
            points = [(p.bytes, p.seconds) for p in cost.profile.transfer]
            return TransferModel.fit(points, f"profile {cost.profile.model} on {cost.profile.device}")
    world = decode.world + (prefill.world if prefill else 0)
    return default_transfer(hardware, transport, world <= hardware.gpus_per_node, settings.efficiencies.comm)
