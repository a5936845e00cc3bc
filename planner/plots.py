"""PNG plots of a search: goodput against the offered rate per configuration, TTFT and TPOT CDFs, and the Pareto
front of output tokens/s per GPU against tokens/s per user."""

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_goodput_vs_rate(rows: list[dict[str, Any]], path: Path, target: float, top: int = 8) -> Path:
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate([r for r in rows if r["feasible"]][:top]):
        pts = r["points"]
        color = f"C{i % 10}"
        rates = [p["rate"] for p in pts]
        # a run stopped early once the target was out of reach: its attainment is an upper bound, shown hollow
        full = [p for p in pts if not p["stopped_early"]]
        ax1.plot(rates, [p["attainment"] for p in pts], color=color, linewidth=1, alpha=0.6)
        ax1.plot([p["rate"] for p in full], [p["attainment"] for p in full], "o", color=color,
                 label=f"{r['name']} ({r['gpus']} GPU)")  # fmt: skip
        stopped = [p for p in pts if p["stopped_early"]]
        ax1.plot([p["rate"] for p in stopped], [p["attainment"] for p in stopped], "o", mfc="none", color=color)
        ax2.plot([p["rate"] for p in full], [p["attainment"] * p["rate"] / r["gpus"] for p in full], "o-", color=color)
    ax1.axhline(target, color="grey", linestyle="--", linewidth=1)
    ax1.set(xlabel="offered rate (req/s)", ylabel="SLO attainment", title="SLO attainment vs rate", xscale="log")
    ax2.set(
        xlabel="offered rate (req/s)", ylabel="offered rate x attainment, per GPU",
        title="requests/s within SLO per GPU (runs to the end only)", xscale="log",
    )  # fmt: skip
    from matplotlib.ticker import ScalarFormatter

    for ax in (ax1, ax2):
        ax.xaxis.set_major_formatter(ScalarFormatter())
    ax1.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_cdfs(
    curves: dict[str, dict[str, list[float]]], path: Path, slo_ttft_ms: float | None, slo_tpot_ms: float | None
) -> Path:
    """`curves`: per configuration name, its per-request `ttft_ms` and `tpot_ms` at its goodput rate."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, c in curves.items():
        for ax, key in zip(axes, ("ttft_ms", "tpot_ms"), strict=True):
            x = np.sort(np.asarray(c[key], dtype=float))
            if len(x):
                ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=name)
    for ax, key, slo in zip(axes, ("TTFT", "TPOT"), (slo_ttft_ms, slo_tpot_ms), strict=True):
        if slo:
            ax.axvline(slo, color="grey", linestyle="--", linewidth=1)
        ax.set(
            xlabel=f"{key} (ms)",
            ylabel="share of requests",
            title=f"{key} CDF at each one's goodput rate",
            xscale="log",
        )
    if curves:
        axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_pareto(rows: list[dict[str, Any]], front: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    pts = [r for r in rows if r["feasible"] and r.get("tokens_per_s_per_user") and r["goodput"] > 0]
    ax.scatter(
        [r["tokens_per_s_per_user"] for r in pts], [r["output_throughput_per_gpu"] for r in pts],
        s=12, alpha=0.4, label="configurations",
    )  # fmt: skip
    ax.plot(
        [r["tokens_per_s_per_user"] for r in front], [r["output_throughput_per_gpu"] for r in front],
        color="C3", marker="o", label="Pareto front",
    )  # fmt: skip
    for r in front:
        ax.annotate(
            r["name"].split(" seqs")[0], (r["tokens_per_s_per_user"], r["output_throughput_per_gpu"]), fontsize=6
        )
    ax.set(
        xlabel="tokens/s per user (1 / mean TPOT)", ylabel="output tokens/s per GPU",
        title="Throughput vs interactivity at each configuration's goodput rate",
    )  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
