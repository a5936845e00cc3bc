"""The SLO autoscaling policies: their arithmetic without Ray, then the classes on real `AutoscalingContext`s (the
stats-board post patched out), then that Serve resolves the policy path, as its controller would."""

import logging
import subprocess
import sys

import pytest
from ray.serve._private.autoscaling_state import _resolve_policy_callable
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from glmserve.cluster import autoscaling
from glmserve.cluster.autoscaling import (
    DecodeLoad,
    DecodeSLOPolicy,
    PrefillLoad,
    PrefillSLOPolicy,
    decide_decode,
    decide_prefill,
)

SLO_TPOT = 0.05

# a decode replica at rest: nothing in the way of any signal
IDLE_DECODE = {
    "kv_cache_usage": 0.0,
    "num_requests_running": 0.0,
    "num_requests_waiting": 0.0,
    "queued_prompt_tokens": 0.0,
    "prefill_tokens_per_s": 0.0,
    "tpot_s": 0.0,
    "max_num_seqs": 64.0,
}
# comfortably inside every target: 2 replicas of it need 2 replicas at most
STEADY_DECODE = IDLE_DECODE | {
    "kv_cache_usage": 0.5,
    "num_requests_running": 24.0,
    "tpot_s": 0.03,
    "queued_prompt_tokens": 1000.0,
    "prefill_tokens_per_s": 10000.0,
}


def decode(*replicas: dict, target: int | None = None, handle_queued: float = 0.0, **kwargs):
    load = DecodeLoad(len(replicas) if target is None else target, replicas, handle_queued)
    return decide_decode(load, SLO_TPOT, **kwargs)


def prefill(*replicas: dict, target: int | None = None, handle_queued: float = 0.0, slo_ttft_s: float = 1.0):
    load = PrefillLoad(len(replicas) if target is None else target, replicas, handle_queued)
    return decide_prefill(load, slo_ttft_s, headroom=0.8)


# --- decode arithmetic ---------------------------------------------------------------------------------------------


def test_steady_decode_holds():
    d = decode(STEADY_DECODE, STEADY_DECODE, slo_ttft_s=1.0)
    assert d.desired == 2
    assert set(d.signals) == {"kv_cache", "running", "tpot", "ttft"}


@pytest.mark.parametrize(
    ("step", "signal", "desired"),
    [
        ({"kv_cache_usage": 0.9}, "kv_cache", 3),  # 1.8 / 0.75 = 2.4
        ({"num_requests_running": 64.0}, "running", 3),  # 128 / (0.75 * 64) = 2.67
        ({"num_requests_running": 40.0, "num_requests_waiting": 30.0}, "running", 3),  # a queue behind the batch
        ({"tpot_s": 0.1}, "tpot", 4),  # 2 * 0.1 / 0.05
        ({"queued_prompt_tokens": 25000.0}, "ttft", 5),  # 50000 / (10000 * 1.0)
    ],
)
def test_a_load_step_scales_decode_up_through_each_signal(step, signal, desired):
    d = decode(STEADY_DECODE | step, STEADY_DECODE | step, slo_ttft_s=1.0)
    assert (d.desired, d.reason) == (desired, signal)
    assert d.signals[signal] == max(d.signals.values())


def test_requests_queued_at_handles_count_as_decode_demand():
    assert decode(STEADY_DECODE, STEADY_DECODE).desired == 2
    d = decode(STEADY_DECODE, STEADY_DECODE, handle_queued=100.0)  # (48 + 100) / 48
    assert (d.desired, d.reason) == (4, "running")


def test_idle_decode_goes_to_one():
    d = decode(*[IDLE_DECODE] * 4, slo_ttft_s=1.0)
    assert (d.desired, d.reason) == (1, "idle")
    assert "tpot" not in d.signals  # no tokens decoded: no TPOT to judge by


def test_ttft_signal_counts_the_queue_and_only_when_colocated():
    desired = [
        decode(STEADY_DECODE | {"queued_prompt_tokens": q}, slo_ttft_s=0.5).desired for q in (0, 5000, 20000, 80000)
    ]
    assert desired == sorted(desired) and desired[0] < desired[-1] == 16  # 80000 / (10000 * 0.5)
    assert "ttft" not in decode(STEADY_DECODE | {"queued_prompt_tokens": 80000.0}).signals


