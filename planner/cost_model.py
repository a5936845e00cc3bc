"""Per-step time of an engine step, and of a KV transfer.

Two sources, one interface (`CostModel.step_time`):
- `ProfileCostModel`: a measured profile of this model on this device, interpolated (prefill chunk: tokens x cached
  context; decode: batch x context x K). A step mixing prefill chunks and decode sequences costs the decode step
  plus each chunk's prefill step less the fixed per-step cost, which is counted once (`step_floor_s`, the intercept
  of prefill time against chunk size).
- `AnalyticCostModel`: a roofline over GLM-5.x's operators (`model_ops.step_work`): each operator class (GEMMs,
  routed experts, sparse MLA, DSA indexer, top-k) takes max(FLOPs / (peak x efficiency), bytes / (HBM x memory
  efficiency)); tensor-parallel all-reduces, expert-parallel all-to-alls and the world all-gather take bytes /
  (link x comm efficiency) plus a latency each, over NVLink within a node and the network beyond; plus host time
  per step and per sequence. The efficiencies default to what glmserve's own kernels reached on the lent H200
  (`Efficiencies`, each default's source beside it) and can be fitted to a profile (`fit_efficiencies`).
"""

import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from glmserve.model.config import GlmConfig

from .hardware import Hardware, UnknownHardware
from .model_ops import CLASSES, KVDtype, ModelOps, StepWork, WeightDtype, step_work
from .profile import GridInterpolator, Profile

log = logging.getLogger(__name__)

Chunks = tuple[tuple[int, int], ...]  # (new tokens, tokens already cached) per prefill chunk in the step

# A CPU has no datasheet roofline: its analytic model is expressed against these nominal peaks, which a fit scales.
CPU_NOMINAL_FLOPS = 1e11
CPU_NOMINAL_BYTES_PER_S = 1e10


class Efficiencies(BaseModel):
    """Fractions of the datasheet peaks glmserve's kernels reach, and host time per step. Defaults come from
    glmserve's measurements on the lent H200 (docs/benchmarks.md, REFERENCE.md); on other GPUs they are an
    assumption (the same kernels, the same fractions)."""

    model_config = ConfigDict(extra="forbid")

    gemm: float = Field(0.79, gt=0)  # bf16 GEMM 8192^3: 783 of 989 TFLOP/s (REFERENCE.md)
    gemm_fp8: float = Field(0.58, gt=0)  # fp8 blockwise GEMM 8192^3: 1,144 of 1,979 TFLOP/s (REFERENCE.md)
    moe: float = Field(0.48, gt=0)  # routed experts in the 9.6B 1M prefill: ~2.5 PFLOP in 5.3 s = 471 TFLOP/s
    attention: float = Field(0.21, gt=0)  # sparse MLA, GLM-5.2 heads, 128K: 207 TFLOP/s (bench kernels)
    indexer: float = Field(0.55, gt=0)  # DSA indexer in the 9.6B 1M prefill: ~9.0 PFLOP in 16.4 s
    topk: float = Field(0.13, gt=0)  # of HBM bandwidth over 8 B per scored key (1M prefill top-k: 13.8 s)
    memory: float = Field(0.55, gt=0)  # of HBM bandwidth, weight + KV reads (9.6B decode at batch 64: ~2.6 TB/s)
    comm: float = Field(0.7, gt=0)  # of the link's one-way bandwidth in collectives (assumption)
    collective_latency_s: float = Field(15e-6, ge=0)  # per collective (assumption; NCCL small-message latency)
    step_overhead_s: float = Field(0.4e-3, ge=0)  # host time per step outside kernels (9.6B decode: 0.3-0.4 ms)
    seq_overhead_s: float = Field(2e-6, ge=0)  # host time per sequence per step (sampling, outputs; assumption)
    # kernel floor of one decoder layer: the 288M config's batch-1 decode step runs 278 launches in 0.77 ms of
    # kernel time over 8 layers while its bytes need 0.06 ms (docs/benchmarks.md): ~90 us per layer
    layer_floor_s: float = Field(90e-6, ge=0)
    expert_imbalance: float = Field(1.2, ge=1)  # busiest EP rank's tokens / the mean (assumption)


