"""SLO-driven Ray Serve autoscaling policies, one per role.

Serve's default policy scales on ongoing requests per replica, which says little about an LLM replica: a decode
replica with 8 long sequences can be out of KV blocks while one with 64 short ones idles, and prefill work is prompt
tokens, not requests. These policies read the replicas' engine stats (`record_autoscaling_stats`), turn each signal
into "replicas needed" and take the largest. The prefill signals count queued work, not only work in flight: time a
prompt spends waiting is part of its TTFT.

Use: `AutoscalingConfig(policy={"policy_function": "glmserve.cluster.autoscaling:DecodeSLOPolicy",
"policy_kwargs": {"slo_tpot_s": 0.05}})`. Serve applies min/max replicas, the scaling factors and the up/downscale
delays to what the policy returns; the arithmetic lives in `decide_decode` / `decide_prefill` (no Ray needed).
"""

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ray.serve.config import AutoscalingContext

# A child of Serve's logger: policies run in the Serve controller, whose log takes only "ray.serve" records (a
# module logger's INFO lines, the decisions, were dropped there).
logger = logging.getLogger("ray.serve").getChild(__name__)

EXPORT_INTERVAL_S = 1.0  # the controller ticks every ~0.1 s; /metrics needs far less
_EPS = 1e-9  # so that 3 * 0.75 / 0.75 = 3.0000000000000004 asks for 3 replicas, not 4

ReplicaStats = Mapping[str, float]  # one replica's custom metrics; empty when it has not reported yet


@dataclass(frozen=True)
class DecodeLoad:
    target_replicas: int  # Serve's current target: what "hold" returns
    replicas: tuple[ReplicaStats, ...]  # one per running replica
    handle_queued_requests: float = 0.0  # queued at handles, not yet on any replica


@dataclass(frozen=True)
class PrefillLoad:
    target_replicas: int
    replicas: tuple[ReplicaStats, ...]
    handle_queued_requests: float = 0.0


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str  # the signal that decided, or why the count is held: no_metrics, partial_metrics, no_rate, idle...
    signals: dict[str, float] = field(default_factory=dict)  # replicas needed, per signal that could be computed
    inputs: dict[str, float] = field(default_factory=dict)  # the aggregates the signals came from (for the log)


def _values(replicas: tuple[ReplicaStats, ...], key: str) -> list[float]:
    return [r[key] for r in replicas if key in r]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _finish(
    signals: dict[str, float], inputs: dict[str, float], load: DecodeLoad | PrefillLoad, floor: int
) -> Decision:
    """ceil of the largest figure (at least `floor`); never below the target while a running replica is unreported:
    its load is unknown, and a replica that just started must not trigger a scale-down."""
    reason, figure = max(signals.items(), key=lambda kv: kv[1])
    if figure <= 0:
        reason = "idle"
    desired = max(floor, math.ceil(figure - _EPS))
    if desired < load.target_replicas and not all(load.replicas):
        desired, reason = load.target_replicas, "partial_metrics"
    return Decision(desired, reason, signals, inputs)


def decide_decode(
    load: DecodeLoad,
    slo_tpot_s: float,
    target_kv_cache_usage: float = 0.75,
    target_running_fraction: float = 0.75,
    slo_ttft_s: float | None = None,
) -> Decision:
    """Replicas needed by each signal, over the replicas that reported its inputs:
    - kv_cache: sum(kv_cache_usage) / target_kv_cache_usage
    - running: (sum(running + waiting) + handle-queued) / (target_running_fraction * mean(max_num_seqs)); waiting
      and handle-queued requests are counted because they want a batch slot too (a full batch shows only
      running = max_num_seqs, however long the queue behind it)
    - tpot: replicas * mean(tpot_s) / slo_tpot_s, over replicas that decoded (tpot_s > 0)
    - ttft (only with slo_ttft_s: colocated replicas prefill too): sum(queued_prompt_tokens) /
      (mean(prefill_tokens_per_s) * slo_ttft_s), the queued prompts drained within the TTFT SLO
    Desired = ceil(largest), at least 1; held at the target without any figure.
    """
    reporting = tuple(r for r in load.replicas if r)
    signals: dict[str, float] = {}
    inputs: dict[str, float] = {"replicas": len(load.replicas), "reporting": len(reporting)}
    if kv := _values(reporting, "kv_cache_usage"):
        inputs["kv_cache_usage_sum"] = sum(kv)
        signals["kv_cache"] = sum(kv) / target_kv_cache_usage
    caps = [c for c in _values(reporting, "max_num_seqs") if c > 0]
    running = [
        r["num_requests_running"] + r.get("num_requests_waiting", 0.0) for r in reporting if "num_requests_running" in r
    ]
    if running and caps:
        inputs["sequences"] = sum(running) + load.handle_queued_requests
        inputs["max_num_seqs"] = _mean(caps)
        signals["running"] = inputs["sequences"] / (target_running_fraction * inputs["max_num_seqs"])
    if tpots := [t for t in _values(reporting, "tpot_s") if t > 0]:
        inputs["tpot_s"] = _mean(tpots)
        signals["tpot"] = len(load.replicas) * inputs["tpot_s"] / slo_tpot_s
    if slo_ttft_s is not None:
        queued = _values(reporting, "queued_prompt_tokens")
        rates = [r for r in _values(reporting, "prefill_tokens_per_s") if r > 0]
        if queued and rates:
            inputs["queued_prompt_tokens"] = sum(queued)
            inputs["prefill_tokens_per_s"] = _mean(rates)
            signals["ttft"] = sum(queued) / (inputs["prefill_tokens_per_s"] * slo_ttft_s)
    if not signals:
        return Decision(load.target_replicas, "no_metrics", {}, inputs)
    return _finish(signals, inputs, load, 1)


