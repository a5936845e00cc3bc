"""The P/D simulator against closed forms, the predict/search commands and their errors."""

import json
from dataclasses import dataclass

import pytest

import glmserve.planner.simulator as simulator
from glmserve.bench.serve import BenchServeConfig, RequestResult, summarize
from glmserve.cli import main
from glmserve.cluster.serving_config import ServingConfig
from glmserve.engine.engine_args import EngineArgs
from glmserve.planner.cluster import InfeasibleConfig, PlannerSettings, build_deployment
from glmserve.planner.cost_model import TransferModel
from glmserve.planner.hardware import UnknownHardware
from glmserve.planner.predict import compare, load_measured, predict, request_results
from glmserve.planner.search import SearchSpace, pareto_front, run_search
from glmserve.planner.simulator import ClusterSimulator, ClusterSpec, Overheads, RoleSpec
from glmserve.planner.workload import SimRequest

ZERO = Overheads(ingress_s=0, egress_s=0, prefill_rpc_s=0, completion_s=0)


@dataclass
class LinearCost:
    """A step costs a fixed part, per prefill token, per decoding sequence, per draft verified."""

    fixed: float = 0.01
    per_token: float = 1e-4
    per_seq: float = 2e-3
    per_draft: float = 1e-3
    kind: str = "test"

    def step_time(self, chunks, decode_seqs, decode_context, k, accepted=1.0) -> float:
        return (
            self.fixed + self.per_token * sum(n for n, _ in chunks) + decode_seqs * (self.per_seq + k * self.per_draft)
        )

    def describe(self) -> str:
        return "linear"


def role(replicas=1, blocks=4096, seqs=256, budget=2048, k=0, acceptance=(0.8,), cost=None, world=1) -> RoleSpec:
    args = EngineArgs(max_num_seqs=seqs, max_num_batched_tokens=budget, num_speculative_tokens=k,
                      adaptive_speculation=False)  # fmt: skip
    return RoleSpec(args=args, cost=cost or LinearCost(), num_blocks=blocks, max_model_len=blocks * 64,
                    replicas=replicas, world=world, acceptance=acceptance)  # fmt: skip


def cluster(decode: RoleSpec, prefill: RoleSpec | None = None, threshold=256, overheads=ZERO, transfer=None):
    return ClusterSpec(
        decode=decode, prefill=prefill, local_prefill_threshold=threshold,
        transfer=transfer or TransferModel(1e-3, 1e9), transfer_bytes_per_token=1000.0, transfer_layers=4,
        overheads=overheads,
    )  # fmt: skip


def run(spec: ClusterSpec, requests: list[SimRequest], **kw) -> ClusterSimulator:
    sim = ClusterSimulator(spec, requests, **kw)
    sim.run()
    return sim


def req(i, arrival, n_in, n_out, hash_ids=None) -> SimRequest:
    return SimRequest(i, arrival, n_in, n_out, hash_ids, 512)


# ---- closed forms ----
def test_one_request_alone_colocated():
    cost = LinearCost()
    s = run(cluster(role(cost=cost)), [req(0, 0.0, 500, 1)]).states[0]
    assert s.error is None
    assert s.first_token_s == pytest.approx(cost.fixed + 500 * cost.per_token)  # TTFT = its prefill step
    over = Overheads(ingress_s=0.004, egress_s=0.002, prefill_rpc_s=0, completion_s=0)
    s = run(cluster(role(cost=cost), overheads=over), [req(0, 0.0, 500, 1)]).states[0]
    assert s.first_token_s == pytest.approx(0.004 + cost.fixed + 500 * cost.per_token + 0.002)


def test_chunked_prefill_and_decode_steps():
    cost = LinearCost()
    s = run(cluster(role(cost=cost, budget=256)), [req(0, 0.0, 600, 5)]).states[0]
    chunks = [256, 256, 88]  # 600 tokens under a 256-token budget
    prefill = sum(cost.fixed + n * cost.per_token for n in chunks)
    assert s.first_token_s == pytest.approx(prefill)
    step = cost.fixed + cost.per_seq
    assert s.finish_s == pytest.approx(prefill + 4 * step)  # then one token per decode step
    assert s.chunk_times == pytest.approx([prefill + i * step for i in range(5)])


