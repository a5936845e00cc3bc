"""GLM-5.x operator shapes for the cost model: parameters by component (checked against `model/size.py`), the bytes
a tensor/expert-parallel rank holds, KV bytes per token (`model/kv_cache.py`'s layout, or FlashMLA's FP8 one), and
the FLOPs and bytes of one engine step by operator class.

Ranks split a replica as `model/parallel/` does: a replica has max(tp, ep) ranks; attention heads (q_b, kv_b, o_proj),
dense MLP width, embedding and lm_head split over tp; q_a/kv_a, their norms and the DSA indexer are replicated;
routed experts split over ep; the router and the shared expert are replicated, and each rank routes 1/world of the
tokens. Every rank holds the whole KV cache (the latent is not split by heads).
"""

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import torch

from glmserve.model.config import GlmConfig
from glmserve.model.kv_cache import KVCacheSpec

WeightDtype = Literal["fp32", "bf16", "fp16", "fp8"]
KVDtype = Literal["fp32", "bf16", "fp16", "fp8"]
FP8_BLOCK = 128  # one fp32 scale per 128x128 block of an FP8 weight
_TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SIZE = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0 + 4.0 / FP8_BLOCK**2}

# operator classes, each timed by its own roofline (compute at its efficiency, bytes at the memory efficiency)
CLASSES = ("gemm", "moe", "attention", "indexer", "topk")


@dataclass(frozen=True)
class LayerParams:
    """Parameter counts of one decoder layer, by how ranks hold them."""

    attn_replicated: int  # q_a, kv_a (+ biases), their norms
    attn_split: int  # q_b, kv_b, o_proj (heads split over tp)
    indexer: int  # wq_b, wk, k_norm (replicated; 0 on shared layers)
    indexer_fp32: int  # weights_proj (kept fp32 by the loader)
    norms: int  # input and post-attention RMSNorm
    dense_mlp: int  # split over tp (0 on MoE layers)
    router_fp32: int  # gate weight + correction bias (fp32)
    expert: int  # ONE routed expert
    n_experts: int
    shared_expert: int  # replicated
    mtp_extra: int = 0  # enorm, hnorm, eh_proj, shared_head.norm (the MTP layer only)

    @property
    def total(self) -> int:
        return (
            self.attn_replicated + self.attn_split + self.indexer + self.indexer_fp32 + self.norms + self.dense_mlp
            + self.router_fp32 + self.expert * self.n_experts + self.shared_expert + self.mtp_extra
        )  # fmt: skip


