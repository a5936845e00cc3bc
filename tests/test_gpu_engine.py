"""The fused path (Triton attention backend, packed-expert MoE, decode-step graphs) against the plain-torch path.

Without CUDA the Triton kernels run in the interpreter (fp32): a runner on the fused path must give the torch
runner's logits and greedy tokens over mixed prefill/decode steps, padded decode batches included. With CUDA
(`-m gpu`): the engine's greedy output on GPU equals the CPU reference, with and without MTP, and the two backends
agree on random paged batches in bf16.
"""

import pytest
import torch
from engine_fixtures import GreedyReference, make_engine_checkpoint, random_prompts

from glmserve import LLM, SamplingParams
from glmserve.bench.model import Driver, random_model
from glmserve.model.attention_backend import (
    TopkPicks,
    TorchAttention,
    TritonAttention,
    index_chunk_plan,
)
from glmserve.model.config import GlmConfig
from glmserve.model.cuda_graphs import DecodeGraphs
from glmserve.model.fusion import fuse, pack_linears
from glmserve.model.kv_cache import KVCacheSpec, PagedKVCache
from glmserve.model.model_runner import BlockTables, ModelRunner, SeqChunk
from glmserve.model.moe import MoE

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")

# Kernel-friendly dims (powers of two >= 16); 16 index heads make exact ReLU ties rare.
SMALL = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, q_lora_rank=32,
    kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, index_n_heads=16, index_head_dim=16,
    index_topk=16, first_k_dense_replace=1, index_topk_freq=2, index_skip_topk_offset=1, max_position_embeddings=512,
)  # fmt: skip


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# ----------------------------------------------------------------------------------------------- host-side plans


def test_block_tables_copy_only_new_entries_and_notice_replacements():
    tables = BlockTables(max_blocks=6, device=torch.device("cpu"), rows=1)
    a, b = [3, 1], [5]
    rows = tables.rows_for([a, b])
    assert rows[0] != rows[1] and tables.table.shape[0] >= 2  # grew for the second row
    a.append(4)
    assert tables.rows_for([a]) == rows[:1]
    assert tables.table[rows[0], :3].tolist() == [3, 1, 4]
    a[2] = 0  # changed in place: the last entry no longer matches, so the row is copied again
    tables.rows_for([a])
    assert tables.table[rows[0], :3].tolist() == [3, 1, 0]
    replaced = [2, 2]  # a new list object (what the scheduler makes on preemption) gets a row of its own
    assert tables.rows_for([replaced])[0] not in rows
    with pytest.raises(ValueError):
        tables.rows_for([list(range(7))])


def test_block_tables_evict_idle_rows():
    tables = BlockTables(max_blocks=4, device=torch.device("cpu"), rows=2)
    idle, busy = [1], [2]
    tables.rows_for([idle, busy])
    for _ in range(2 * BlockTables.EVICT_EVERY):  # evicted at the first sweep after a whole period idle
        tables.rows_for([busy])
    assert id(idle) not in tables.rows and id(busy) in tables.rows


def test_graph_block_tables_copy_again_only_after_a_change():
    from types import SimpleNamespace

    from glmserve.model.cuda_graphs import GraphBlockTables

    tables = BlockTables(max_blocks=4, device=torch.device("cpu"), rows=2)
    static = GraphBlockTables(SimpleNamespace(tables=tables, device=torch.device("cpu")), max_batch=2)
    seq = [7, 3]

    def refresh(blocks: int) -> None:
        rows = tables.rows_for([seq])
        static.refresh(rows, torch.tensor(rows), blocks)

    refresh(2)
    assert static.tensor[0, :2].tolist() == [7, 3]
    static.tensor[0, 0] = -5  # a marker: an unchanged table is not copied again
    refresh(2)
    assert static.tensor[0, 0] == -5
    refresh(3)  # wider: copied
    assert static.tensor[0, :3].tolist() == [7, 3, 0]
    seq.append(9)  # a new block
    refresh(3)
    assert static.tensor[0, :3].tolist() == [7, 3, 9]


