import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glmserve.model import GlmConfig, GlmForCausalLM, load_model
from glmserve.model.default_checkpoint import random_init_
from glmserve.train.code_corpus import CorpusInfo, drop_near_copies, save_tokens
from glmserve.train.eval_tiny import body_parses, function_body, function_prompts, index_topk
from glmserve.train.train_tiny import (
    TrainConfig,
    Trainer,
    indexer_kl,
    learning_rate,
    model_losses,
    moe_forward,
    train,
)

TINY = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 1,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 8,
    "index_n_heads": 2,
    "index_head_dim": 16,
    "index_topk": 6,
    "index_topk_freq": 2,
    "index_skip_topk_offset": 1,
    "max_position_embeddings": 256,
    "num_nextn_predict_layers": 1,
    "eos_token_id": [0],
}


def tiny_model(seed: int = 0) -> GlmForCausalLM:
    model = GlmForCausalLM(GlmConfig.from_dict(TINY))
    random_init_(model, seed, std=0.2)  # large weights: sharp attention and index scores, so top-k matters
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    return model.eval()


def synthetic_stream(length: int, vocab: int, seed: int) -> np.ndarray:
    """Learnable text: runs of counting sequences with random starts and strides."""
    rng = np.random.default_rng(seed)
    pieces = []
    while sum(len(p) for p in pieces) < length:
        start, stride = rng.integers(1, vocab), rng.integers(1, 4)
        pieces.append((start + stride * np.arange(rng.integers(8, 40))) % (vocab - 1) + 1)
    return np.concatenate(pieces)[:length].astype(np.uint16)


def test_training_forward_matches_the_reference_forward():
    model = tiny_model()
    windows = torch.randint(1, TINY["vocab_size"], (2, 42), generator=torch.Generator().manual_seed(1))
    ids, next_ids, next_next_ids = windows[:, :-2], windows[:, 1:-1], windows[:, 2:]
    with torch.no_grad():
        sparse = model_losses(model, windows, sparse=True)
        dense = model_losses(model, windows, sparse=False)
        ref_sparse = F.cross_entropy(model(ids).flatten(0, 1), next_ids.flatten())
        mtp_logits, _ = model.mtp_reference(model.hidden_states(ids), next_ids)
        ref_mtp = F.cross_entropy(mtp_logits.flatten(0, 1), next_next_ids.flatten())
        with index_topk(model, ids.shape[1]):
            ref_dense = F.cross_entropy(model(ids).flatten(0, 1), next_ids.flatten())
    torch.testing.assert_close(sparse.ce, ref_sparse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.mtp, ref_mtp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense.ce, ref_dense, rtol=1e-5, atol=1e-5)
    assert abs(sparse.ce.item() - dense.ce.item()) > 1e-3  # top-6 of 40 keys must change the result
    assert sparse.kl.item() > 0 and dense.kl.item() > 0
    assert len(sparse.expert_ids) == 4  # layers 1-3 and the MTP layer are MoE