class ModelOps:
    """Shapes of one GLM-5.x config under a weight format and a KV-cache format."""

    def __init__(self, config: GlmConfig, weights: WeightDtype = "bf16", kv: KVDtype = "bf16"):
        self.config = config
        self.weights = weights
        self.kv = kv

    # ---- parameters ----
    def layer(self, i: int) -> LayerParams:
        c = self.config
        h, heads = c.hidden_size, c.num_attention_heads
        bias = c.attention_bias
        attn_rep = h * c.q_lora_rank + h * (c.kv_lora_rank + c.qk_rope_head_dim) + c.q_lora_rank + c.kv_lora_rank
        if bias:
            attn_rep += c.q_lora_rank + c.kv_lora_rank + c.qk_rope_head_dim
        attn_split = (
            c.q_lora_rank * heads * c.qk_head_dim
            + c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim)
            + heads * c.v_head_dim * h
            + (h if bias else 0)
        )
        full = c.is_full_indexer_layer(i)
        ih, idim = c.index_n_heads, c.index_head_dim
        indexer = c.q_lora_rank * ih * idim + h * idim + 2 * idim if full else 0
        moe = c.is_moe_layer(i)
        mtp = i >= c.num_hidden_layers
        return LayerParams(
            attn_replicated=attn_rep,
            attn_split=attn_split,
            indexer=indexer,
            indexer_fp32=h * ih if full else 0,
            norms=2 * h,
            dense_mlp=0 if moe else 3 * h * c.intermediate_size,
            router_fp32=(c.n_routed_experts * h + c.n_routed_experts) if moe else 0,
            expert=3 * h * c.moe_intermediate_size if moe else 0,
            n_experts=c.n_routed_experts if moe else 0,
            shared_expert=3 * h * c.moe_intermediate_size * c.n_shared_experts if moe else 0,
            mtp_extra=(3 * h + 2 * h * h) if mtp else 0,
        )

    @cached_property
    def layers(self) -> list[LayerParams]:
        return [self.layer(i) for i in range(self.config.num_layers_with_mtp)]

    @cached_property
    def layer_groups(self) -> list[tuple[LayerParams, int, bool]]:
        """(params, how many layers have them, is the MTP layer), in order of first appearance."""
        groups: dict[tuple[LayerParams, bool], int] = {}
        for i, p in enumerate(self.layers):
            key = (p, i >= self.config.num_hidden_layers)
            groups[key] = groups.get(key, 0) + 1
        return [(p, n, mtp) for (p, mtp), n in groups.items()]

    @property
    def embedding(self) -> int:
        return self.config.vocab_size * self.config.hidden_size

    def total_params(self, with_mtp: bool = True) -> int:
        """Equals `model.size.model_size(config).with_mtp` (or `.main`): tested."""
        n = self.config.num_hidden_layers
        layers = self.layers if with_mtp else self.layers[:n]
        return sum(p.total for p in layers) + 2 * self.embedding + self.config.hidden_size

    def activated_params(self) -> int:
        """Per token in the main model, without the embedding table (`model_size(config).activated`)."""
        k = self.config.num_experts_per_tok
        n = self.config.num_hidden_layers
        return (
            sum(p.total - p.expert * (p.n_experts - k) for p in self.layers[:n] if p.n_experts)
            + sum(p.total for p in self.layers[:n] if not p.n_experts)
            + self.embedding
            + self.config.hidden_size
        )

    # ---- bytes ----
    @property
    def weight_size(self) -> float:
        """Bytes per parameter of the GEMM weights (FP8: e4m3 plus its block scales)."""
        return _SIZE[self.weights]

    @property
    def _small_size(self) -> float:
        """Norms, embedding and lm_head: bf16 in an FP8 checkpoint, else the weight dtype."""
        return 2.0 if self.weights == "fp8" else _SIZE[self.weights]

    def weight_bytes_per_rank(self, tp: int = 1, ep: int = 1, with_mtp: bool = True) -> float:
        """Bytes of weights one rank of a (tp, ep) replica holds."""
        w, small = self.weight_size, self._small_size
        layers = self.layers if with_mtp else self.layers[: self.config.num_hidden_layers]
        total = 0.0
        for p in layers:
            total += w * (p.attn_replicated + p.attn_split / tp + p.indexer + p.shared_expert + p.mtp_extra)
            total += w * (p.dense_mlp / tp + p.expert * p.n_experts / ep)
            total += 4.0 * (p.indexer_fp32 + p.router_fp32) + small * p.norms
        return total + small * (2 * self.embedding / tp + self.config.hidden_size)

    def weight_bytes(self, with_mtp: bool = True) -> float:
        return self.weight_bytes_per_rank(1, 1, with_mtp)

    @property
    def latent_bytes(self) -> float:
        """KV bytes per token per layer of the MLA latent (FP8: FlashMLA's 656 B layout for GLM-5.2)."""
        c = self.config
        if self.kv == "fp8":  # e4m3 latent + one fp32 scale per 128 values + the bf16 rope key
            return c.kv_lora_rank + 4 * (c.kv_lora_rank / 128) + 2 * c.qk_rope_head_dim
        return _SIZE[self.kv] * c.latent_dim

    @property
    def index_key_bytes(self) -> float:
        """Indexer-key bytes per token on a full layer (FP8: e4m3 plus one fp32 scale)."""
        d = self.config.index_head_dim
        return d + 4.0 if self.kv == "fp8" else _SIZE[self.kv] * d

    def kv_bytes_per_token(self, num_layers: int | None = None) -> float:
        """KV bytes per token over the first `num_layers` layers (default: all, the MTP layer included), as
        `model/kv_cache.KVCacheSpec` lays them out (indexer keys on full layers only)."""
        c = self.config
        n = c.num_layers_with_mtp if num_layers is None else num_layers
        if self.kv in _TORCH:
            spec = KVCacheSpec.from_config(c, _TORCH[self.kv])
            index_layers = sum(1 for i in spec.index_layers if i < n)
            return (n * spec.latent_dim + index_layers * spec.index_dim) * spec.dtype.itemsize
        index_layers = sum(1 for i in range(n) if c.is_full_indexer_layer(i))
        return n * self.latent_bytes + index_layers * self.index_key_bytes

    @property
    def full_layers(self) -> int:
        return sum(1 for i in range(self.config.num_hidden_layers) if self.config.is_full_indexer_layer(i))