def test_index_chunk_plan_tiles_stay_within_a_sequence_and_a_launch():
    query_start = [0, 5, 6, 140, 141]
    ranges, first, starts, ends = index_chunk_plan(query_start, max_context=1000, block_s=64, max_bytes=4 * 1000 * 64)
    assert ranges == [(0, 64), (64, 128), (128, 141)]
    bounds = first + [len(starts)]
    covered = []
    for (begin, end), t0, t1 in zip(ranges, bounds[:-1], bounds[1:], strict=True):
        for lo, hi in zip(starts[t0:t1], ends[t0:t1], strict=True):
            lo, hi = lo + begin, hi + begin
            assert begin <= lo < hi <= end and hi - lo <= 64
            assert (
                len({next(b for b in range(4) if query_start[b] <= q < query_start[b + 1]) for q in range(lo, hi)}) == 1
            )
            covered += range(lo, hi)
    assert covered == list(range(141))


def test_triton_picks_at():
    picks = TopkPicks(torch.arange(12, dtype=torch.int32).view(4, 3), torch.tensor([1, 3]))
    last = TritonAttention.picks_at(picks, None, picks.last_query)
    assert [p.tolist() for p in last] == [[[3, 4, 5]], [[9, 10, 11]]]
    assert [p.tolist() for p in TritonAttention.picks_at(picks, None, torch.tensor([0, 2]))] == [
        [[0, 1, 2]],
        [[6, 7, 8]],
    ]
    assert TritonAttention.picks_at(None, None, picks.last_query) is None


def test_pack_linears_keeps_one_copy_and_skips_biased_or_parallel_layers():
    a, b = torch.nn.Linear(8, 3, bias=False), torch.nn.Linear(8, 5, bias=False)
    before = torch.cat([a.weight, b.weight]).detach().clone()
    packed = pack_linears([a, b])
    assert torch.equal(packed, before)
    assert a.weight.data_ptr() == packed.data_ptr() and b.weight.data_ptr() == packed[3:].data_ptr()  # views
    x = torch.randn(2, 8)
    assert torch.allclose(torch.nn.functional.linear(x, packed), torch.cat([a(x), b(x)], dim=-1))

    class ParallelLinear(torch.nn.Linear):
        pass

    assert pack_linears([torch.nn.Linear(8, 3), b]) is None  # a bias
    assert pack_linears([ParallelLinear(8, 3, bias=False), b]) is None  # a parallel layer's own forward


# ----------------------------------------------------------------------------------------------- fused runner


def _runner(fused: bool, device: str, dtype: torch.dtype = torch.float32) -> ModelRunner:
    config = GlmConfig.from_dict(SMALL)
    model = random_model(config, dtype, device, seed=3, std=0.2)
    cache = PagedKVCache(KVCacheSpec.from_config(config, dtype), num_blocks=24, device=device)
    if not fused:
        return ModelRunner(model, cache, attention=TorchAttention())
    runner = ModelRunner(fuse(model), cache)
    runner.graphs = DecodeGraphs(runner, 8, capture=CUDA)
    return runner


@pytest.mark.slow
def test_fused_runner_matches_torch_runner():
    """Mixed steps: prompts below and above index_topk, a chunked prompt next to decode tokens, then padded decode
    batches in graph form (eager on CPU): same logits, same KV, same greedy tokens."""
    device = "cuda" if CUDA else "cpu"
    plain, fused = _runner(False, device), _runner(True, device)
    assert fused.fused and fused.graphs is not None
    assert sum(layer.mlp.packed is not None for layer in fused.model.model.layers if isinstance(layer.mlp, MoE)) == 2
    prompts = random_prompts([70, 10, 100], SMALL["vocab_size"], seed=5)
    tables = [[0, 1], [2], [3, 4]]
    steps = [
        [SeqChunk(prompts[0], 0, tables[0]), SeqChunk(prompts[1], 0, tables[1]),
         SeqChunk(prompts[2][:40], 0, tables[2], 0)],
        [SeqChunk(prompts[2][40:], 40, tables[2]), SeqChunk([7], 70, tables[0]), SeqChunk([8], 10, tables[1])],
    ]  # fmt: skip
    for step in steps:
        a, b = plain.forward(step), fused.forward(step)
        assert relative_error(b.logits, a.logits) < 1e-4
    tokens = {0: 71, 1: 11, 2: 100}  # next position of each sequence
    for _ in range(4):  # three sequences: padded to a graph batch of 4
        step = [SeqChunk([(5 * i + pos) % SMALL["vocab_size"]], pos, tables[i]) for i, pos in tokens.items()]
        a, b = plain.forward(step), fused.forward(step)
        assert relative_error(b.logits, a.logits) < 1e-4
        assert torch.equal(a.logits.argmax(-1), b.logits.argmax(-1))
        tokens = {i: pos + 1 for i, pos in tokens.items()}
    assert len(fused.graphs.graphs) == 1
    for layer in range(SMALL["num_hidden_layers"]):
        assert relative_error(fused.cache.latent[layer], plain.cache.latent[layer]) < 1e-4


