"""`glmserve bench fp8`: the FP8 GEMMs on GLM-5.2's projection shapes, against bf16 and the ceilings of the same run.

For each weight shape (N x K, from ../shared/data/glm5/config.json's dims) and row count M: cuBLAS bf16
(`F.linear`), cuBLAS's blockwise-scaled FP8 GEMM (`torch.nn.functional.scaled_mm`, 1x128 activation and 128x128
weight scales, activations quantized in the timed region) and the Triton w8a16 kernel at its best split-K and warp
count. Few rows are memory-bound: the figure is bytes moved (FP8 weight + scales + activations) over the copy
ceiling; many rows are compute-bound: TFLOP/s over the blockwise FP8 GEMM ceiling at 8192^3. Every variant is checked
against the dequantized product first. The last table says which variant wins at each M: what
`model/fp8_linear.py`'s SCALED_MM_MIN_ROWS should be.
"""

import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from glmserve.bench.kernels import Timer, _copy_ms
from glmserve.bench.report import write_report
from glmserve.model.fp8 import quantize_fp8_blockwise
from glmserve.model.kernels.fp8_gemm import (
    fp8_gemm_blockwise,
    fp8_gemm_reference,
    fp8_gemm_small_m_triton,
    quantize_fp8_groups_triton,
)

log = logging.getLogger(__name__)

# GLM-5.2 (hidden 6144, q_lora 2048, kv_lora 512, 64 heads of qk 192+64 / v 256, experts 2048 wide, dense 12288)
SHAPES = {
    "q_a_proj": (2048, 6144),
    "q_b_proj": (64 * 256, 2048),
    "kv_b_proj": (64 * (192 + 256), 512),
    "o_proj": (6144, 64 * 256),
    "expert gate+up": (2 * 2048, 6144),
    "expert down": (6144, 2048),
    "dense gate+up": (2 * 12288, 6144),
    "dense down": (6144, 12288),
}
ROWS = (1, 8, 32, 64, 128, 1024, 16384)
SMALL_M_MAX = 128  # the Triton kernel is timed up to here (its 16-row tiles redo the weight read per 16 rows)
TRITON_CONFIGS = [(s, w) for s in (1, 2, 4, 8) for w in (4, 8)]  # (split_k, num_warps)


@dataclass
class GemmRow:
    shape: str
    n: int
    k: int
    m: int
    bf16_ms: float
    scaled_mm_ms: float | None
    triton_ms: float | None
    triton_config: str | None
    best: str
    best_vs_bf16: float  # bf16 time / best FP8 time
    of_ceiling: float  # the best FP8 variant's share of the ceiling that bounds it (copy for M <= 128, else GEMM)
    max_rel_err: float  # of the FP8 variants, against the dequantized product


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def fp8_ceiling_tflops(timer: Timer, n: int = 8192) -> float:
    """The blockwise FP8 GEMM alone (activations quantized beforehand), at 8192^3."""
    w, s = (t.cuda() for t in quantize_fp8_blockwise(torch.randn(n, n) * n**-0.5))
    q, x_scale = quantize_fp8_groups_triton(torch.randn(n, n, device="cuda", dtype=torch.bfloat16))
    blockwise = F.ScalingType.BlockWise1x128, F.ScalingType.BlockWise128x128
    return 2 * n**3 / timer.ms(lambda: F.scaled_mm(q, w.t(), x_scale, blockwise[0], s.t(), blockwise[1])) / 1e9


def bench_shape(timer: Timer, name: str, n: int, k: int, m: int, ceilings: dict) -> GemmRow:
    w, s = (t.cuda() for t in quantize_fp8_blockwise(torch.randn(n, k) * k**-0.5))
    w_bf16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = fp8_gemm_reference(x.float(), w, s)
    bf16_ms = timer.ms(lambda: F.linear(x, w_bf16))
    errors, times = [], {}
    try:
        errors.append(_rel_err(fp8_gemm_blockwise(x, w, s), ref))
        times["scaled_mm"] = timer.ms(lambda: fp8_gemm_blockwise(x, w, s))
    except (RuntimeError, ValueError) as e:  # cuBLAS refuses some shapes (M=1)
        log.info("%s M=%d: scaled_mm refused: %s", name, m, str(e).splitlines()[0])
    best_config = None
    if m <= SMALL_M_MAX:
        for split_k, warps in TRITON_CONFIGS:
            out = fp8_gemm_small_m_triton(x, w, s, split_k=split_k, num_warps=warps)
            errors.append(_rel_err(out, ref))
            ms = timer.ms(lambda sk=split_k, nw=warps: fp8_gemm_small_m_triton(x, w, s, split_k=sk, num_warps=nw))
            if "triton" not in times or ms < times["triton"]:
                times["triton"], best_config = ms, f"split_k {split_k}, {warps} warps"
    best = min(times, key=times.get)
    fp8_bytes = n * k + s.numel() * 4 + m * k * 2 + m * n * 2
    if m <= SMALL_M_MAX:
        of_ceiling = fp8_bytes / times[best] / 1e6 / ceilings["copy_gbs"]
    else:
        of_ceiling = 2 * m * n * k / times[best] / 1e9 / ceilings["fp8_gemm_tflops"]
    return GemmRow(
        name, n, k, m, bf16_ms, times.get("scaled_mm"), times.get("triton"), best_config, best,
        bf16_ms / times[best], of_ceiling, max(errors),
    )  # fmt: skip


