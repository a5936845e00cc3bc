"""`glmserve bench autoscale`: the config it serves and how a sampled timeline becomes the table's row."""

from glmserve.bench.autoscale import Step, _step_row, autoscaled, plot_timeline
from glmserve.cluster.serving_config import ServingConfig


def _timeline(decode: list[int], prefill: list[int]) -> list[dict]:
    return [
        {"t": float(t), "decode_replicas": d, "prefill_replicas": p}
        for t, (d, p) in enumerate(zip(decode, prefill, strict=True))
    ]


def test_both_roles_autoscale_apart_from_one_replica():
    config = autoscaled(ServingConfig(), max_replicas=3, upscale_s=5, downscale_s=20)
    for role in (config.prefill, config.decode):
        assert role.replicas == 1 and role.num_gpus == 0
        assert role.autoscaling.policy == "slo"
        assert (role.autoscaling.min_replicas, role.autoscaling.max_replicas) == (1, 3)
        assert (role.autoscaling.upscale_delay_s, role.autoscaling.downscale_delay_s) == (5, 20)


def test_step_row_times_scale_out_from_the_step_start_and_scale_in_from_its_end():
    # decode runs 2 replicas from t=8 to t=24; the step is t=2..12; prefill never moves
    decode = [1] * 8 + [2] * 16 + [1] * 6
    samples = _timeline(decode, [1] * len(decode))
    row = _step_row(Step("decode", 2, 12), samples, "decode", upscale_s=5, downscale_s=20)
    assert row["peak_decode_replicas"] == 2 and row["peak_prefill_replicas"] == 1
    assert row["scale_out_s"] == 6 and row["scale_out_over_upscale_delay"] == 6 / 5
    assert row["scale_in_s"] == 12 and row["scale_in_over_downscale_delay"] == 12 / 20


def test_step_row_reports_no_scaling_as_none():
    samples = _timeline([1] * 30, [1] * 30)
    row = _step_row(Step("prefill", 2, 12), samples, "prefill", upscale_s=5, downscale_s=20)
    assert row["peak_prefill_replicas"] == 1
    assert row["scale_out_s"] is None and row["scale_in_s"] is None
    assert row["scale_out_over_upscale_delay"] is None


def test_plot_writes_a_png(tmp_path):
    samples = _timeline([1, 2, 2, 1], [1, 1, 1, 1])
    samples[1]["decode_desired"] = 2.4
    path = plot_timeline(samples, [Step("decode", 0, 2)], tmp_path / "out" / "timeline.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