@pytest.mark.slow
def test_fused_runner_greedy_equals_torch():
    device = "cuda" if CUDA else "cpu"
    outputs = []
    for fused in (False, True):
        driver = Driver(_runner(fused, device), chunk_tokens=48)
        seqs = driver.prefill(random_prompts([5, 30, 17], SMALL["vocab_size"], seed=8))
        driver.decode(seqs, 6)  # contexts cross index_topk: dense then sparse graph buckets
        outputs.append([s.tokens for s in seqs])
    assert outputs[0] == outputs[1]


@pytest.mark.slow
def test_fused_mtp_drafts_match_torch():
    """MTP catch-up, then a draft step of one of the two sequences reusing its catch-up picks (IndexShare across
    draft steps, as the engine runs it): same draft logits on both paths, on the embedded model."""
    from glmserve.model import load_model
    from glmserve.model.default_checkpoint import default_checkpoint
    from glmserve.model.mtp_drafter import MTPDrafter

    device = "cuda" if CUDA else "cpu"
    prompts = random_prompts([150, 200], 8000, seed=6)  # both longer than index_topk (128): sparse
    tables = [[0, 1, 2], [3, 4, 5, 6]]
    outputs = []
    for fused in (False, True):
        model = load_model(default_checkpoint(), dtype=torch.float32, device=device, fused=fused)
        cache = PagedKVCache(KVCacheSpec.from_config(model.config, torch.float32), 8, device)
        runner = ModelRunner(model, cache)
        drafter = MTPDrafter(runner)
        target = runner.forward([SeqChunk(p, 0, t) for p, t in zip(prompts, tables, strict=True)], True)
        sampled = target.logits.argmax(-1).tolist()
        catch_up = [SeqChunk(p[1:] + [s], 0, t) for p, s, t in zip(prompts, sampled, tables, strict=True)]
        out = drafter.run(catch_up, target.all_hidden)
        picks = drafter.reusable(out)
        assert picks is not None and len(picks) == 2
        draft = int(out.logits[1].argmax())
        step = drafter.run([SeqChunk([draft], len(prompts[1]), tables[1])], out.hidden[[1]], [picks[1]])
        outputs.append((out.logits, step.logits))
    (a, a_step), (b, b_step) = outputs
    assert relative_error(b, a) < 1e-4 and relative_error(b_step, a_step) < 1e-4


# ----------------------------------------------------------------------------------------------- GPU


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
DEVICE, DTYPE = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
KV_BYTES = 256 << 20  # an explicit KV budget: the tests do not depend on what else holds GPU memory
KERNEL_FRIENDLY = dict(kv_lora_rank=32, qk_rope_head_dim=16, index_head_dim=16, index_topk=16)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("max_num_seqs", [1, 64])
def test_gpu_engine_greedy_equals_cpu_reference(tmp_path_factory, max_num_seqs):
    path = make_engine_checkpoint(tmp_path_factory.mktemp("gpu-engine"), **KERNEL_FRIENDLY)
    prompts = random_prompts([1, 5, 16, 17, 40, 63, 64, 65, 150], 160, seed=2)
    ref = GreedyReference(path)
    expected = [ref.continue_(p, GREEDY.max_tokens)[0] for p in prompts]
    llm = LLM(str(path), device="cuda", dtype="float32", max_num_seqs=max_num_seqs, kv_cache_memory_bytes=KV_BYTES)
    runner = llm.engine.runner
    assert runner.fused and runner.graphs is not None
    got = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == expected
    assert runner.graphs.graphs, "no decode step ran as a CUDA graph"


@gpu
@pytest.mark.gpu
def test_gpu_embedded_model_matches_cpu_with_and_without_mtp():
    prompts = random_prompts([3, 30, 64, 129, 200], 8000, seed=4)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

    def tokens(llm: LLM) -> list[list[int]]:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]

    cpu = tokens(LLM(device="cpu"))
    assert tokens(LLM(device="cuda", dtype="float32", kv_cache_memory_bytes=KV_BYTES)) == cpu
    assert tokens(LLM(device="cuda", dtype="float32", kv_cache_memory_bytes=KV_BYTES, num_speculative_tokens=2)) == cpu