def decide_prefill(load: PrefillLoad, slo_ttft_s: float, headroom: float = 0.8) -> Decision:
    """Enough replicas to drain the prompt backlog within the TTFT SLO, with headroom:
    desired = ceil(backlog / (mean(prefill_tokens_per_s) * slo_ttft_s * headroom)), where
    backlog = sum(queued_prompt_tokens) + handle-queued requests * sum(queued_prompt_tokens) / sum(running + waiting)
    (prompts queued at handles are assumed as long, on average, as those the replicas already admitted). No backlog:
    0, which Serve bounds to min_replicas after its downscale delay. Decode load plays no part.
    """
    reporting = tuple(r for r in load.replicas if r)
    inputs: dict[str, float] = {"replicas": len(load.replicas), "reporting": len(reporting)}
    if not reporting:
        return Decision(load.target_replicas, "no_metrics", {}, inputs)
    queued = sum(_values(reporting, "queued_prompt_tokens"))
    pending = sum(_values(reporting, "num_requests_running")) + sum(_values(reporting, "num_requests_waiting"))
    handle_queued = load.handle_queued_requests
    sized = handle_queued <= 0 or (pending > 0 and queued > 0)
    backlog = queued + (handle_queued * queued / pending if handle_queued > 0 and sized else 0.0)
    inputs.update(backlog_tokens=backlog, handle_queued_requests=handle_queued)
    rates = [r for r in _values(reporting, "prefill_tokens_per_s") if r > 0]
    if not rates:
        if backlog <= 0 and handle_queued <= 0:
            return _finish({"backlog": 0.0}, inputs, load, 0)
        # No replica has measured its rate yet, so the backlog cannot be sized. Hold; but requests queued at handles
        # mean every replica is at max_ongoing_requests, so add one (relative to the running count, so that ticks
        # before it starts do not add more; Serve's upscale delay still applies).
        desired = max(load.target_replicas, len(load.replicas) + 1) if handle_queued > 0 else load.target_replicas
        return Decision(desired, "no_rate", {}, inputs)
    inputs["prefill_tokens_per_s"] = _mean(rates)
    signals = {"backlog": backlog / (inputs["prefill_tokens_per_s"] * slo_ttft_s * headroom)}
    decision = _finish(signals, inputs, load, 0)
    if not sized and decision.desired < load.target_replicas:
        # requests wait at handles but no replica has a pending prompt to size them by (stats lag): do not scale down
        return Decision(load.target_replicas, "unsized_handle_queue", decision.signals, inputs)
    return decision


def replica_stats(ctx: AutoscalingContext) -> tuple[dict[str, float], ...]:
    """The ctx's per-metric maps turned into one stats dict per running replica (NaN/None values dropped)."""
    metrics = ctx.aggregated_metrics or {}
    stats: tuple[dict[str, float], ...] = tuple({} for _ in ctx.running_replicas)
    for name, per_replica in metrics.items():
        for i, replica in enumerate(ctx.running_replicas):
            value = per_replica.get(replica)
            if value is not None and math.isfinite(value):
                stats[i][name] = float(value)
    return stats


