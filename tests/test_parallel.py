"""Tensor and expert parallelism on CPU (gloo): 2-rank replicas give the logits of the single-process model."""

import json
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hf_models import make_hf_model
from safetensors.torch import load_file, save_file

from glmserve.model import GlmConfig, GlmForCausalLM, load_model
from glmserve.model.fp8 import quantize_fp8_blockwise
from glmserve.model.parallel import ParallelConfig, ParallelContext, load_parallel_model
from glmserve.model.weights import FP32_SUFFIXES, save_weights

TIMEOUT_S = 60
# case -> (checkpoint, tp_size, ep_size)
CASES = {
    "tp2": ("hf", 2, 1),
    "ep2": ("hf", 1, 2),
    "tp2_ep2": ("hf", 2, 2),
    "tp2_ep2_fp8_mtp": ("fp8_mtp", 2, 2),
}


def _ids(vocab_size: int) -> torch.Tensor:
    # 40 tokens > index_topk (8): the indexer's sparse selection is active
    return torch.randint(0, vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))


def _run_rank(rank: int, port: int, checkpoints: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=TIMEOUT_S))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        for case, (checkpoint, tp, ep) in CASES.items():
            path = checkpoints[checkpoint]
            model = load_parallel_model(path, ParallelContext.create(ParallelConfig(tp_size=tp, ep_size=ep)))
            ids = _ids(model.config.vocab_size)
            # one token: a decode step, where some ranks route no token through the MoE
            result = {"logits": model(ids), "one_token": model(ids[:1, :1]), "holds": _holdings(model)}
            if model.mtp is not None:
                result["mtp"] = model.mtp_reference(model.hidden_states(ids), ids.roll(-1, dims=1))[0]
            torch.save(result, f"{out_dir}/{case}.rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # Leave without interpreter teardown: a gloo worker thread still releasing its last collective's tensors aborts
    # the process when Python finalizes under it (seen here; pytorch/pytorch#179291 describes the same crash).
    os._exit(0)


def _holdings(model) -> dict:
    """What this rank loaded: its routed experts (layer 1 is MoE) and its share of attention heads."""
    names = model.state_dict().keys()
    experts = {int(n.split(".")[5]) for n in names if n.startswith("model.layers.1.mlp.experts.")}
    q_rows = model.model.layers[0].self_attn.q_b_proj.weight.shape[0]
    return {"experts": sorted(experts), "heads": q_rows // model.config.qk_head_dim}


def _random_mtp_checkpoint(path, hf_path) -> None:
    """The HF checkpoint's config plus an MTP layer (transformers' model has none), random weights at the scale
    make_hf_model uses, saved fp8 block-quantized (as GLM-5 ships) where the real checkpoints quantize."""
    data = json.loads((hf_path / "config.json").read_text()) | {"num_nextn_predict_layers": 1}
    path.mkdir()
    (path / "config.json").write_text(json.dumps(data))
    model = GlmForCausalLM(GlmConfig.from_dict(data))
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(
                torch.randn(p.shape, generator=gen) * 0.2
                if p.ndim >= 2
                else 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            )
    save_weights(model, path)
    tensors = load_file(path / "model.safetensors")
    for name in [n for n, t in tensors.items() if t.ndim == 2 and not n.endswith(FP32_SUFFIXES)]:
        tensors[name], tensors[name + "_scale_inv"] = quantize_fp8_blockwise(tensors[name])
    save_file(tensors, str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    make_hf_model(root / "hf", seed=4, n_group=2, topk_group=1, n_shared_experts=1)
    _random_mtp_checkpoint(root / "fp8_mtp", root / "hf")
    return {"hf": root / "hf", "fp8_mtp": root / "fp8_mtp"}


@pytest.fixture(scope="module")
def rank_outputs(checkpoints, tmp_path_factory):
    """Runs every case in one pair of spawned ranks (process start-up dominates), then reads what each wrote."""
    out_dir = tmp_path_factory.mktemp("rank_outputs")
    # The rendezvous store lives here, on a port the OS picked: no race for a free port.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    procs = mp.spawn(_run_rank, args=(store.port, checkpoints, str(out_dir)), nprocs=2, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not procs.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail(f"the ranks did not finish within {TIMEOUT_S} s")
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
    return {case: [torch.load(out_dir / f"{case}.rank{r}.pt") for r in range(2)] for case in CASES}


@pytest.fixture(scope="module")
def references(checkpoints):
    """Single-process outputs: the unsplit model is the definition the replicas must reproduce."""
    outputs = {}
    for checkpoint, path in checkpoints.items():
        model = load_model(path)
        ids = _ids(model.config.vocab_size)
        outputs[checkpoint] = {"logits": model(ids), "one_token": model(ids[:1, :1]), "config": model.config}
        if model.mtp is not None:
            outputs[checkpoint]["mtp"] = model.mtp_reference(model.hidden_states(ids), ids.roll(-1, dims=1))[0]
    return outputs


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.slow
def test_parallel_logits_match_single_process(case, references, rank_outputs):
    checkpoint, tp, ep = CASES[case]
    expected = dict(references[checkpoint])
    config = expected.pop("config")
    rank0, rank1 = rank_outputs[case]
    assert rank0.keys() == rank1.keys() == expected.keys() | {"holds"}
    for key, want in expected.items():
        error, scale = (rank0[key] - want).abs().max().item(), want.abs().max().item()
        assert error <= 1e-4 * scale, f"{key}: max error {error:.3g} against a logit scale of {scale:.3g}"
        assert torch.equal(rank0[key], rank1[key]), f"the ranks disagree on {key}"
    n_experts, n_heads = config.n_routed_experts, config.num_attention_heads
    per_rank = n_experts // ep
    for rank, holds in enumerate([rank0["holds"], rank1["holds"]]):
        assert holds["experts"] == list(range(rank % ep * per_rank, (rank % ep + 1) * per_rank))
        assert holds["heads"] == n_heads // tp


def test_config_rejects_uneven_splits(checkpoints):
    with pytest.raises(ValueError, match="must divide one another"):
        ParallelConfig(tp_size=2, ep_size=3)
    config = GlmConfig.from_pretrained(checkpoints["hf"])
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) is not divisible by 3.*n_routed_experts \(8\)"):
        ParallelConfig(tp_size=3, ep_size=3).check_model(config)
