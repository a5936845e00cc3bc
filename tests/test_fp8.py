"""FP8 weights kept in FP8: the Linear, its GEMM kernels against the dequantized definition, and checkpoints that
load as FP8 and serve through the engine."""

import json
import shutil

import pytest
import torch
from engine_fixtures import random_prompts
from safetensors.torch import load_file, save_file

from glmserve import LLM, SamplingParams
from glmserve.model import load_model
from glmserve.model.default_checkpoint import default_checkpoint
from glmserve.model.fp8 import dequantize_fp8_blockwise, quantize_fp8_blockwise, quantize_fp8_groups
from glmserve.model.fp8_linear import Fp8Linear
from glmserve.model.kernels.fp8_gemm import (
    fp8_gemm_blockwise,
    fp8_gemm_reference,
    fp8_gemm_small_m_triton,
    quantize_fp8_groups_triton,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Stay in the checkpoint's precision in real FP8 releases (DeepSeek-V3, GLM-5): embeddings, the head, the router and
# the indexer's head weights. Norms are 1-D and never quantized.
KEPT = ("embed_tokens", "lm_head", "mlp.gate.", "weights_proj")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _weight(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return quantize_fp8_blockwise(torch.randn(rows, cols, generator=g) * cols**-0.5)


@pytest.mark.parametrize("rows", [1, 3, 17, 40])
@pytest.mark.parametrize(("out_features", "in_features"), [(200, 300), (128, 256), (96, 130)])
def test_small_m_kernel_matches_the_dequantized_gemm(rows, out_features, in_features):
    """Partial 128-blocks on both sides, row counts around the kernel's 16-row tiles, split-K on and off."""
    w, s = (t.to(DEVICE) for t in _weight(out_features, in_features, seed=rows))
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    want = fp8_gemm_reference(x, w, s)
    for split_k in (1, 2):
        got = fp8_gemm_small_m_triton(x, w, s, split_k=split_k)
        assert got.shape == want.shape and got.dtype == x.dtype
        assert relative_error(got, want) < 1e-5, split_k


def test_small_m_kernel_reads_strided_rows():
    w, s = (t.to(DEVICE) for t in _weight(128, 256, seed=2))
    wide = torch.randn(5, 400, device=DEVICE)
    x = wide[:, 16:272]  # rows of a wider buffer, as a slice of a packed projection's output
    assert relative_error(fp8_gemm_small_m_triton(x, w, s), fp8_gemm_reference(x.contiguous(), w, s)) < 1e-5


def test_activation_groups_quantize_per_token_per_128_channels():
    x = torch.randn(3, 384) * torch.tensor([1.0, 100.0, 1e-3]).repeat_interleave(128)  # very different groups
    q, scale = quantize_fp8_groups(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 3)
    back = q.float().view(3, 3, 128) * scale[..., None]
    assert relative_error(back.view(3, 384), x) < 0.04  # e4m3: 3 mantissa bits, each group scaled to its own max


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA (the interpreter's float-to-e4m3 cast is off by 2x at some values)")
def test_one_pass_activation_quantization_matches_torch():
    x = torch.randn(70, 1024, device="cuda") * torch.logspace(-3, 2, 8, device="cuda").repeat_interleave(128)
    x = x.bfloat16()
    q, scale = quantize_fp8_groups(x)
    q_t, scale_t = quantize_fp8_groups_triton(x)
    assert scale_t.stride() == (1, 70)  # M-major, as cuBLAS reads it
    assert torch.allclose(scale_t, scale, rtol=1e-6) and torch.equal(q_t.float(), q.float())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("rows", [64, 300])
def test_blockwise_cublas_gemm_matches_the_dequantized_gemm(rows):
    w, s = (t.cuda() for t in _weight(512, 1024, seed=3))
    x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
    # activation quantization adds its own error: a few percent at most
    assert relative_error(fp8_gemm_blockwise(x, w, s), fp8_gemm_reference(x.float(), w, s)) < 0.05


def test_fp8_linear_keeps_one_byte_per_weight_and_computes_the_dequantized_product():
    lin = Fp8Linear(300, 200, dtype=torch.float32)
    w, s = _weight(200, 300, seed=4)
    lin.weight.data, lin.weight_scale_inv.data = w, s
    x = torch.randn(2, 7, 300)
    assert lin.weight.dtype == torch.float8_e4m3fn and lin.weight.element_size() == 1
    torch.testing.assert_close(lin(x), x @ dequantize_fp8_blockwise(w, s, torch.float32).t())
    assert torch.equal(lin.dequantized(), dequantize_fp8_blockwise(w, s, torch.float32))


def _fp8_checkpoint(src, dst, dequantized: bool):
    """`src` with every quantizable Linear weight in FP8 + its block scales (or, with `dequantized`, the same
    rounded values stored back in fp32: the reference the FP8 model must match)."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for name in [n for n, t in tensors.items() if t.ndim == 2 and n.endswith(".weight")]:
        if any(k in name for k in KEPT):
            continue
        q, scale = quantize_fp8_blockwise(tensors[name])
        if dequantized:
            tensors[name] = dequantize_fp8_blockwise(q, scale, torch.float32)  # exact: bf16 would round again
        else:
            tensors[name], tensors[name + "_scale_inv"] = q, scale
    save_file(tensors, str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    if not dequantized:
        config["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        }
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def tiny_fp8(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    return _fp8_checkpoint(default_checkpoint(), root / "fp8", False), _fp8_checkpoint(
        default_checkpoint(), root / "ref", True
    )


def test_fp8_checkpoint_loads_as_fp8_and_matches_its_dequantized_twin(tiny_fp8):
    fp8_dir, ref_dir = tiny_fp8
    model = load_model(fp8_dir)
    fp8_layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert fp8_layers and all(m.weight.dtype == torch.float8_e4m3fn for m in fp8_layers)
    assert not isinstance(model.lm_head, Fp8Linear) and model.model.embed_tokens.weight.dtype == torch.float32
    moe = next(layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts"))
    assert isinstance(moe.experts[0].gate_proj, Fp8Linear) and moe.gate.weight.dtype == torch.float32
    reference, dequantized = load_model(ref_dir), load_model(fp8_dir, dequantize_fp8=True)
    assert not any(isinstance(m, Fp8Linear) for m in dequantized.modules())
    ids = torch.tensor([random_prompts([40], model.config.vocab_size, seed=1)[0]])
    with torch.no_grad():
        logits = model(ids)
        assert relative_error(logits, reference(ids)) < 1e-5
        assert relative_error(logits, dequantized(ids)) < 1e-5
        # against the original weights, what FP8 weights cost: 0.053 measured (e4m3 keeps 3 mantissa bits)
        assert relative_error(logits, load_model()(ids)) < 0.08


def test_engine_serves_an_fp8_checkpoint_as_its_dequantized_twin_generates(tiny_fp8):
    fp8_dir, ref_dir = tiny_fp8
    prompts = random_prompts([5, 70, 140], 8000, seed=3)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    def tokens(path, **kw):
        llm = LLM(str(path), **kw)
        assert any(isinstance(m, Fp8Linear) for m in llm.engine.model.modules()) == (path == fp8_dir)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]

    want = tokens(ref_dir)
    assert tokens(fp8_dir) == want
    assert tokens(fp8_dir, num_speculative_tokens=2) == want  # the MTP layer's projections are FP8 too


@pytest.mark.slow
def test_glm52_fits_one_h200_node_in_fp8_and_not_in_bf16(shared_dir):
    from glmserve.model.config import GlmConfig
    from glmserve.model.footprint import NODES, fit_report, kv_bytes_per_token, weight_bytes

    config = GlmConfig.from_pretrained(shared_dir / "data" / "glm5" / "config.json")
    fp8, bf16 = weight_bytes(config, fp8=True), weight_bytes(config, fp8=False)
    assert 0.74e12 < fp8 < 0.78e12 and 1.49e12 < bf16 < 1.52e12  # the FP8 release is ~0.76 TB; 753B params in bf16
    # 79 layers of FlashMLA's 656-byte row, 22 indexer-key layers of 132 bytes
    assert kv_bytes_per_token(config, "fp8") == 79 * 656 + 22 * 132
    report = fit_report(config, NODES["8x H200"])
    assert "bf16 weights   1.51 TB: does not fit" in report and "fp8 weights    0.76 TB: fits" in report
    assert "does not fit" in fit_report(config, NODES["8x H100"]).splitlines()[2]