class CostModel(Protocol):
    kind: str

    def step_time(self, chunks: Chunks, decode_seqs: int, decode_context: float, k: int, accepted: float) -> float:
        """Seconds of one step: prefill `chunks` plus `decode_seqs` sequences at mean context `decode_context`
        verifying `k` drafts each (`accepted`: tokens they emit on average, for the MTP catch-up)."""
        ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class TransferModel:
    """Seconds to move n bytes of KV: a fixed cost (control plane: register, open, complete) plus n / bandwidth."""

    latency_s: float
    bytes_per_s: float
    source: str = ""

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bytes_per_s

    @classmethod
    def fit(cls, points: list[tuple[float, float]], source: str = "") -> "TransferModel":
        """Least squares of seconds = a + bytes / b over measured (bytes, seconds)."""
        x = np.array([p[0] for p in points], dtype=np.float64)
        y = np.array([p[1] for p in points], dtype=np.float64)
        if len(points) == 1:
            return cls(0.0, float(x[0] / y[0]), source)
        slope, intercept = np.polyfit(x, y, 1)
        slope = max(slope, 1e-15)
        return cls(max(0.0, float(intercept)), float(1.0 / slope), source)


# KV transfer defaults when no profile measured it (bench kvtransfer; docs/benchmarks.md)
TCP_LOOPBACK = TransferModel(2e-3, 1.96e9, "tcp loopback, 1 GiB: 1.96 GB/s (bench kvtransfer, 2-core CPU)")
CUDA_IPC = TransferModel(1e-3, 989.7e9, "cuda_ipc on one H200, 1 GiB: 989.7 GB/s (bench kvtransfer)")


def default_transfer(hardware: Hardware, transport: str, same_node: bool, efficiency: float) -> TransferModel:
    """What a transfer costs without a measurement: loopback tcp on a CPU, cuda_ipc within a GPU, else the link."""
    if hardware.calibrated_only:
        return TCP_LOOPBACK
    if transport == "cuda_ipc":
        return CUDA_IPC
    if same_node and transport == "nccl":
        return TransferModel(1e-3, hardware.nvlink_bytes_per_s * efficiency, f"{hardware.key} NVLink x {efficiency}")
    return TransferModel(
        2e-3,
        hardware.network_bytes_per_s * efficiency,
        f"{hardware.key} network {hardware.network_gb_s} GB/s x {efficiency}",
    )


class ScaledCostModel:
    """Another cost model's step times times a factor (the serving stack's slowdown over a profile)."""

    def __init__(self, inner: CostModel, scale: float):
        self.inner, self.scale = inner, scale
        self.kind = inner.kind

    def step_time(
        self, chunks: Chunks, decode_seqs: int, decode_context: float, k: int, accepted: float = 1.0
    ) -> float:
        return self.scale * self.inner.step_time(chunks, decode_seqs, decode_context, k, accepted)

    def describe(self) -> str:
        return f"{self.inner.describe()}; step times x {self.scale:.3f}"