def test_one_request_alone_disaggregated():
    cost = LinearCost()
    transfer = TransferModel(2e-3, 1e9)
    over = Overheads(ingress_s=0.001, egress_s=0.001, prefill_rpc_s=0.003, completion_s=0.0005)
    spec = cluster(role(cost=cost), role(cost=cost), threshold=100, overheads=over, transfer=transfer)
    sim = run(spec, [req(0, 0.0, 1000, 1)])
    s = sim.states[0]
    assert s.remote and sim.remote_prefills == 1
    step = cost.fixed + 1000 * cost.per_token
    send = 1000 * 1000.0 / 1e9  # 1000 tokens x 1000 B per token over 1 GB/s
    # the layers stream during the prefill step: the transfer ends one layer's send after the step (send < step)
    landed = max(step + send / 4, step / 4 + send) + transfer.latency_s
    expected = 0.001 + 0.003 + landed + 0.0005 + 0.001
    assert s.first_token_s == pytest.approx(expected)
    # a prompt under the threshold prefills on the decode replica
    sim = run(spec, [req(0, 0.0, 50, 1)])
    assert not sim.states[0].remote and sim.local_prefills == 1


def test_saturated_decode_batch_throughput():
    """B sequences decoding together: throughput = B / step time, every step."""
    cost = LinearCost(fixed=0.01, per_seq=1e-3)
    b, out = 8, 200
    sim = run(cluster(role(cost=cost, seqs=b)), [req(i, 0.0, 64, out) for i in range(b)])
    step = cost.fixed + b * cost.per_seq
    # the window in which all B decode: after the last prompt's step, until the first sequence is done
    start = max(s.first_token_s for s in sim.states)
    end = min(s.finish_s for s in sim.states)
    tokens = sum(start < t <= end + 1e-12 for s in sim.states for t in s.chunk_times)
    assert tokens / (end - start) == pytest.approx(b / step, rel=1e-9)
    pairs = [(x, y) for s in sim.states for x, y in zip(s.chunk_times[:-1], s.chunk_times[1:], strict=True)]
    itls = [y - x for x, y in pairs if x >= start and y <= end]
    assert len(itls) > 100 and min(itls) == pytest.approx(step) and max(itls) == pytest.approx(step)
    # more requests than max_num_seqs: the rest wait, the batch stays at B
    sim = run(cluster(role(cost=cost, seqs=b)), [req(i, 0.0, 64, out) for i in range(2 * b)])
    assert all(s.error is None and s.output_tokens == out for s in sim.states)
    firsts = sorted(s.first_token_s for s in sim.states)
    assert firsts[b] > firsts[b - 1] + (out - 2) * step  # the second wave starts when the first finishes


def test_runs_of_decode_steps_equal_stepping_one_by_one(monkeypatch):
    """Advancing identical decode steps at once gives the same per-request results as stepping each."""
    requests = [req(i, 0.013 * i, 40 + 17 * i, 30 + 11 * (i % 5)) for i in range(24)]
    spec = cluster(role(seqs=8, k=2, acceptance=(0.7, 0.6)))
    fast = run(spec, requests).states
    monkeypatch.setattr(simulator, "MACRO_MAX_STEPS", 1)  # a run needs >= 2 steps: every step is planned alone
    slow = run(spec, requests).states
    for a, b in zip(fast, slow, strict=True):
        assert a.first_token_s == pytest.approx(b.first_token_s, abs=1e-9)
        assert a.finish_s == pytest.approx(b.finish_s, abs=1e-9)
        assert a.chunk_times == pytest.approx(b.chunk_times, abs=1e-9)


def test_mtp_tokens_per_step():
    """K drafts at acceptance a emit 1 + a + a^2 + ... tokens per step on average."""
    a, k, out = 0.8, 3, 401
    cost = LinearCost()
    s = run(cluster(role(cost=cost, k=k, acceptance=(a,))), [req(0, 0.0, 64, out)]).states[0]
    expected = 1 + a + a**2 + a**3
    steps = len(s.chunk_times) - 1
    assert (out - 1) / steps == pytest.approx(expected, rel=0.01)
    step = cost.fixed + cost.per_seq + k * cost.per_draft
    assert (s.finish_s - s.first_token_s) / (out - 1) == pytest.approx(step / expected, rel=0.01)  # TPOT