def test_dense_expert_sum_equals_routed_moe():
    model = tiny_model()
    moe = model.model.layers[2].mlp
    x = torch.randn(3, 7, TINY["hidden_size"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, ids = moe_forward(moe, x)
        torch.testing.assert_close(out, moe(x), rtol=1e-5, atol=1e-5)
    assert ids.shape == (21, TINY["num_experts_per_tok"])


def test_indexer_kl_is_zero_only_when_scores_match_attention():
    gen = torch.Generator().manual_seed(3)
    seq = 10
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()[None].expand(2, seq, seq)
    logits = torch.randn(2, 3, seq, seq, generator=gen).masked_fill(~mask[:, None], float("-inf"))
    probs = logits.softmax(-1)
    target = probs.mean(1)
    matching = target.log()  # softmax(log p) = p on the masked keys
    assert indexer_kl(matching, probs, mask).abs().item() < 1e-5
    other = torch.randn(2, seq, seq, generator=gen)
    expected = target * (target.log() - other.masked_fill(~mask, float("-inf")).log_softmax(-1))
    expected = expected.masked_fill(~mask, 0).sum(-1).mean()
    torch.testing.assert_close(indexer_kl(other, probs, mask), expected)
    assert expected.item() > 0.05


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(0, 100, cfg) == pytest.approx(1e-4)
    assert learning_rate(9, 100, cfg) == pytest.approx(1e-3)
    assert learning_rate(55, 100, cfg) == pytest.approx(0.55e-3)
    assert learning_rate(100, 100, cfg) == pytest.approx(1e-4)


def _run(tmp_path, seed: int, steps: int = 40):
    cfg = TrainConfig(
        seed=seed, seq_len=24, batch_size=8, steps=steps, lr=1e-2, warmup_steps=5, eval_every=20,
        eval_windows=4, final_eval_windows=4, dense_fraction=0.5,
    )  # fmt: skip
    config = GlmConfig.from_dict(TINY)
    trainer = Trainer(config, cfg, synthetic_stream(20_000, 96, 0), synthetic_stream(2_000, 96, 1), torch.device("cpu"))
    tmp_path.mkdir()
    (tmp_path / "config.json").write_text(config.model_dump_json())  # so load_model reads the checkpoint back
    return trainer, trainer.run(tmp_path, deadline=time.monotonic() + 120)


@pytest.mark.slow
def test_a_few_steps_learn_are_reproducible_and_save_a_loadable_checkpoint(tmp_path):
    trainer, result = _run(tmp_path / "a", seed=5)
    train_ce = [r["ce"] for r in result["train"]]
    assert result["steps"] == 40 and result["dense_steps"] == 20
    assert [r["phase"] for r in result["train"]].count("sparse") == 20
    assert np.mean(train_ce[-5:]) < train_ce[0] - 0.5  # starts near ln(96) = 4.56
    assert result["eval"][-1]["heldout_ce"] < math.log(96) - 0.5
    bias = np.array(result["expert_bias"])
    assert bias.shape == (4, 4) and np.abs(bias).max() > 0  # aux-loss-free balancing moved the bias

    _, again = _run(tmp_path / "b", seed=5)
    assert [r["ce"] for r in again["train"]] == train_ce
    _, other = _run(tmp_path / "c", seed=6, steps=3)
    assert [r["ce"] for r in other["train"]] != train_ce[:3]

    loaded = load_model(tmp_path / "a")  # bf16 weights, read back as fp32
    windows = trainer.final_windows[:2]
    with torch.no_grad():
        ref = F.cross_entropy(loaded(windows[:, :-2]).flatten(0, 1), windows[:, 1:-1].flatten())
    assert ref.item() == pytest.approx(result["final_heldout"]["sparse"]["ce"], abs=0.15)


def test_train_writes_log_and_curve(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    data = tmp_path / "data"
    data.mkdir()
    save_tokens(data, "train", synthetic_stream(5_000, 96, 0))
    save_tokens(data, "heldout", synthetic_stream(1_000, 96, 1))
    info = CorpusInfo(
        tokenizer="synthetic", eos_token_id=0, train_files=1, train_tokens=5_000, heldout_files=1,
        heldout_tokens=1_000, stdlib_root="/", site_packages_root=None, site_packages_files=0,
        site_packages_near_copies_dropped=0,
    )  # fmt: skip
    (data / "corpus.json").write_text(info.model_dump_json())
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(GlmConfig.from_dict(TINY).model_dump_json())
    cfg = TrainConfig(seq_len=16, batch_size=4, steps=6, warmup_steps=2, eval_windows=2, final_eval_windows=2)
    out = tmp_path / "out"
    result = train(data, out, cfg, torch.device("cpu"), checkpoint=ckpt)
    assert result["steps"] == 6
    for name in ("model.safetensors", "train_log.json", "loss_curve.png", "config.json"):
        assert (out / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_function_body_stops_at_dedent_and_drops_a_cut_line():
    assert function_body("    x = 1\n    return x\ndef g():\n", cut_by_limit=False) == "    x = 1\n    return x\n"
    assert function_body("    x = 1\n    return (x +", cut_by_limit=True) == "    x = 1\n"
    assert function_body("\n    return 2\n\nclass A:", cut_by_limit=True) == "\n    return 2\n\n"


def test_body_parses_needs_a_statement_after_the_docstring():
    prompt = 'def f(a):\n    """Add one."""\n'
    assert body_parses(prompt, "    return a + 1\n")
    assert not body_parses(prompt, "")  # a docstring alone does not count
    assert not body_parses(prompt, "    return (a +\n")


def test_function_prompts_take_header_and_docstring(tmp_path):
    (tmp_path / "m.py").write_text(
        'import os\n\n\ndef keep(a,\n         b):\n    """Doc\n    more."""\n    return a\n\n\n'
        'def no_doc():\n    return 1\n\n\ndef only_doc():\n    """Nothing else."""\n'
    )
    (tmp_path / "bad.py").write_text("def (:\n")
    prompts = function_prompts(tmp_path, [tmp_path / "m.py", tmp_path / "bad.py"], count=1)
    assert [(p.name, p.prompt) for p in prompts] == [("keep", 'def keep(a,\n         b):\n    """Doc\n    more."""\n')]
    with pytest.raises(ValueError, match="only 1 eligible"):
        function_prompts(tmp_path, [tmp_path / "m.py"], count=2)


def test_near_copies_of_heldout_files_are_dropped(tmp_path):
    held, site = tmp_path / "stdlib", tmp_path / "site"
    held.mkdir(), site.mkdir()
    body = "".join(f"    value_{i} = compute_something_long(argument_{i}, other_{i})\n" for i in range(10))
    (held / "core.py").write_text("def f():\n" + body)
    (site / "fork.py").write_text("def g():\n" + body[: len(body) // 2] + "    return None  # a fork that kept half\n")
    (site / "new.py").write_text("def h():\n    return compute_something_else_entirely(argument_1)\n")
    kept = drop_near_copies(site, [Path("fork.py"), Path("new.py")], held, [Path("core.py")])
    assert kept == [Path("new.py")]