@dataclass
class LayerWork:
    """FLOPs and bytes of `count` identical layers, per layer, by operator class; `floor` says whether the per-layer
    kernel floor applies (not to the lm_head and embedding)."""

    count: int
    flops: dict[str, float]
    bytes: dict[str, float]
    floor: bool = True


@dataclass
class StepWork:
    """One step on one rank: its layers' work, and what the communication moves."""

    layers: list[LayerWork] = field(default_factory=list)
    tp_allreduce_bytes: float = 0.0  # summed over the step's all-reduces (each rank's payload)
    tp_collectives: int = 0
    ep_alltoall_bytes: float = 0.0  # sent by one rank
    ep_collectives: int = 0
    world_gather_bytes: float = 0.0  # all-gather of expert outputs across the replica
    world_collectives: int = 0
    tokens: int = 0
    seqs: int = 0

    def total(self, what: str, cls: str) -> float:
        return sum(lw.count * getattr(lw, what)[cls] for lw in self.layers)


def causal_keys(start: int, n: int, cap: int | None = None) -> float:
    """Sum over queries at positions start..start+n-1 of the keys each sees (p + 1), capped at `cap` per query."""
    if n <= 0:
        return 0.0
    if cap is None or start + n <= cap:
        return n * start + n * (n + 1) / 2
    below = max(0, min(n, cap - start))  # queries that see fewer than cap keys
    return (below * start + below * (below + 1) / 2) + (n - below) * cap