class _SLOPolicy:
    """Reads the ctx, decides, logs and exports; a failure here must never stop the controller's autoscaling loop."""

    role: str

    def __init__(self) -> None:
        self._boards: dict[str, Any] = {}  # app name -> stats board handle
        self._last_export: dict[str, float] = {}  # board key -> time of the last post
        self._last_info: tuple[int, int] | None = None  # (desired, target) of the last INFO line
        self._last_error: str | None = None

    def _decide(self, ctx: AutoscalingContext) -> Decision:
        raise NotImplementedError

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        try:
            decision = self._decide(ctx)
        except Exception as e:  # an exception here would fail the controller's whole update step, every tick
            if repr(e) != self._last_error:
                logger.warning(
                    "%s autoscaling of %s failed: holding %d",
                    self.role,
                    ctx.deployment_name,
                    ctx.target_num_replicas,
                    exc_info=True,
                )
            self._last_error = repr(e)
            return ctx.target_num_replicas, {}
        self._last_error = None
        self._log(ctx, decision)
        self._export(ctx, decision)
        return decision.desired, {}

    def _log(self, ctx: AutoscalingContext, decision: Decision) -> None:
        # INFO once per change: Serve only acts after upscale/downscale_delay_s, so the same wish repeats every tick
        key = (decision.desired, ctx.target_num_replicas)
        level = (
            logging.INFO if decision.desired != ctx.target_num_replicas and key != self._last_info else logging.DEBUG
        )
        if level == logging.INFO:
            self._last_info = key
        elif decision.desired == ctx.target_num_replicas:
            self._last_info = None
        logger.log(
            level,
            "%s autoscaling %s/%s: desired %d (%s), current %d, target %d, signals %s, inputs %s",
            self.role,
            ctx.app_name,
            ctx.deployment_name,
            decision.desired,
            decision.reason,
            ctx.current_num_replicas,
            ctx.target_num_replicas,
            {k: round(v, 3) for k, v in decision.signals.items()},
            {k: round(v, 3) for k, v in decision.inputs.items()},
        )

    def _export(self, ctx: AutoscalingContext, decision: Decision) -> None:
        key = f"autoscaler:{ctx.deployment_name}"
        now = ctx.current_time if ctx.current_time is not None else time.monotonic()
        if 0 <= now - self._last_export.get(key, -math.inf) < EXPORT_INTERVAL_S:
            return
        self._last_export[key] = now
        stats: dict[str, Any] = {
            "role": self.role,
            "autoscaling_desired_replicas": float(decision.desired),
            "autoscaling_current_replicas": float(ctx.current_num_replicas),
            **{f"autoscaling_signal_{name}": float(figure) for name, figure in decision.signals.items()},
        }
        try:
            self._send(ctx.app_name, key, stats)
        except Exception:
            logger.debug("%s autoscaling: exporting the decision to the stats board failed", self.role, exc_info=True)

    def _send(self, app_name: str, key: str, stats: dict[str, Any]) -> None:
        board = self._boards.get(app_name)
        if board is None:
            # imported here: Serve pickles this module by value into its controller, where autoscaling must keep
            # working even if glmserve cannot be imported
            from glmserve.cluster import stats_board

            board = self._boards[app_name] = stats_board.get_or_create(app_name)
        board.post.remote(key, stats)  # fire-and-forget: the controller's loop must not wait on the board


class DecodeSLOPolicy(_SLOPolicy):
    """Decode replicas: KV use, running batch, TPOT against its SLO and, colocated (slo_ttft_s set), the prefill
    backlog against the TTFT SLO. See `decide_decode`."""

    role = "decode"

    def __init__(
        self,
        slo_tpot_s: float,
        target_kv_cache_usage: float = 0.75,
        target_running_fraction: float = 0.75,
        slo_ttft_s: float | None = None,
    ) -> None:
        super().__init__()
        if slo_tpot_s <= 0 or (slo_ttft_s is not None and slo_ttft_s <= 0):
            raise ValueError(f"SLOs must be > 0 (slo_tpot_s={slo_tpot_s}, slo_ttft_s={slo_ttft_s})")
        if not (0 < target_kv_cache_usage <= 1 and 0 < target_running_fraction <= 1):
            raise ValueError(
                f"targets must be in (0, 1] (target_kv_cache_usage={target_kv_cache_usage}, "
                f"target_running_fraction={target_running_fraction})"
            )
        self.slo_tpot_s = slo_tpot_s
        self.target_kv_cache_usage = target_kv_cache_usage
        self.target_running_fraction = target_running_fraction
        self.slo_ttft_s = slo_ttft_s

    def _decide(self, ctx: AutoscalingContext) -> Decision:
        load = DecodeLoad(ctx.target_num_replicas, replica_stats(ctx), float(ctx.total_queued_requests or 0.0))
        return decide_decode(
            load, self.slo_tpot_s, self.target_kv_cache_usage, self.target_running_fraction, self.slo_ttft_s
        )


class PrefillSLOPolicy(_SLOPolicy):
    """Prefill replicas: the prompt-token backlog (queued at replicas and at handles) against the TTFT SLO. See
    `decide_prefill`."""

    role = "prefill"

    def __init__(self, slo_ttft_s: float, headroom: float = 0.8) -> None:
        super().__init__()
        if slo_ttft_s <= 0 or not 0 < headroom <= 1:
            raise ValueError(f"need slo_ttft_s > 0 and headroom in (0, 1] (got {slo_ttft_s}, {headroom})")
        self.slo_ttft_s = slo_ttft_s
        self.headroom = headroom

    def _decide(self, ctx: AutoscalingContext) -> Decision:
        load = PrefillLoad(ctx.target_num_replicas, replica_stats(ctx), float(ctx.total_queued_requests or 0.0))
        return decide_prefill(load, self.slo_ttft_s, self.headroom)