class ProfileCostModel:
    kind = "profile"

    def __init__(self, profile: Profile, mtp_layers: int = 0):
        """`mtp_layers`: prefill with speculation on also runs the MTP layer over every prompt token; prefill rows
        are measured without it, so they are scaled by (layers + mtp_layers) / layers."""
        self.profile = profile
        self.prefill = GridInterpolator.from_points(
            [(p.tokens, p.context) for p in profile.prefill], [p.seconds for p in profile.prefill], floor=1e-6
        )
        self.decode = GridInterpolator.from_points(
            [(p.batch, p.context, p.k) for p in profile.decode], [p.seconds for p in profile.decode], floor=1e-6
        )
        layers = profile.glm_config.get("num_hidden_layers", 1)
        self.prefill_scale = (layers + mtp_layers) / layers
        self.step_floor_s = self._step_floor()
        self.max_k = int(max(p.k for p in profile.decode))
        self._cached = lru_cache(maxsize=1 << 16)(self._step_time)

    def _step_floor(self) -> float:
        """The fixed cost of a step: intercept of prefill seconds against tokens at the smallest context."""
        ctx = min(p.context for p in self.profile.prefill)
        rows = sorted((p.tokens, p.seconds) for p in self.profile.prefill if p.context == ctx)
        if len(rows) < 2:
            return 0.0
        slope, intercept = np.polyfit([r[0] for r in rows], [r[1] for r in rows], 1)
        return float(min(max(intercept, 0.0), rows[0][1]))

    def step_time(
        self, chunks: Chunks, decode_seqs: int, decode_context: float, k: int, accepted: float = 1.0
    ) -> float:
        return self._cached(chunks, decode_seqs, decode_context, k)

    def _step_time(self, chunks: Chunks, decode_seqs: int, decode_context: float, k: int) -> float:
        total = 0.0
        if decode_seqs:
            total = self.decode(decode_seqs, max(decode_context, 1.0), k)
        for i, (n, start) in enumerate(chunks):
            t = self.prefill(n, start) * self.prefill_scale
            total += t if (i == 0 and not decode_seqs) else max(t - self.step_floor_s, 0.0)
        return total

    def describe(self) -> str:
        p = self.profile
        return (
            f"profile {p.model} on {p.device} ({p.dtype}, {p.threads or '-'} threads, torch {p.torch_version}, "
            f"commit {p.glmserve_commit[:10] or '-'}): {len(p.prefill)} prefill and {len(p.decode)} decode points, "
            f"step floor {self.step_floor_s * 1e3:.2f} ms"
        )