def test_ttft_without_a_measured_rate_does_not_vote():
    d = decode(STEADY_DECODE | {"queued_prompt_tokens": 1e6, "prefill_tokens_per_s": 0.0}, slo_ttft_s=1.0)
    assert "ttft" not in d.signals and d.desired == 1


def test_exact_figures_are_not_rounded_up_by_float_error():
    assert decode(*[IDLE_DECODE | {"kv_cache_usage": 0.75}] * 3).desired == 3


def test_missing_decode_metrics_hold_the_count():
    assert (decode({}, {}, {}).desired, decode({}, {}, {}).reason) == (3, "no_metrics")
    assert decode(target=2).desired == 2  # no running replica at all
    # a replica without stats (just started) may not be counted as idle: no scale-down...
    d = decode(IDLE_DECODE, IDLE_DECODE, {})
    assert (d.desired, d.reason) == (3, "partial_metrics")
    # ...but the ones that reported can still scale it up
    assert decode(STEADY_DECODE | {"tpot_s": 0.2}, {}).desired == 8  # 2 * 0.2 / 0.05


def test_a_replica_missing_some_keys_votes_with_the_rest():
    d = decode({"kv_cache_usage": 0.9}, {"kv_cache_usage": 0.9})
    assert (d.desired, d.reason, set(d.signals)) == (3, "kv_cache", {"kv_cache"})


# --- prefill arithmetic --------------------------------------------------------------------------------------------


def prefill_replica(queued: float, rate: float = 8000.0, running: float = 1.0, waiting: float = 3.0) -> dict:
    return {
        "queued_prompt_tokens": queued,
        "prefill_tokens_per_s": rate,
        "num_requests_running": running,
        "num_requests_waiting": waiting,
    }


def test_prefill_scales_with_the_backlog():
    # 2 * 16000 tokens / (8000 tok/s * 1 s * 0.8) = 5
    d = prefill(prefill_replica(16000), prefill_replica(16000))
    assert (d.desired, d.reason, d.signals) == (5, "backlog", {"backlog": 5.0})
    assert prefill(prefill_replica(1000), prefill_replica(1000)).desired == 1
    # a tighter SLO needs more replicas for the same backlog
    assert prefill(prefill_replica(16000), prefill_replica(16000), slo_ttft_s=0.5).desired == 10


def test_prefill_counts_requests_queued_at_handles():
    # 4 pending requests hold 16000 tokens: 4000 per request, so 8 queued at handles are 32000 more
    d = prefill(prefill_replica(16000), handle_queued=8.0)
    assert d.inputs["backlog_tokens"] == 48000
    assert d.desired == 8  # 48000 / 6400 = 7.5


def test_prefill_ignores_decode_load():
    busy_decode = {"kv_cache_usage": 1.0, "num_requests_running": 256.0, "tpot_s": 1.0, "max_num_seqs": 64.0}
    d = prefill(prefill_replica(0.0, running=0.0, waiting=0.0) | busy_decode, target=3)
    assert (d.desired, d.reason) == (0, "idle")  # Serve bounds it to min_replicas


def test_prefill_without_a_measured_rate():
    # a backlog it cannot size: hold
    d = prefill(prefill_replica(5000, rate=0.0), target=2)
    assert (d.desired, d.reason) == (2, "no_rate")
    # requests queued at handles too: every replica is full, add one
    d = prefill(prefill_replica(5000, rate=0.0), prefill_replica(5000, rate=0.0), handle_queued=4.0)
    assert (d.desired, d.reason) == (3, "no_rate")
    # nothing to do: toward min
    assert prefill(prefill_replica(0.0, rate=0.0, running=0.0, waiting=0.0), target=2).desired == 0


def test_missing_prefill_metrics_hold_the_count():
    assert (prefill({}, {}).desired, prefill({}, {}).reason) == (2, "no_metrics")
    d = prefill(prefill_replica(0.0, running=0.0, waiting=0.0), {})
    assert (d.desired, d.reason) == (2, "partial_metrics")
    # requests queued at handles that no pending prompt on the replicas can size: do not scale down
    d = prefill(prefill_replica(0.0, running=0.0, waiting=0.0), handle_queued=5.0, target=2)
    assert (d.desired, d.reason) == (2, "unsized_handle_queue")


