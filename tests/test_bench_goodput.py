"""`glmserve bench goodput`: both arrangements served and loaded for real (CPU, glm5-tiny), and the goodput rule."""

import json

import pytest

from glmserve.bench.goodput import arrangement_config, goodput, run_bench_goodput
from glmserve.bench.serve import BenchServeConfig
from glmserve.cluster import serve_env
from glmserve.cluster.serving_config import ServingConfig

pytestmark = pytest.mark.slow  # serves both arrangements on Ray Serve


def test_goodput_is_the_highest_rate_that_met_the_target():
    rows = [
        {"rate": 1.0, "slo_attainment": 1.0},
        {"rate": 2.0, "slo_attainment": 0.95},
        {"rate": 4.0, "slo_attainment": 0.5},
        {"rate": 8.0, "slo_attainment": None},  # nothing completed
    ]
    assert goodput(rows, 0.9) == 2.0
    assert goodput(rows, 0.99) == 1.0
    assert goodput(rows[2:], 0.9) == 0.0


def test_arrangements_use_two_single_device_replicas():
    base = ServingConfig()
    disagg = arrangement_config(base, "disaggregated", "cuda")
    coloc = arrangement_config(base, "colocated", "cuda")
    assert (disagg.prefill.replicas, disagg.decode.replicas) == (1, 1)
    assert (coloc.prefill.replicas, coloc.decode.replicas) == (0, 2)
    assert disagg.prefill.num_gpus == disagg.decode.num_gpus == coloc.decode.num_gpus == 1
    assert arrangement_config(base, "colocated", "cpu").decode.num_gpus == 0


@pytest.mark.slow
def test_both_arrangements_serve_the_trace(tmp_path, monkeypatch):
    for key, value in serve_env.PROXY_ENV.items():  # what the run sets, undone after the test
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("GLMSERVE_TRACE_DIR", raising=False)  # the packaged trace
    workload = BenchServeConfig(
        trace="azure-code", trace_rate=2.0, num_requests=6, length_scale=8, max_output_len=16, token_ids=True,
        slo_ttft_ms=5000, slo_tpot_ms=500,
    )  # fmt: skip
    out = tmp_path / "goodput.json"
    report = run_bench_goodput(ServingConfig(port=8125), workload, [2.0], "cpu", str(out))
    written = json.loads(out.read_text())
    assert written["extra"]["goodput"] == report["goodput"]
    assert [(r["arrangement"], r["rate"]) for r in written["rows"]] == [("disaggregated", 2.0), ("colocated", 2.0)]
    for name in ("disaggregated", "colocated"):
        (row,) = report["results"][name]
        assert row["failed"] == 0 and 0.0 <= row["slo_attainment"] <= 1.0
        assert report["goodput"][name] == (2.0 if row["slo_attainment"] >= 0.9 else 0.0)
