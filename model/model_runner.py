"""One forward over a flat batch of sequences in mixed phases (prefill chunks and decode tokens) on the paged cache.

Per layer: project the new tokens, write their latent (and, on full-indexer layers, indexer keys) into the cache,
pick top-k keys per query on full layers (shared layers reuse the pick of the full layer before them, within the
same step), attend in the absorbed latent space, then the MLP or MoE. Logits are computed only where asked.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .attention_backend import PagedBatch, TorchAttention
from .glm import GlmForCausalLM
from .kv_cache import PagedKVCache


@dataclass
class SeqChunk:
    """One sequence's part of a step."""

    token_ids: list[int]  # the new tokens
    start_pos: int  # position of token_ids[0]; tokens before it already have KV in the cache
    block_table: list[int]
    num_logits: int = 1  # logits for the last this-many new tokens (1: sample; K+1: verify K drafts; 0: none)
    request_id: str = ""  # lets a layer hook tell whose rows were written


@dataclass
class StepOutput:
    logits: torch.Tensor  # [sum of num_logits, vocab] fp32, chunk by chunk
    hidden: torch.Tensor  # final-norm hidden states of the same rows
    all_hidden: torch.Tensor | None = None  # final-norm hidden of every new token, when asked (MTP catch-up)


@dataclass
class StepInputs:
    """A step's tensors, built once and shared by every layer (and the MTP layer)."""

    chunks: list[SeqChunk]
    ids: torch.Tensor
    batch: PagedBatch
    slots: torch.Tensor
    logits_at: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


class ModelRunner:
    def __init__(self, model: GlmForCausalLM, cache: PagedKVCache, attention: TorchAttention | None = None):
        self.model = model
        self.config = model.config
        self.cache = cache
        self.attention = attention or TorchAttention()
        self.device = model.lm_head.weight.device
        # kv_b_proj split per head, for absorbed attention.
        self.absorbed = [layer.self_attn.absorbed_weights() for layer in model.model.layers]
        # Called after each layer's KV is written, with the step's inputs (which tokens went to which slots).
        # Prefill workers stream finished layers out through it while later layers compute.
        self.layer_hook: Callable[[int, StepInputs], None] | None = None

    def prepare(self, chunks: list[SeqChunk]) -> StepInputs:
        bs = self.cache.spec.block_size
        dev = self.device
        ids = torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.long, device=dev)
        positions = torch.cat([torch.arange(c.start_pos, c.start_pos + len(c.token_ids)) for c in chunks]).to(dev)
        tables = [torch.tensor(c.block_table, dtype=torch.long, device=dev) for c in chunks]
        starts = [0]
        for c in chunks:
            starts.append(starts[-1] + len(c.token_ids))
        batch = PagedBatch(
            query_pos=positions,
            query_start=starts,
            context_lens=[c.start_pos + len(c.token_ids) for c in chunks],
            block_tables=tables,
            block_size=bs,
        )
        seq_of_query = torch.repeat_interleave(
            torch.arange(len(chunks), device=dev), torch.tensor([len(c.token_ids) for c in chunks], device=dev)
        )
        table_pad = torch.nn.utils.rnn.pad_sequence(tables, batch_first=True)
        slots = table_pad[seq_of_query, positions // bs] * bs + positions % bs
        logits_at = torch.tensor(
            [j for i, c in enumerate(chunks) for j in range(starts[i + 1] - c.num_logits, starts[i + 1])],
            dtype=torch.long,
            device=dev,
        )
        cos, sin = self.model.rope(positions, self.model.lm_head.weight.dtype)
        return StepInputs(chunks, ids, batch, slots, logits_at, cos, sin)

    def run_layer(self, i: int, x: torch.Tensor, step: StepInputs, chosen, reuse_topk: bool = False):
        """One decoder layer (index i; the MTP layer too) on the paged cache: write this step's KV, pick top-k on
        layers that own an indexer (unless `reuse_topk`: keep `chosen`), attend, MLP. Returns (x, chosen)."""
        layer = self.model.model.layers[i]
        cfg = self.config
        h = layer.input_layernorm(x)
        attn = layer.self_attn
        p = attn.project(h, step.cos, step.sin)
        index_keys = attn.indexer.keys(h, step.cos, step.sin) if attn.indexer is not None else None
        self.cache.write(i, step.slots, torch.cat((p.latent, p.k_rope), dim=-1), index_keys)
        if self.layer_hook is not None:
            self.layer_hook(i, step)
        if attn.indexer is not None and not reuse_topk:
            q_index = attn.indexer.queries(p.q_resid, step.cos, step.sin)
            chosen = self.attention.select_topk(
                step.batch, q_index, attn.indexer.head_weights(h), self.cache.index_keys[i], cfg.index_topk
            )
        w_uk, w_uv = self.absorbed[i]
        q = torch.cat((torch.einsum("nhd,hdc->nhc", p.q_nope, w_uk), p.q_rope), dim=-1)
        o = self.attention.attend(step.batch, q, self.cache.latent[i], chosen, cfg.kv_lora_rank, cfg.softmax_scale)
        x = x + attn.o_proj(torch.einsum("nhc,hvc->nhv", o, w_uv).flatten(1))
        return x + layer.mlp(layer.post_attention_layernorm(x)), chosen

    @torch.inference_mode()
    def forward(self, chunks: list[SeqChunk], keep_all_hidden: bool = False) -> StepOutput:
        step = self.prepare(chunks)
        model = self.model
        x = model.model.embed_tokens(step.ids)
        chosen = None
        for i in range(self.config.num_hidden_layers):
            x, chosen = self.run_layer(i, x, step, chosen)
        if keep_all_hidden:
            all_hidden = model.model.norm(x)
            hidden = all_hidden[step.logits_at]
        else:
            all_hidden, hidden = None, model.model.norm(x[step.logits_at])
        return StepOutput(logits=model.lm_head(hidden).float(), hidden=hidden, all_hidden=all_hidden)
