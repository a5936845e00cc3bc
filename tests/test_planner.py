"""The planner: hardware catalogue, operator accounting, cost models, profiles, workload loading and errors."""

import json
import math

import numpy as np
import pytest
import torch

from glmserve.bench.serve import BenchServeConfig, build_workload
from glmserve.model.config import GlmConfig
from glmserve.model.default_checkpoint import PACKAGED
from glmserve.model.kv_cache import KVCacheSpec
from glmserve.model.size import model_size
from glmserve.planner.cost_model import (
    AnalyticCostModel,
    Efficiencies,
    ProfileCostModel,
    TransferModel,
    fit_efficiencies,
)
from glmserve.planner.hardware import UnknownHardware, get_hardware, load_catalogue
from glmserve.planner.model_ops import ModelOps, causal_keys, step_work
from glmserve.planner.profile import (
    DecodePoint,
    GridInterpolator,
    PrefillPoint,
    Profile,
    ProfileError,
    config_sha256,
    find_profile,
    shipped_profiles,
)
from glmserve.planner.workload import TraceError, load_workload


@pytest.fixture(scope="module")
def tiny() -> GlmConfig:
    return GlmConfig.from_pretrained(PACKAGED)


@pytest.fixture(scope="module")
def glm52(shared_dir) -> GlmConfig:
    return GlmConfig.from_pretrained(shared_dir / "data" / "glm5" / "config.json")


def _layers(config: GlmConfig, n: int) -> GlmConfig:
    data = config.model_dump()
    for key in ("indexer_types", "mlp_layer_types"):
        data.pop(key)
    data["num_hidden_layers"] = n
    return GlmConfig.from_dict(data)


# ---- hardware ----
def test_catalogue_numbers_have_sources():
    catalogue = load_catalogue()
    assert {"h100-sxm", "h200-sxm", "b200", "cpu"} <= set(catalogue)
    for key, hw in catalogue.items():
        if hw.calibrated_only:
            assert hw.bf16_tflops is None and hw.hbm_tb_s is None, key
            continue
        for field in ("bf16_tflops", "fp8_tflops", "hbm_gb", "hbm_tb_s", "nvlink_gb_s", "network_gb_s"):
            assert getattr(hw, field) > 0 and hw.sources[field], (key, field)
        assert hw.fp8_tflops > hw.bf16_tflops  # dense fp8 doubles bf16 on these parts
    assert get_hardware("h200").hbm_gb == 141 and get_hardware("H100").hbm_tb_s == 3.35
    assert get_hardware("b200").nvlink_bytes_per_s == 900e9  # one direction of 1.8 TB/s


def test_unknown_hardware_lists_the_known(tmp_path):
    with pytest.raises(UnknownHardware, match="unknown hardware 'a100'.*h200-sxm"):
        get_hardware("a100")
    bad = tmp_path / "hw.yaml"
    bad.write_text("mygpu:\n  name: x\n  bf16_tflops: 1\n  fp8_tflops: 2\n  hbm_gb: 1\n  hbm_tb_s: 1\n"
                   "  nvlink_gb_s: 1\n  network_gb_s: 1\n")  # fmt: skip
    with pytest.raises(UnknownHardware, match="every number needs its source"):
        get_hardware("mygpu", bad)
    with pytest.raises(UnknownHardware, match="no roofline"):
        get_hardware("cpu").peak_flops("bf16")


# ---- operator accounting ----
def test_parameter_counts_match_model_size(tiny, glm52):
    for config in (tiny, _layers(glm52, 4)):
        size, ops = model_size(config), ModelOps(config)
        assert ops.total_params() == size.with_mtp
        assert ops.total_params(with_mtp=False) == size.main
        assert ops.activated_params() == size.activated


def test_glm52_bytes(glm52):
    fp8 = ModelOps(glm52, "fp8", "bf16")
    assert 0.74e12 < fp8.weight_bytes() < 0.77e12  # the FP8 checkpoint: ~0.76 TB
    # a rank of TP8/EP8 holds its eighth of the experts and of the heads, and all replicated parts
    assert fp8.weight_bytes() / 8 < fp8.weight_bytes_per_rank(8, 8) < fp8.weight_bytes() / 7
    spec = KVCacheSpec.from_config(glm52, torch.bfloat16)
    assert fp8.kv_bytes_per_token() == spec.bytes_per_token == 96640
    assert ModelOps(glm52, "fp8", "fp8").latent_bytes == 656  # FlashMLA's FP8 latent
    assert fp8.kv_bytes_per_token(78) < fp8.kv_bytes_per_token()  # without the MTP layer