def step_work(
    ops: ModelOps,
    chunks: tuple[tuple[int, int], ...],
    decode_seqs: int,
    decode_context: float,
    k: int,
    accepted: float,
    tp: int = 1,
    ep: int = 1,
    mtp: bool = False,
) -> StepWork:
    """One engine step: prefill `chunks` (new tokens, tokens already cached) and `decode_seqs` decoding sequences
    of mean context `decode_context`, each verifying `k` drafts (emitting `accepted` tokens on average). With
    `mtp`, the MTP layer catches up on every position whose next token is known and drafts k tokens."""
    c = ops.config
    world = max(tp, ep)
    w, act = ops.weight_size, 2.0  # activations travel in bf16
    h, heads, topk = c.hidden_size, c.num_attention_heads, c.index_topk
    b = decode_seqs
    q_decode = b * (1 + k)
    prefill_tokens = sum(n for n, _ in chunks)
    tokens = prefill_tokens + q_decode
    logits_rows = len(chunks) + q_decode
    work = StepWork(tokens=tokens, seqs=b + len(chunks))
    if tokens == 0:
        return work
    ctx_dense = min(decode_context, topk)  # keys one decode query attends to
    ctx_end = decode_context + k  # keys of the last verified position
    mtp_tokens = 0.0
    if mtp and c.num_nextn_predict_layers:  # catch-up on the prompt and on accepted positions, then draft passes
        mtp_tokens = prefill_tokens + b * accepted + b * max(k - 1, 0)
    attn_chunk_keys = sum(causal_keys(s, m, topk) for m, s in chunks)
    chunk_kv = sum(s + m for m, s in chunks)
    scored = [(m, s) for m, s in chunks if s + m > topk]  # scoring runs only past top-k keys (else dense)
    idx_chunk_keys = sum(causal_keys(s, m) for m, s in scored)
    idx_chunk_kv = sum(s + m for m, s in scored)
    ih, idim = c.index_n_heads, c.index_head_dim
    per_key = 2 * (heads / tp) * (c.latent_dim + c.kv_lora_rank)  # q.k over the latent, p.v over kv_lora
    for p, count, is_mtp in ops.layer_groups:
        n = mtp_tokens if is_mtp else tokens
        if n <= 0:
            continue
        flops = dict.fromkeys(CLASSES, 0.0)
        nbytes = dict.fromkeys(CLASSES, 0.0)
        # decode queries of this layer (the MTP layer: one per pass, at about the same context)
        dq = (n - prefill_tokens) if is_mtp else q_decode
        dseqs = dq if is_mtp else b
        attn_params = p.attn_replicated + p.attn_split / tp + p.indexer + p.mtp_extra
        flops["gemm"] = 2 * n * (attn_params + p.indexer_fp32 + p.dense_mlp / tp)
        nbytes["gemm"] = w * (attn_params + p.dense_mlp / tp) + 4.0 * p.indexer_fp32
        if p.n_experts:
            slice_tokens = n / world  # each rank routes 1/world of the tokens
            flops["gemm"] += 2 * slice_tokens * (p.shared_expert + p.router_fp32)
            nbytes["gemm"] += w * p.shared_expert + 4.0 * p.router_fp32
            choices = slice_tokens * c.num_experts_per_tok  # (token, expert) pairs routed from this rank
            flops["moe"] = 2 * choices * p.expert  # the cost model applies the imbalance
            touched = 1.0 - (1.0 - 1.0 / p.n_experts) ** (choices * ep)  # share of an expert's weights read
            nbytes["moe"] = w * p.expert * (p.n_experts / ep) * touched
            if ep > 1:
                work.ep_alltoall_bytes += count * 2 * choices * (ep - 1) / ep * h * act  # dispatch + combine
                work.ep_collectives += count * 2
            if world > 1:
                work.world_gather_bytes += count * n * h * act * (world - 1) / world
                work.world_collectives += count
        if tp > 1:
            work.tp_allreduce_bytes += count * n * h * act * (1 + (p.dense_mlp > 0))
            work.tp_collectives += count * (1 + (p.dense_mlp > 0))
        flops["attention"] = per_key * (dq * ctx_dense + attn_chunk_keys)
        nbytes["attention"] = ops.latent_bytes * (dseqs * ctx_dense + chunk_kv)
        if p.indexer or is_mtp:
            idx_keys = (dq * ctx_end if ctx_end > topk else 0.0) + idx_chunk_keys
            flops["indexer"] = 2 * ih * idim * idx_keys
            nbytes["indexer"] = ops.index_key_bytes * ((dseqs * ctx_end if ctx_end > topk else 0.0) + idx_chunk_kv)
            nbytes["topk"] = 8.0 * idx_keys  # fp32 logits written, then read by the selection
        work.layers.append(LayerWork(count, flops, nbytes))
    # lm_head on the logits rows (the MTP drafts share it)
    rows = logits_rows + (b * k if mtp else 0)
    head = LayerWork(1, dict.fromkeys(CLASSES, 0.0), dict.fromkeys(CLASSES, 0.0), floor=False)
    head.flops["gemm"] = 2 * rows * h * c.vocab_size / tp
    head.bytes["gemm"] = ops._small_size * h * c.vocab_size / tp + rows * c.vocab_size * 4.0 / tp
    work.layers.append(head)
    if tp > 1:
        work.tp_allreduce_bytes += tokens * h * act  # the vocab-split embedding
        work.tp_allreduce_bytes += rows * c.vocab_size * 4.0 / 2  # logits all-gather: half an all-reduce's bytes
        work.tp_collectives += 2
    return work
