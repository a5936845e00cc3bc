"""The paged engine on a tensor/expert-parallel replica (CPU, gloo): every rank runs the engine on the same requests
and the replica generates what one process does, MTP speculation included."""

import json
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from engine_fixtures import random_prompts

from glmserve import LLM, SamplingParams

pytestmark = pytest.mark.slow  # spawns the ranks of a replica

TIMEOUT_S = 120
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=12, ignore_eos=True)
PROMPTS = random_prompts([5, 70, 150], 8000, seed=12)  # 150 > index_topk: sparse attention on every rank


def _generate(llm: LLM) -> list[list[int]]:
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    params = [GREEDY, SEEDED, GREEDY]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _run_rank(rank: int, port: int, engine_kwargs: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=TIMEOUT_S))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        llm = LLM(**engine_kwargs)
        model = llm.engine.model
        heads = model.model.layers[0].self_attn.q_b_proj.weight.shape[0] // model.config.qk_head_dim
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"tokens": _generate(llm), "heads": heads}, f)
    finally:
        dist.destroy_process_group()
    os._exit(0)  # see test_parallel.py: gloo's worker threads and interpreter teardown do not mix


@pytest.mark.parametrize(
    "parallel",
    [{"tensor_parallel_size": 2}, {"tensor_parallel_size": 2, "expert_parallel_size": 2}],
    ids=["tp2", "tp2_ep2"],
)
def test_parallel_replica_generates_what_one_process_does(tmp_path, parallel):
    kwargs = {"num_speculative_tokens": 2, "adaptive_speculation": False}
    want = _generate(LLM(**kwargs))
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=TIMEOUT_S), wait_for_workers=False)
    ctx = mp.get_context("spawn")
    ranks = [
        ctx.Process(target=_run_rank, args=(r, store.port, kwargs | parallel, str(tmp_path)), daemon=True)
        for r in range(2)
    ]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(TIMEOUT_S)
        assert p.exitcode == 0, f"a rank exited with {p.exitcode}"
    heads = LLM().engine.config.num_attention_heads
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got["heads"] == heads // 2  # the rank really holds half the heads
        assert got["tokens"] == want


def test_parallel_engine_needs_a_process_group():
    with pytest.raises(ValueError, match="process group"):
        LLM(tensor_parallel_size=2)