def _paged_case(context_lens: list[int], queries: list[int], dtype: torch.dtype, topk: int):
    """A runner's step over random caches: sequences with `queries[b]` new tokens ending at `context_lens[b]`."""
    shapes = dict(kv_lora_rank=512, qk_rope_head_dim=64, index_head_dim=128, index_n_heads=32, num_attention_heads=16)
    config = GlmConfig.from_dict(SMALL | shapes | dict(index_topk=topk, max_position_embeddings=4096))
    runner = _runner_for(config, dtype, sum(-(-c // 64) for c in context_lens) + 2)
    cache = runner.cache
    for pool in [*cache.latent, *cache.index_keys.values()]:
        pool.normal_()
    perm = torch.randperm(cache.num_blocks).tolist()
    chunks, used = [], 0
    for ctx, n in zip(context_lens, queries, strict=True):
        blocks = -(-ctx // 64)
        chunks.append(SeqChunk(list(range(n)), ctx - n, perm[used : used + blocks]))
        used += blocks
    return runner.prepare(chunks), cache


def _runner_for(config: GlmConfig, dtype: torch.dtype, num_blocks: int) -> ModelRunner:
    """A runner whose `prepare` builds steps for both backends (the Triton one needs its indexer launch plan)."""
    device = "cuda" if CUDA else "cpu"
    model = random_model(config, dtype, device, seed=1)
    cache = PagedKVCache(KVCacheSpec.from_config(config, dtype), num_blocks, device)
    return ModelRunner(model, cache, attention=TritonAttention())


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("queries", [[1, 1, 1, 1], [1, 200, 1, 3]], ids=["decode", "mixed"])
def test_backends_agree_on_random_batches_gpu(queries):
    topk = 256
    step, cache = _paged_case([1, 256, 257, 1000], queries, DTYPE, topk)
    batch = step.batch
    n = batch.query_pos.numel()
    q_index = torch.randn(n, 32, 128, device=DEVICE, dtype=DTYPE)
    w = torch.randn(n, 32, device=DEVICE)
    pool = cache.index_keys[0]
    torch_picks = TorchAttention().select_topk(batch, q_index, w, pool, topk)
    triton_picks = TritonAttention().select_topk(batch, q_index, w, pool, topk)
    # Same selection: the reference scores of the Triton picks are the reference's top scores (bf16 rounding may
    # swap keys whose scores are within rounding of each other).
    for b, picks in enumerate(torch_picks):
        lo, hi = batch.query_start[b], batch.query_start[b + 1]
        keys = pool.view(-1, 128)[batch.context_slots(b)].float()
        scores = torch.einsum("nhd,td->nht", q_index[lo:hi].float(), keys).relu()
        scores = torch.einsum("nh,nht->nt", w[lo:hi], scores) * 128**-0.5
        got = triton_picks.positions[lo:hi]
        for r in range(hi - lo):
            mine = got[r][got[r] >= 0].long()
            assert mine.numel() == min(topk, int(batch.query_pos[lo + r]) + 1) == mine.unique().numel()
            if picks is not None:
                want = picks[r][picks[r] >= 0].long()
                torch.testing.assert_close(scores[r, mine].sort().values, scores[r, want].sort().values,
                                           rtol=1e-3, atol=1e-3)  # fmt: skip
    # Same attention given the same picks.
    q = torch.randn(n, 16, 576, device=DEVICE, dtype=DTYPE)
    latent = cache.latent[0]
    ref = TorchAttention().attend(batch, q, latent, torch_picks, 512, 576**-0.5)
    positions = torch.full((n, topk), -1, dtype=torch.int32, device=DEVICE)
    for b, picks in enumerate(torch_picks):
        lo, hi = batch.query_start[b], batch.query_start[b + 1]
        if picks is None:
            causal = torch.arange(batch.context_lens[b], device=DEVICE)
            picks = torch.where(causal[None, :] <= batch.query_pos[lo:hi, None], causal, -1)
        positions[lo:hi, : picks.shape[1]] = picks
    out = TritonAttention().attend(batch, q, latent, TopkPicks(positions, batch.last_query), 512, 576**-0.5)
    assert relative_error(out, ref) < 1e-2
