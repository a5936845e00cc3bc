"""`glmserve bench fp8 --slice`: GLM-5.2's real layers in FP8 on one GPU, against the ceilings of the same run.

GLM-5.2's own config.json cut to `layers` main layers (no MTP layer): its first three layers are dense, the rest MoE
with 256 experts of 2048. Random weights, each quantized to FP8 blocks as it is made (the bf16 model never exists),
in the serving form the engine runs (packed, Triton kernels, decode steps as CUDA graphs). Reported: GiB of weights
and KV; decode step time at batch 1 and 64 against the HBM roofline (bytes the step must read: active experts' FP8
weights and scales, attention weights, KV); prefill of one 16K-token prompt against the blockwise FP8 GEMM ceiling
(the FLOPs of the projections and the active experts); and with `--compare-bf16` the same slice in bf16 beside it.
"""

import json
import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

from glmserve.bench.kernels import Timer, _copy_ms
from glmserve.bench.model import Driver, _make_cache, _random_prompts, decode_bytes, random_model, serving_runner
from glmserve.model.config import GlmConfig
from glmserve.model.fp8 import quantize_fp8_blockwise
from glmserve.model.fp8_linear import Fp8Linear
from glmserve.model.glm import GlmForCausalLM
from glmserve.model.moe import MoE
from glmserve.model.weights import target_dtype

log = logging.getLogger(__name__)

GLM52_CONFIG = (
    Path(os.environ.get("GLMSERVE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    / "data"
    / "glm5"
    / "config.json"
)


def slice_config(path: Path, layers: int) -> GlmConfig:
    """GLM-5.2's config with its first `layers` main layers and no MTP layer."""
    data = json.loads(path.read_text())
    for key in ("indexer_types", "mlp_layer_types"):
        if key in data:
            data[key] = data[key][:layers]
    return GlmConfig.from_dict(data | {"num_hidden_layers": layers, "num_nextn_predict_layers": 0})


def random_fp8_model(config: GlmConfig, seed: int = 0, std: float = 0.02) -> GlmForCausalLM:
    """Random weights on CUDA as an FP8 release holds them: every Linear but lm_head and the indexer's head weights
    an `Fp8Linear`, quantized one tensor at a time from a bf16 draw that is freed at once."""
    with torch.device("meta"):
        model = GlmForCausalLM(config).to(torch.bfloat16)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name != "lm_head" and "weights_proj" not in name:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, Fp8Linear.like(module, torch.bfloat16))
    model = model.to_empty(device="cuda").requires_grad_(False)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, Fp8Linear):
                draw = torch.randn(module.out_features, module.in_features, device="cuda", generator=gen) * std
                module.weight.data, module.weight_scale_inv.data = quantize_fp8_blockwise(draw)
                continue
            for leaf, p in module.named_parameters(recurse=False):
                full = f"{name}.{leaf}"
                if full.endswith("norm.weight"):
                    p.data = torch.ones(p.shape, device="cuda", dtype=target_dtype(full, torch.bfloat16))
                elif p.ndim == 1:
                    p.data = torch.zeros(p.shape, device="cuda", dtype=target_dtype(full, torch.bfloat16))
                else:
                    p.data = (torch.randn(p.shape, device="cuda", generator=gen) * std).to(
                        target_dtype(full, torch.bfloat16)
                    )
    return model.eval()


def _gib(model: nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


def _step_flops(config: GlmConfig, model: GlmForCausalLM) -> float:
    """Matrix FLOPs per token of the projections and the active experts (attention's own products excluded)."""
    flops = 0.0
    for name, module in model.named_modules():
        if isinstance(module, Fp8Linear | nn.Linear) and name != "lm_head":
            share = config.num_experts_per_tok / config.n_routed_experts if ".experts." in name else 1.0
            flops += 2 * module.in_features * module.out_features * share
    return flops


def measure(model: GlmForCausalLM, label: str, ceilings: dict, context: int = 4096, prefill_len: int = 16384) -> dict:
    config = model.config
    batch = 64
    cache = _make_cache(config, (batch + 1) * (context + 64) + 2 * prefill_len + 4096)  # the prompt runs twice
    runner = serving_runner(model, cache)
    packed = all(layer.mlp.packed is not None for layer in model.model.layers if isinstance(layer.mlp, MoE))
    driver = Driver(runner, chunk_tokens=8192)
    one = driver.prefill(_random_prompts(1, context, config.vocab_size, seed=1))
    driver.decode(one, 4)  # captures the batch-1 graph
    step1 = _timed(lambda: driver.decode(one, 32)) / 32
    many = driver.prefill(_random_prompts(batch, context, config.vocab_size, seed=2))
    driver.decode(many, 4)
    step64 = _timed(lambda: driver.decode(many, 16)) / 16
    prompt = _random_prompts(1, prefill_len, config.vocab_size, seed=3)
    driver.prefill(prompt)  # warm the prefill shapes
    prefill_s = _timed(lambda: driver.prefill(prompt))
    row = {"slice": label, "layers": config.num_hidden_layers, "experts_packed": packed}
    row["weights_gib"] = _gib(model)
    row["kv_gib"] = cache.latent[0].numel() * cache.latent[0].element_size() * len(cache.latent) / 2**30
    for name, step, n in (("decode_b1", step1, 1), ("decode_b64", step64, batch)):
        contexts = [context + 36] * n
        read = sum(decode_bytes(model, contexts, runner.topk_layers).values())
        row[f"{name}_ms"] = step * 1e3
        row[f"{name}_of_roofline"] = read / ceilings["copy_gbs"] / 1e6 / (step * 1e3)
    flops = _step_flops(config, model) * prefill_len
    row["prefill_16k_s"] = prefill_s
    row["prefill_of_fp8_gemm"] = flops / prefill_s / 1e12 / ceilings["fp8_gemm_tflops"]
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    log.info("%s", row)
    return row


def _timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def run_slice(config_path: Path, layers: int, compare_bf16: bool, ceilings: dict) -> list[dict]:
    rows = []
    model = random_fp8_model(slice_config(config_path, layers))
    rows.append(measure(model, f"fp8 {layers} layers", ceilings))
    del model
    torch.cuda.empty_cache()
    if compare_bf16:
        twin = min(layers, 6)
        for label, make in (("fp8", random_fp8_model), ("bf16", random_model)):
            model = make(slice_config(config_path, twin))
            rows.append(measure(model, f"{label} {twin} layers", ceilings))
            del model
            torch.cuda.empty_cache()
    return rows


def ceilings_now() -> dict:
    from glmserve.bench.fp8 import fp8_ceiling_tflops

    timer = Timer()
    return {"copy_gbs": 2 * (1 << 31) / _copy_ms(timer, 1 << 31) / 1e6, "fp8_gemm_tflops": fp8_ceiling_tflops(timer)}