def test_causal_keys():
    assert causal_keys(0, 4) == 1 + 2 + 3 + 4
    assert causal_keys(10, 3) == 11 + 12 + 13
    assert causal_keys(0, 6, cap=3) == 1 + 2 + 3 + 3 + 3 + 3
    assert causal_keys(100, 5, cap=50) == 250


def test_indexer_work_grows_with_context_only_on_full_layers(glm52):
    ops = ModelOps(glm52, "fp8", "bf16")
    every = ModelOps(GlmConfig.from_dict({**glm52.model_dump(), "indexer_types": ["full"] * 78}), "fp8", "bf16")

    def indexer(o: ModelOps, ctx: int) -> float:
        return step_work(o, (), 8, ctx, 0, 1.0).total("flops", "indexer")

    assert indexer(ops, 1024) == 0.0  # within top-k: dense attention, no scoring
    a, b = indexer(ops, 64 << 10), indexer(ops, 128 << 10)
    assert b / a == pytest.approx((128 << 10) / (64 << 10), rel=1e-3)  # linear in context
    full = sum(glm52.is_full_indexer_layer(i) for i in range(78))
    assert full == 21
    assert indexer(every, 64 << 10) / a == pytest.approx(78 / full, rel=1e-3)  # IndexShare: 21 of 78 layers score
    # sparse attention stops growing at top-k
    att = [step_work(ops, (), 8, c, 0, 1.0).total("flops", "attention") for c in (4096, 65536)]
    assert att[0] == att[1]


def test_parallel_communication(glm52):
    ops = ModelOps(glm52, "fp8", "bf16")
    alone = step_work(ops, (), 64, 8192, 0, 1.0)
    assert alone.tp_collectives == alone.ep_collectives == alone.world_collectives == 0
    split = step_work(ops, (), 64, 8192, 0, 1.0, tp=8, ep=8)
    assert split.tp_collectives > 0 and split.ep_alltoall_bytes > 0 and split.world_gather_bytes > 0
    # experts split over EP: each rank computes 1/8 of the routed-expert FLOPs
    assert split.total("flops", "moe") == pytest.approx(alone.total("flops", "moe") / 8)


def test_analytic_decode_bounded_by_the_roofline(glm52):
    h200 = get_hardware("h200")
    ideal = Efficiencies(gemm=1, gemm_fp8=1, moe=1, attention=1, indexer=1, topk=1, memory=1, comm=1,
                         collective_latency_s=0, step_overhead_s=0, seq_overhead_s=0, layer_floor_s=0,
                         expert_imbalance=1)  # fmt: skip
    model = AnalyticCostModel(glm52, h200, "fp8", "bf16", tp=8, ep=8, efficiencies=ideal)
    t = model.step_time((), 1, 4096, 0)
    ops = ModelOps(glm52, "fp8", "bf16")
    # batch 1 reads at least the replicated and head-split weights of every layer, and its 8 experts' share
    floor = sum(
        n * ops.weight_size * (p.attn_replicated + p.attn_split / 8 + p.shared_expert + p.indexer)
        for p, n, mtp in ops.layer_groups if not mtp
    ) / h200.hbm_bytes_per_s  # fmt: skip
    assert floor < t < 3 * floor
    # defaults are slower than the ideal roofline, and more work costs more time
    real = AnalyticCostModel(glm52, h200, "fp8", "bf16", tp=8, ep=8)
    assert real.step_time((), 1, 4096, 0) > t
    assert real.step_time((), 64, 4096, 0) > real.step_time((), 8, 4096, 0)
    assert real.step_time(((8192, 65536),), 0, 0, 0) > real.step_time(((8192, 0),), 0, 0, 0)
    with pytest.raises(UnknownHardware, match="no roofline"):
        AnalyticCostModel(glm52, get_hardware("cpu"))


def test_fit_recovers_efficiencies(tiny):
    """A profile made by the analytic model itself with known efficiencies: the fit finds them again."""
    gpu = get_hardware("h200")
    truth = Efficiencies(gemm=0.3, memory=0.2, attention=0.05, step_overhead_s=2e-3, seq_overhead_s=5e-5,
                         layer_floor_s=1e-4)  # fmt: skip
    model = AnalyticCostModel(tiny, gpu, "bf16", "bf16", efficiencies=truth)
    prefill = [
        PrefillPoint(tokens=n, context=c, seconds=model.step_time(((n, c),), 0, 0, 0))
        for n in (256, 4096, 32768) for c in (0, 2048)
    ]  # fmt: skip
    decode = [
        DecodePoint(batch=b, context=c, k=0, seconds=model.step_time((), b, c, 0))
        for b in (1, 64, 512) for c in (512, 3072)
    ]  # fmt: skip
    profile = Profile(
        device="fake", hardware="h200-sxm", model="glm5-tiny", model_config_sha256=config_sha256(tiny),
        glm_config=tiny.model_dump(mode="json"), dtype="bfloat16", prefill=prefill, decode=decode,
    )  # fmt: skip
    fit = fit_efficiencies(profile, gpu)
    assert fit.rms_log_error < 0.02 and fit.max_rel_error < 0.05
    fitted = AnalyticCostModel(tiny, gpu, "bf16", "bf16", efficiencies=fit.efficiencies)
    for b in (4, 128):  # between the measured points too
        assert fitted.step_time((), b, 1024, 0) == pytest.approx(model.step_time((), b, 1024, 0), rel=0.05)
    assert fit.efficiencies.step_overhead_s == pytest.approx(2e-3, rel=0.25)