# --- the policy classes on Serve's context -------------------------------------------------------------------------


def context(
    per_replica: list[dict] | None,
    *,
    current: int | None = None,
    target: int | None = None,
    queued: float = 0.0,
    now: float = 1000.0,
    deployment: str = "decode",
) -> AutoscalingContext:
    n = len(per_replica or []) if current is None else current
    deployment_id = DeploymentID(name=deployment, app_name="app")
    replicas = [ReplicaID(unique_id=f"r{i}", deployment_id=deployment_id) for i in range(n)]
    metrics = None
    if per_replica is not None:
        metrics = {}
        for replica, stats in zip(replicas, per_replica, strict=False):
            for name, value in stats.items():
                metrics.setdefault(name, {})[replica] = value
    return AutoscalingContext(
        deployment_id=deployment_id,
        deployment_name=deployment,
        app_name="app",
        current_num_replicas=n,
        target_num_replicas=n if target is None else target,
        running_replicas=replicas,
        total_num_requests=0.0,
        total_queued_requests=queued,
        aggregated_metrics=metrics,
        raw_metrics=None,
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=now,
        config=AutoscalingConfig(min_replicas=1, max_replicas=8, upscale_delay_s=0, downscale_delay_s=0),
    )


@pytest.fixture(autouse=True)
def _policy_log_to_caplog(caplog):
    """The policy logs under "ray.serve", which does not propagate to the root logger caplog listens on."""
    autoscaling.logger.addHandler(caplog.handler)
    yield
    autoscaling.logger.removeHandler(caplog.handler)


@pytest.fixture
def posts(monkeypatch) -> list[tuple[str, str, dict]]:
    sent: list[tuple[str, str, dict]] = []
    monkeypatch.setattr(autoscaling._SLOPolicy, "_send", lambda self, app, key, stats: sent.append((app, key, stats)))
    return sent


def test_decode_policy_scales_logs_and_exports(posts, caplog):
    policy = DecodeSLOPolicy(slo_tpot_s=SLO_TPOT)
    with caplog.at_level(logging.DEBUG, logger=autoscaling.logger.name):
        desired, state = policy(context([STEADY_DECODE | {"kv_cache_usage": 0.9}] * 2))
    assert (desired, state) == (3, {})
    [record] = caplog.records
    assert record.levelno == logging.INFO and "desired 3 (kv_cache)" in record.getMessage()
    assert "kv_cache_usage_sum" in record.getMessage()  # logged with its inputs
    [(app, key, stats)] = posts
    assert (app, key) == ("app", "autoscaler:decode")
    assert stats == {
        "role": "decode",
        "autoscaling_desired_replicas": 3.0,
        "autoscaling_current_replicas": 2.0,
        "autoscaling_signal_kv_cache": pytest.approx(2.4),
        "autoscaling_signal_running": pytest.approx(1.0),
        "autoscaling_signal_tpot": pytest.approx(1.2),
    }


def test_a_held_count_logs_at_debug_and_a_repeated_wish_logs_info_once(posts, caplog):
    policy = DecodeSLOPolicy(slo_tpot_s=SLO_TPOT)
    with caplog.at_level(logging.DEBUG, logger=autoscaling.logger.name):
        assert policy(context([STEADY_DECODE] * 2))[0] == 2
        for t in range(3):  # the same wish every tick while Serve's upscale delay runs
            assert policy(context([STEADY_DECODE | {"tpot_s": 0.1}] * 2, now=1001.0 + t))[0] == 4
    assert [r.levelno for r in caplog.records] == [logging.DEBUG, logging.INFO, logging.DEBUG, logging.DEBUG]


@pytest.mark.parametrize("metrics", [None, [{}, {}, {}], [{"kv_cache_usage": float("nan")}] * 3])
def test_policies_hold_without_metrics(posts, metrics):
    for policy in (DecodeSLOPolicy(slo_tpot_s=SLO_TPOT), PrefillSLOPolicy(slo_ttft_s=1.0)):
        assert policy(context(metrics, current=3))[0] == 3


def test_a_failing_decision_holds_the_count(posts, caplog):
    policy = DecodeSLOPolicy(slo_tpot_s=SLO_TPOT)
    with caplog.at_level(logging.DEBUG, logger=autoscaling.logger.name):
        assert policy(context([{"kv_cache_usage": "high"}] * 2, target=3)) == (3, {})
    assert caplog.records[0].levelno == logging.WARNING and caplog.records[0].exc_info