class AnalyticCostModel:
    kind = "analytic"

    def __init__(
        self,
        config: GlmConfig,
        hardware: Hardware,
        weights: WeightDtype = "bf16",
        kv: KVDtype = "bf16",
        tp: int = 1,
        ep: int = 1,
        mtp: bool = False,
        efficiencies: Efficiencies | None = None,
        nominal: tuple[float, float] | None = None,
    ):
        """`nominal`: (FLOP/s, bytes/s) to use as the peaks of a hardware entry without a roofline (a CPU, for a
        fit); a GPU uses its datasheet."""
        self.ops = ModelOps(config, weights, kv)
        self.hardware = hardware
        self.tp, self.ep, self.mtp = tp, ep, mtp
        self.eff = efficiencies or Efficiencies()
        if hardware.calibrated_only and nominal is None:
            raise UnknownHardware(
                f"{hardware.key} has no roofline: plan it from a profile measured on it (`glmserve profile`, "
                "then --profile), or fit an analytic model to one (--fit-profile)"
            )
        if nominal is not None:
            self.compute_peak = {"bf16": nominal[0], "fp8": nominal[0]}
            self.bandwidth = nominal[1]
            self.link = {"intra": nominal[1], "inter": nominal[1]}
        else:
            self.compute_peak = {"bf16": hardware.peak_flops("bf16"), "fp8": hardware.peak_flops("fp8")}
            self.bandwidth = hardware.hbm_bytes_per_s
            self.link = {"intra": hardware.nvlink_bytes_per_s, "inter": hardware.network_bytes_per_s}
        self.gpus_per_node = hardware.gpus_per_node
        self._cached = lru_cache(maxsize=1 << 16)(self._step_time)

    # ---- rates ----
    def rates(self) -> dict[str, float]:
        """Effective FLOP/s per operator class (GEMMs in the weights' format; attention and indexer in bf16, fp8
        when the KV cache is fp8)."""
        e = self.eff
        gemm_dtype = "fp8" if self.ops.weights == "fp8" else "bf16"
        attn_dtype = "fp8" if self.ops.kv == "fp8" else "bf16"
        return {
            "gemm": self.compute_peak[gemm_dtype] * (e.gemm_fp8 if gemm_dtype == "fp8" else e.gemm),
            "moe": self.compute_peak[gemm_dtype] * e.moe * (e.gemm_fp8 / e.gemm if gemm_dtype == "fp8" else 1.0),
            "attention": self.compute_peak["bf16"] * e.attention,
            "indexer": self.compute_peak[attn_dtype] * e.indexer,
        }

    def _link(self, group: int) -> float:
        return self.link["intra" if group <= self.gpus_per_node else "inter"] * self.eff.comm

    def time_of(self, work: StepWork) -> float:
        """Host time, then per layer the sum of its operator classes' rooflines (at least the per-layer kernel
        floor), then communication."""
        e = self.eff
        rates = self.rates()
        mem = self.bandwidth * e.memory
        topk_bw = self.bandwidth * e.topk
        total = e.step_overhead_s + e.seq_overhead_s * work.seqs
        for lw in work.layers:
            f, b = lw.flops, lw.bytes
            t = (
                max(f["gemm"] / rates["gemm"], b["gemm"] / mem)
                + max(f["moe"] * e.expert_imbalance / rates["moe"], b["moe"] / mem)
                + max(f["attention"] / rates["attention"], b["attention"] / mem)
                + max(f["indexer"] / rates["indexer"], b["indexer"] / mem)
                + b["topk"] / topk_bw
            )
            total += lw.count * (max(t, e.layer_floor_s) if lw.floor else t)
        return total + self.comm_time(work)

    def class_times(self, work: StepWork) -> dict[str, float]:
        """Seconds per operator class (before the layer floor), plus host and communication time."""
        e = self.eff
        rates = self.rates()
        mem = self.bandwidth * e.memory
        out = {"host": e.step_overhead_s + e.seq_overhead_s * work.seqs, "comm": self.comm_time(work)}
        for c in CLASSES:
            out[c] = 0.0
        for lw in work.layers:
            for c in CLASSES:
                if c == "topk":
                    out[c] += lw.count * lw.bytes[c] / (self.bandwidth * e.topk)
                else:
                    imb = e.expert_imbalance if c == "moe" else 1.0
                    out[c] += lw.count * max(lw.flops[c] * imb / rates[c], lw.bytes[c] / mem)
        return out

    def comm_time(self, work: StepWork) -> float:
        e, tp, ep = self.eff, self.tp, self.ep
        world = max(tp, ep)
        t = 0.0
        if work.tp_collectives:
            # ring all-reduce: 2 (n - 1) / n of the payload over the slowest link
            t += 2 * (tp - 1) / tp * work.tp_allreduce_bytes / self._link(tp)
            t += work.tp_collectives * e.collective_latency_s
        if work.ep_collectives:
            t += (
                work.ep_alltoall_bytes * e.expert_imbalance / self._link(ep)
                + work.ep_collectives * e.collective_latency_s
            )
        if work.world_collectives:
            t += work.world_gather_bytes / self._link(world) + work.world_collectives * e.collective_latency_s
        return t

    def work(self, chunks: Chunks, decode_seqs: int, decode_context: float, k: int, accepted: float) -> StepWork:
        return step_work(self.ops, chunks, decode_seqs, decode_context, k, accepted, self.tp, self.ep, mtp=self.mtp)

    def _step_time(self, chunks: Chunks, decode_seqs: int, decode_context: float, k: int, accepted: float) -> float:
        return self.time_of(self.work(chunks, decode_seqs, decode_context, k, accepted))

    def step_time(
        self, chunks: Chunks, decode_seqs: int, decode_context: float, k: int, accepted: float = 1.0
    ) -> float:
        return self._cached(chunks, decode_seqs, decode_context, k, accepted)

    def describe(self) -> str:
        rates = ", ".join(f"{c} {r / 1e12:.0f}" for c, r in self.rates().items())
        return (
            f"analytic roofline on {self.hardware.key} (tp {self.tp}, ep {self.ep}, weights {self.ops.weights}, "
            f"KV {self.ops.kv}): effective TFLOP/s {rates}; memory {self.bandwidth * self.eff.memory / 1e12:.2f} TB/s"
        )


# ---- fitting the analytic model to a profile ----
FIT_PARAMS = (
    "gemm", "moe", "attention", "indexer", "topk", "memory", "step_overhead_s", "seq_overhead_s", "layer_floor_s",
)  # fmt: skip