# ---- profiles ----
def test_grid_interpolation():
    f = GridInterpolator.from_points([(1, 10), (1, 20), (3, 10), (3, 20)], [1.0, 2.0, 3.0, 4.0])
    assert f(1, 10) == 1.0 and f(3, 20) == 4.0
    assert f(2, 15) == pytest.approx(2.5)  # bilinear
    assert f(5, 10) == pytest.approx(5.0)  # linear beyond the edge
    assert np.allclose(f(np.array([1.0, 2.0]), 10), [1.0, 2.0])
    with pytest.raises(ValueError, match="do not fill"):
        GridInterpolator.from_points([(1, 10), (1, 20), (3, 10)], [1.0, 2.0, 3.0])


def _profile(tiny: GlmConfig, decode_k: tuple[int, ...] = (0,)) -> Profile:
    return Profile(
        device="cpu", hardware="cpu", model="glm5-tiny", model_config_sha256=config_sha256(tiny),
        glm_config=tiny.model_dump(mode="json"), dtype="float32",
        prefill=[PrefillPoint(tokens=n, context=c, seconds=0.01 + 1e-4 * n + 1e-5 * c) for n in (16, 256)
                 for c in (0, 512)],
        decode=[DecodePoint(batch=b, context=c, k=k, seconds=0.005 + 1e-3 * b * (1 + k) + 1e-6 * c)
                for b in (1, 8) for c in (64, 512) for k in decode_k],
    )  # fmt: skip


def test_profile_cost_model_composes_mixed_steps(tiny, tmp_path):
    profile = _profile(tiny)
    path = profile.save(tmp_path / "p.json")
    model = ProfileCostModel(Profile.load(path))
    assert model.step_floor_s == pytest.approx(0.01)  # the prefill intercept
    assert model.step_time(((256, 0),), 0, 0, 0) == pytest.approx(0.01 + 0.0256)
    assert model.step_time((), 8, 512, 0) == pytest.approx(0.005 + 8e-3 + 512e-6)
    mixed = model.step_time(((256, 0),), 8, 512, 0)
    assert mixed == pytest.approx(0.005 + 8e-3 + 512e-6 + 0.0256)  # the fixed cost counted once
    two = model.step_time(((16, 0), (256, 0)), 0, 0, 0)
    assert two == pytest.approx(0.01 + 0.0016 + 0.0256)
    bad = json.loads(path.read_text())
    bad["decode"] = bad["decode"][:-1]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ProfileError, match="do not fill"):
        Profile.load(tmp_path / "bad.json")


def test_shipped_cpu_profile(tiny):
    """glm5-tiny on this CPU class, measured by `glmserve profile`: found for the model, and sensible."""
    assert shipped_profiles(), "planner/data/profiles/ holds no profile"
    profile = find_profile(tiny, "cpu")
    assert profile is not None and profile.model == "glm5-tiny" and profile.glmserve_commit
    model = ProfileCostModel(profile)
    assert model.step_time(((1024, 0),), 0, 0, 0) > model.step_time(((64, 0),), 0, 0, 0)
    assert model.step_time((), 16, 512, 0) > model.step_time((), 1, 512, 0)
    assert {p.k for p in profile.decode} >= {0, 1}
    if profile.transfer:  # measured when the KV transfer harness ran (`glmserve profile --transport tcp`)
        assert TransferModel.fit([(p.bytes, p.seconds) for p in profile.transfer]).bytes_per_s > 1e8


def test_transfer_fit():
    model = TransferModel.fit([(1e6, 2e-3 + 1e6 / 2e9), (1e8, 2e-3 + 1e8 / 2e9), (1e9, 2e-3 + 1e9 / 2e9)])
    assert model.latency_s == pytest.approx(2e-3, rel=1e-6) and model.bytes_per_s == pytest.approx(2e9, rel=1e-6)
    assert model.seconds(4e9) == pytest.approx(2e-3 + 2.0)