def render(rows: list[GemmRow]) -> str:
    head = f"{'shape':<16}{'N x K':>13}{'M':>7}{'bf16 ms':>10}{'scaled_mm':>11}{'triton':>9}{'best':>11}"
    head += f"{'vs bf16':>9}{'of ceil':>9}{'rel err':>9}"
    lines = [head]
    for r in rows:
        sm = f"{r.scaled_mm_ms:.4f}" if r.scaled_mm_ms is not None else "-"
        tr = f"{r.triton_ms:.4f}" if r.triton_ms is not None else "-"
        lines.append(
            f"{r.shape:<16}{f'{r.n}x{r.k}':>13}{r.m:>7}{r.bf16_ms:>10.4f}{sm:>11}{tr:>9}{r.best:>11}"
            f"{r.best_vs_bf16:>8.2f}x{100 * r.of_ceiling:>8.1f}%{r.max_rel_err:>9.1e}"
        )
    return "\n".join(lines)


def crossover(rows: list[GemmRow]) -> dict[str, int | None]:
    """Per shape, the smallest M from which scaled_mm wins at every larger M timed."""
    out = {}
    for shape in dict.fromkeys(r.shape for r in rows):
        ms = sorted((r for r in rows if r.shape == shape), key=lambda r: r.m)
        wins = [r.best == "scaled_mm" for r in ms]
        out[shape] = next((ms[i].m for i in range(len(ms)) if all(wins[i:])), None)
    return out


def run_bench_fp8(
    shapes: list[str] | None,
    rows: list[int] | None,
    output_json: str | None,
    slice_layers: int | None = None,
    compare_bf16: bool = False,
) -> list[GemmRow]:
    """`glmserve bench fp8`: every shape in SHAPES (or `shapes`) at every row count in ROWS (or `rows`); with
    `slice_layers`, GLM-5.2's first that-many layers in FP8 (bench/fp8_slice.py), and a 6-layer twin in both dtypes
    with `compare_bf16`."""
    shapes, rows = shapes or list(SHAPES), rows or list(ROWS)
    unknown = set(shapes) - set(SHAPES)
    if unknown:
        raise SystemExit(f"unknown shapes {sorted(unknown)}; known: {', '.join(SHAPES)}")
    if not torch.cuda.is_available():
        raise SystemExit("glmserve bench fp8 needs a CUDA device")
    timer = Timer()
    num_bytes = 1 << 31
    ceilings = {
        "copy_gbs": 2 * num_bytes / _copy_ms(timer, num_bytes) / 1e6,
        "fp8_gemm_tflops": fp8_ceiling_tflops(timer),
    }
    print(f"ceilings: device copy {ceilings['copy_gbs']:.0f} GB/s, blockwise FP8 GEMM 8192^3 "
          f"{ceilings['fp8_gemm_tflops']:.0f} TFLOP/s")  # fmt: skip
    results = [bench_shape(timer, name, *SHAPES[name], m, ceilings) for name in shapes for m in rows]
    print(render(results))
    cross = crossover(results)
    print("scaled_mm wins from M =", cross)
    extra = {"ceilings": ceilings, "scaled_mm_from_rows": cross}
    if output_json:  # written now too: a slice that fails keeps the GEMM table
        write_report(output_json, [asdict(r) for r in results], extra)
    if slice_layers:
        from glmserve.bench.fp8_slice import GLM52_CONFIG, run_slice

        del timer
        torch.cuda.empty_cache()
        extra["slice"] = run_slice(GLM52_CONFIG, slice_layers, compare_bf16, ceilings)
        for row in extra["slice"]:
            print("  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    if output_json:
        write_report(output_json, [asdict(r) for r in results], extra)
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_bench_fp8(None, None, "bench_fp8.json")