def test_preemption_when_kv_runs_out():
    # 12 blocks of 64 tokens: four 100-token prompts growing to 300 tokens cannot all stay
    sim = run(cluster(role(blocks=12, seqs=8)), [req(i, 0.0, 100, 200) for i in range(4)])
    assert all(s.error is None and s.output_tokens == 200 for s in sim.states)
    assert sum(s.preemptions for s in sim.states) > 0


def test_prefix_cache_replays_hash_ids():
    cost = LinearCost()
    first, second = req(0, 0.0, 2000, 2, (1, 2, 3, 4)), req(1, 5.0, 2000, 2, (1, 2, 3, 9))
    sim = run(cluster(role(cost=cost, budget=4096)), [first, second])
    a, b = sim.states
    assert b.cached_tokens == 1536  # three shared 512-token blocks
    assert b.first_token_s - 5.0 == pytest.approx(cost.fixed + (2000 - 1536) * cost.per_token)
    assert a.first_token_s == pytest.approx(cost.fixed + 2000 * cost.per_token)
    # the prefill replica keeps its own cache: the home replica of the first block is the same for both
    spec = cluster(role(cost=cost), role(cost=cost, replicas=3), threshold=100)
    sim = run(spec, [first, second])
    assert sim.remote_prefills == 2 and sim.states[1].cached_tokens == 1536


def test_timeouts_fail_and_free():
    cost = LinearCost(per_token=1e-2)  # 10 s per 1000-token prefill, one prompt per step
    sim = run(cluster(role(cost=cost, budget=1024)), [req(i, 0.0, 1000, 1) for i in range(3)], request_timeout_s=15.0)
    errors = [s.error for s in sim.states]
    assert errors[0] is None and all(e and "timed out" in e for e in errors[1:])
    blocks = sim.decode[0].blocks
    assert blocks.num_free_blocks == blocks.num_blocks  # the aborted requests' blocks came back


def test_summary_has_bench_serve_keys():
    sim = run(cluster(role()), [req(i, 1.0 * i, 100, 10) for i in range(5)])  # one at a time
    results, duration = request_results(sim.states)
    bench = BenchServeConfig(slo_ttft_ms=1000, slo_tpot_ms=100)
    ours = summarize(bench, results, 0, duration)
    reference = summarize(bench, [RequestResult(10, 2, 0.1, [0.01], 0.11)], 0, 1.0)
    assert set(ours) == set(reference)
    assert ours["completed"] == 5 and ours["slo_attainment"] == 1.0
    assert ours["mean_tpot_ms"] == pytest.approx(1000 * (0.01 + 0.002))


# ---- deployments and errors ----
def test_infeasible_and_unknown(shared_dir):
    glm52 = str(shared_dir / "data" / "glm5")
    config = ServingConfig.model_validate({"engine": {"model": glm52}, "prefill": {"replicas": 0}})
    with pytest.raises(InfeasibleConfig, match="does not fit.*h100-sxm"):
        build_deployment(config, PlannerSettings(hardware="h100", weights="bf16"))
    with pytest.raises(UnknownHardware, match="unknown hardware"):
        build_deployment(config, PlannerSettings(hardware="tpu-v5"))
    with pytest.raises(InfeasibleConfig, match="no roofline"):
        build_deployment(config, PlannerSettings(hardware="cpu"))  # no profile of GLM-5.2 on a CPU
    odd = config.model_copy(update={"engine": config.engine.model_copy(update={"tensor_parallel_size": 3})})
    with pytest.raises(InfeasibleConfig, match="not divisible by 3"):
        build_deployment(odd, PlannerSettings(hardware="h200", weights="fp8"))
    # FP8 on 8 H200s: fits, with room for the KV cache
    eight = ServingConfig.model_validate(
        {"engine": {"model": glm52, "tensor_parallel_size": 8, "expert_parallel_size": 8}, "prefill": {"replicas": 0}}
    )
    deployment = build_deployment(eight, PlannerSettings(hardware="h200", weights="fp8"))
    assert deployment.gpus == 8 and 90 < deployment.decode.weights_gb_per_gpu < 100
    assert deployment.decode.kv_tokens > 100_000 and deployment.decode.cost_model.startswith("analytic")