@dataclass
class FitResult:
    efficiencies: Efficiencies
    fitted: list[str]  # parameters the profile could tell apart (the rest kept their defaults)
    rms_log_error: float  # root mean square of log(predicted / measured) over the profile's points
    max_rel_error: float
    points: int


def fit_efficiencies(
    profile: Profile,
    hardware: Hardware,
    weights: WeightDtype | None = None,
    kv: KVDtype | None = None,
    base: Efficiencies | None = None,
    sweeps: int = 6,
) -> FitResult:
    """Efficiencies that make the analytic model reproduce the profile's step times (least squares in log time,
    coordinate descent). Parameters whose operator class is under 2% of every point's predicted time are left at
    their defaults (the profile says nothing about them). On a CPU, the fitted fractions are of the nominal peaks."""
    fmt = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(profile.dtype, "bf16")
    weights, kv = weights or fmt, kv or fmt
    base = base or Efficiencies()
    nominal = (CPU_NOMINAL_FLOPS, CPU_NOMINAL_BYTES_PER_S) if hardware.calibrated_only else None
    model = AnalyticCostModel(
        profile.config, hardware, weights, kv, profile.tensor_parallel_size, profile.expert_parallel_size,
        mtp=any(p.k > 0 for p in profile.decode), efficiencies=base, nominal=nominal,
    )  # fmt: skip
    works, measured = [], []
    for p in profile.prefill:
        works.append(model.work(((p.tokens, p.context),), 0, 0.0, 0, 1.0))
        measured.append(p.seconds)
    for p in profile.decode:
        works.append(model.work((), p.batch, float(p.context), p.k, 1.0 + 0.8 * p.k))
        measured.append(p.seconds)
    y = np.log(np.array(measured))
    gemm_key = "gemm_fp8" if weights == "fp8" else "gemm"
    names = [gemm_key if n == "gemm" else n for n in FIT_PARAMS]

    def predict(values: dict[str, float]) -> np.ndarray:
        model.eff = base.model_copy(update=values)
        return np.array([model.time_of(w) for w in works])

    current = {n: getattr(base, n) for n in names}
    # which parameters matter: the time share of their class at some point
    shares = _class_shares(model, works)
    host = ("step_overhead_s", "seq_overhead_s", "layer_floor_s")
    active = [n for n in names if n in host or shares.get(_class_of(n), 0) > 0.02]
    for _ in range(sweeps):
        for name in active:
            current[name] = _golden(lambda v, name=name: _loss(predict({**current, name: v}), y), current[name])
    pred = predict(current)
    rel = np.abs(pred / np.exp(y) - 1.0)
    eff = base.model_copy(update=current)
    return FitResult(eff, active, float(np.sqrt(np.mean((np.log(pred) - y) ** 2))), float(rel.max()), len(works))


def _class_of(name: str) -> str:
    return {"gemm_fp8": "gemm", "memory": "memory"}.get(name, name)


def _class_shares(model: AnalyticCostModel, works: list[StepWork]) -> dict[str, float]:
    """Per class, its largest share of a point's predicted time ("memory": of the byte-bound part)."""
    shares: dict[str, float] = {}
    mem = model.bandwidth * model.eff.memory
    for w in works:
        total = model.time_of(w)
        for c, t in model.class_times(w).items():
            shares[c] = max(shares.get(c, 0.0), t / total)
        byte_time = sum(lw.count * sum(lw.bytes[c] for c in CLASSES if c != "topk") for lw in w.layers) / mem
        shares["memory"] = max(shares.get("memory", 0.0), byte_time / total)
    return shares


def _loss(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum((np.log(np.maximum(pred, 1e-12)) - y) ** 2))


def _golden(f, x0: float, span: float = 100.0, iters: int = 40) -> float:
    """Minimize f over [x0 / span, x0 * span] on a log scale (golden-section search)."""
    lo, hi = math.log(max(x0, 1e-9) / span), math.log(max(x0, 1e-9) * span)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(math.exp(a)), f(math.exp(b))
    for _ in range(iters):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = f(math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(math.exp(b))
    best = math.exp((lo + hi) / 2)
    return best if f(best) <= f(x0) else x0