# ---- workloads ----
def test_workload_matches_bench_serve(tmp_path):
    trace = tmp_path / "t.csv"
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"] + [
        f"2023-11-16 18:{m:02d}:00.000000,{100 + 37 * m},{5 + m}" for m in range(12)
    ]
    trace.write_text("\n".join(rows) + "\n")
    config = BenchServeConfig(trace=str(trace), num_requests=10, trace_rate=2.0, length_scale=4, max_output_len=8)
    ours, theirs = load_workload(config), build_workload(config)
    assert [(r.arrival_s, r.input_len, r.output_len) for r in ours] == [
        (t.arrival_s, t.input_len, t.output_len) for t in theirs
    ]
    assert len(ours) == 10 and ours[-1].arrival_s == pytest.approx(9 / 2.0)


def test_trace_with_missing_columns_fails_clearly(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens\n2023-11-16 18:00:00,10\n")
    with pytest.raises(TraceError, match="lacks the columns GeneratedTokens"):
        load_workload(BenchServeConfig(trace=str(trace)))
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(json.dumps({"timestamp": 0, "input_length": 10, "output_length": 2}) + "\n")
    with pytest.raises(TraceError, match="lacks the fields hash_ids"):
        load_workload(BenchServeConfig(trace=str(jsonl)))
    with pytest.raises(TraceError, match="not found"):
        load_workload(BenchServeConfig(trace=str(tmp_path / "absent.csv")))


def test_prefix_keys_follow_hash_ids(tmp_path):
    rows = [
        {"timestamp": 0, "input_length": 1500, "output_length": 4, "hash_ids": [1, 2, 3]},
        {"timestamp": 10, "input_length": 1400, "output_length": 4, "hash_ids": [1, 2, 9]},
        {"timestamp": 20, "input_length": 300, "output_length": 4, "hash_ids": [7]},
    ]
    trace = tmp_path / "m.jsonl"
    trace.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    a, b, c = load_workload(BenchServeConfig(trace=str(trace)))
    shared = 1024 // 64  # two 512-token blocks in common: 16 engine blocks
    assert [a.block_key(j) for j in range(shared)] == [b.block_key(j) for j in range(shared)]
    assert a.block_key(shared) != b.block_key(shared)
    assert a.block_key(0) != c.block_key(0)
    assert len(a.shared_keys()) == 1500 // 64 and a.block_key(40) < 0  # past the prompt: its own
    # --length-scale shrinks the blocks with the prompts, as bench.traces.prefix_block_tokens does
    a8, b8, _ = load_workload(BenchServeConfig(trace=str(trace), length_scale=8))
    assert a8.trace_block_tokens == 64 and a8.block_key(1) == b8.block_key(1) and a8.block_key(2) != b8.block_key(2)
    assert math.isclose(a8.arrival_s, 0.0)


def _run_profile(tmp_path, **grid) -> Profile:
    from glmserve.planner.profiler import run_profile

    out = tmp_path / "profile.json"
    profile = run_profile(warmup=1, repeats=2, prefill_warmup=0, prefill_repeats=1, output=out, progress=False, **grid)
    assert Profile.load(out) == profile
    return profile


def test_profile_command_measures_the_engine(tmp_path):
    """`glmserve profile` on a tiny grid: every point from real engine steps, the prefix hit checked."""
    profile = _run_profile(
        tmp_path, prefill_tokens=[16, 48], prefill_contexts=[0, 64], decode_batches=[1], decode_contexts=[64], ks=[0]
    )
    assert profile.device == "cpu" and profile.hardware == "cpu" and profile.dtype == "float32"
    assert profile.model_config_sha256 == config_sha256(GlmConfig.from_pretrained(PACKAGED))
    assert profile.torch_version == torch.__version__ and profile.threads == torch.get_num_threads()
    assert len(profile.prefill) == 4 and len(profile.decode) == 1 and len(profile.decode[0].samples) == 2
    assert 64 <= profile.decode[0].mean_context < 64 + 16
    from glmserve.planner.profiler import run_profile

    with pytest.raises(ValueError, match="multiples of the 64-token block"):
        run_profile(prefill_tokens=[16], prefill_contexts=[10], decode_batches=[1], decode_contexts=[64], ks=[0],
                    progress=False)  # fmt: skip


@pytest.mark.slow
def test_profile_command_with_mtp(tmp_path):
    profile = _run_profile(
        tmp_path, prefill_tokens=[16], prefill_contexts=[0], decode_batches=[1, 2], decode_contexts=[64], ks=[0, 2]
    )
    assert sorted((p.batch, p.k) for p in profile.decode) == [(1, 0), (1, 2), (2, 0), (2, 2)]
    model = ProfileCostModel(profile)
    assert model.step_time((), 2, 64, 2) > model.step_time((), 2, 64, 0)  # verifying drafts costs more