def test_prefill_policy_scales_from_backlog_and_handle_queue(posts, caplog):
    policy = PrefillSLOPolicy(slo_ttft_s=1.0)
    with caplog.at_level(logging.INFO, logger=autoscaling.logger.name):
        desired, _ = policy(context([prefill_replica(16000)], queued=8.0, deployment="prefill"))
    assert desired == 8
    assert "desired 8 (backlog)" in caplog.records[0].getMessage()
    assert posts[0][1:] == (
        "autoscaler:prefill",
        {
            "role": "prefill",
            "autoscaling_desired_replicas": 8.0,
            "autoscaling_current_replicas": 1.0,
            "autoscaling_signal_backlog": 7.5,
        },
    )


def test_exports_at_most_once_a_second(posts):
    policy = DecodeSLOPolicy(slo_tpot_s=SLO_TPOT)
    for now in (1000.0, 1000.1, 1000.9, 1001.0, 1001.5, 1002.2):
        policy(context([STEADY_DECODE], now=now))
    assert len(posts) == 3


def test_a_failing_export_does_not_break_autoscaling(monkeypatch, caplog):
    def unreachable(self, app, key, stats):
        raise ConnectionError("no Ray here")

    monkeypatch.setattr(autoscaling._SLOPolicy, "_send", unreachable)
    with caplog.at_level(logging.DEBUG, logger=autoscaling.logger.name):
        assert DecodeSLOPolicy(slo_tpot_s=SLO_TPOT)(context([STEADY_DECODE | {"tpot_s": 0.2}]))[0] == 4
    assert any("stats board failed" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)


def test_through_serves_wrapper(posts):
    # what the controller runs: the policy wrapped with min/max, factors and delays (0 here)
    wrapped = _apply_autoscaling_config(DecodeSLOPolicy(slo_tpot_s=SLO_TPOT))
    desired, state = wrapped(context([STEADY_DECODE | {"kv_cache_usage": 0.9}] * 2))
    assert desired == 3 and isinstance(state, dict)
    assert wrapped(context([IDLE_DECODE] * 3))[0] == 1


def test_bad_settings_fail_at_construction():
    with pytest.raises(ValueError):
        DecodeSLOPolicy(slo_tpot_s=0)
    with pytest.raises(ValueError):
        DecodeSLOPolicy(slo_tpot_s=0.1, target_kv_cache_usage=1.5)
    with pytest.raises(ValueError):
        PrefillSLOPolicy(slo_ttft_s=1.0, headroom=0)


# --- Serve resolves the policy path --------------------------------------------------------------------------------

POLICY = {"policy_function": "glmserve.cluster.autoscaling:DecodeSLOPolicy", "policy_kwargs": {"slo_tpot_s": 0.2}}


def test_the_policy_path_resolves():
    config = AutoscalingConfig(min_replicas=1, max_replicas=4, policy=POLICY)
    assert config.policy.get_policy() is DecodeSLOPolicy
    policy = _resolve_policy_callable(config.policy)  # how the controller instantiates a class policy
    assert isinstance(policy, DecodeSLOPolicy) and policy.slo_tpot_s == 0.2


def test_the_policy_unpickles_where_glmserve_is_not_importable(tmp_path):
    # Serve pickles the policy module by value for its controller: it must load and decide without glmserve there
    pickled = tmp_path / "policy.pkl"
    pickled.write_bytes(AutoscalingConfig(policy=POLICY).policy.get_serialized_policy_def())
    script = f"""
import pickle, sys
sys.modules["glmserve"] = None
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingContext
policy = pickle.loads(open({str(pickled)!r}, "rb").read())(slo_tpot_s=0.2)
d = DeploymentID(name="decode", app_name="app")
r = ReplicaID(unique_id="r0", deployment_id=d)
metrics = {{"tpot_s": {{r: 0.5}}}}
ctx = AutoscalingContext(d, "decode", "app", 1, 1, [r], 0.0, 0.0, metrics, None, 1, 8, {{}}, None, None, 0.0, None)
print(policy(ctx)[0])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"  # 1 * 0.5 / 0.2 = 2.5