def test_predict_and_compare_through_the_cli(tmp_path):
    trace = tmp_path / "t.csv"
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"] + [
        f"2023-11-16 18:00:{s:02d}.000000,{200 + 50 * (s % 7)},{3 + s % 4}" for s in range(20)
    ]
    trace.write_text("\n".join(rows) + "\n")
    out = tmp_path / "pred.json"
    argv = ["plan", "predict", "--hardware", "cpu", "--prefill-replicas", "1", "--trace", str(trace),
            "--trace-rate", "2", "--slo-ttft", "2000", "--slo-tpot", "200", "--output-json", str(out)]  # fmt: skip
    assert main(argv) == 0
    predicted = load_measured(str(out))  # bench serve's result format: rows[0] + extra
    assert predicted["completed"] == 20 and predicted["config"]["trace_rate"] == 2
    assert predicted["planner"]["remote_prefills"] > 0
    # compare against itself: zero error everywhere
    rows = compare(predicted, predicted)
    assert all(r["relative_error"] in (0.0, None) for r in rows)
    measured = dict(predicted, mean_ttft_ms=2 * predicted["mean_ttft_ms"])
    err = {r["key"]: r["relative_error"] for r in compare(predicted, measured)}
    assert err["mean_ttft_ms"] == pytest.approx(-0.5)
    (tmp_path / "m.json").write_text(json.dumps(measured))
    assert main(argv + ["--compare", str(tmp_path / "m.json")]) == 0
    saved = load_measured(str(out))["planner"]["compare"]["rows"]
    assert next(r for r in saved if r["key"] == "mean_ttft_ms")["relative_error"] == pytest.approx(-0.5)


def test_search_ranks_and_flags(tmp_path):
    requests = [req(i, 0.05 * i, 300 + 40 * (i % 5), 8 + i % 6) for i in range(40)]
    bench = BenchServeConfig(slo_ttft_ms=1500, slo_tpot_ms=150)
    base = ServingConfig()
    space = SearchSpace(prefill_replicas=[0, 1], decode_replicas=[1, 2], local_prefill_threshold=[0, 256],
                        decode_parallel=[(1, 1), (3, 1)], max_gpus=3)  # fmt: skip
    rows = run_search(base, space, PlannerSettings(hardware="cpu"), requests, bench, [1, 4, 16], refine=1,
                      workers=1, progress=False)  # fmt: skip
    feasible = [r for r in rows if r["feasible"]]
    assert feasible and all(r["gpus"] <= 3 for r in feasible)
    per_gpu = [r["goodput_per_gpu"] for r in feasible]
    assert per_gpu == sorted(per_gpu, reverse=True)
    infeasible = [r for r in rows if not r["feasible"]]
    assert infeasible and all("tp3" in r["name"] and "divisible" in r["reason"] for r in infeasible)
    front = pareto_front(rows)
    for r in front:
        assert not any(
            o["tokens_per_s_per_user"] > r["tokens_per_s_per_user"]
            and o["output_throughput_per_gpu"] > r["output_throughput_per_gpu"]
            for o in feasible if o.get("tokens_per_s_per_user")
        )  # fmt: skip


def test_calibrating_the_step_time_scale(tmp_path):
    """A run made with step times x 1.7 is recognized: the fitted scale is 1.7 again."""
    from glmserve.planner.predict import calibrate_step_time_scale

    trace = tmp_path / "t.csv"
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"] + [
        f"2023-11-16 18:00:{s:02d}.000000,{100 + 60 * (s % 5)},{4 + s % 3}" for s in range(16)
    ]
    trace.write_text("\n".join(rows) + "\n")
    bench = BenchServeConfig(trace=str(trace), trace_rate=1.0)
    config = ServingConfig.model_validate({"prefill": {"replicas": 0}})
    measured = predict(config, PlannerSettings(hardware="cpu", step_time_scale=1.7), bench)
    scale, rms = calibrate_step_time_scale(config, PlannerSettings(hardware="cpu"), bench, measured)
    assert scale == pytest.approx(1.7, rel=0.02) and rms < 0.02
    assert "x 1.700" in build_deployment(config, PlannerSettings(hardware="cpu", step_time_scale=1.7)).decode.cost_model


def test_cli_reports_bad_input_without_a_traceback(tmp_path, caplog):
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens\n2023-11-16 18:00:00,10\n")
    assert main(["plan", "predict", "--trace", str(trace), "--output-json", ""]) == 2
    assert "lacks the columns GeneratedTokens" in caplog.text
    assert main(["plan", "predict", "--hardware", "a100", "--trace", str(trace), "--output-json", ""]) == 2
    assert "unknown hardware 'a100'" in caplog.text
