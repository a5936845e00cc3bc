"""Logit parity with transformers' GlmMoeDsaForCausalLM, the definition of correct."""

import pytest
import torch
from hf_models import make_hf_model

from glmserve.model import load_model

CASES = {
    # sparsity active (T >> topk), freq 2 / offset 1, group-limited routing, batch 2
    "sparse_groups": (dict(n_group=4, topk_group=2), 2, 40),
    # GLM-5.2's IndexShare schedule (freq 4, offset 3: FFFSSSFS) with three dense first layers
    "indexshare_f4_o3": (
        dict(num_hidden_layers=8, index_topk_freq=4, index_skip_topk_offset=3, first_k_dense_replace=3),
        1,
        48,
    ),
    # an explicit pattern, and a context shorter than top-k (dense regime)
    "pattern_dense": (dict(index_topk_pattern="FSSF", index_topk=64), 2, 30),
    # batch 3, two groups with one chosen, unnormalized routing weights, two shared experts
    "batch3_groups": (dict(n_group=2, topk_group=1, norm_topk_prob=False, index_topk=12, n_shared_experts=2), 3, 36),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    overrides, batch, seq = CASES[case]
    ref = make_hf_model(tmp_path, seed=len(case), **overrides)
    ours = load_model(tmp_path, dtype=torch.float32)
    if "index_topk_pattern" in overrides:
        assert ours.config.indexer_types == ref.config.indexer_types == ["full", "shared", "shared", "full"]
    else:
        assert ours.config.indexer_types == ref.config.indexer_types
    ids = torch.randint(0, ref.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
    got = ours(ids)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-4 * scale


def test_greedy_continuations_identical(tmp_path):
    ref = make_hf_model(tmp_path, seed=7, index_topk=8)
    ours = load_model(tmp_path)
    ids = torch.randint(0, ref.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))
    a = b = ids
    with torch.no_grad():
        for _ in range(32):
            a = torch.cat([a, ref(a).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            b = torch.cat([b, ours(b)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert a.shape[1] == 38 and torch.equal(a, b)
