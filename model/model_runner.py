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
    need_logits: bool  # sample after the last new token
    request_id: str = ""  # lets a layer hook tell whose rows were written


@dataclass
class StepOutput:
    logits: torch.Tensor  # [num chunks with need_logits, vocab] fp32
    hidden: torch.Tensor  # final-norm hidden states of the same tokens (the MTP layer drafts from them)


class ModelRunner:
    def __init__(self, model: GlmForCausalLM, cache: PagedKVCache, attention: TorchAttention | None = None):
        self.model = model
        self.config = model.config
        self.cache = cache
        self.attention = attention or TorchAttention()
        self.device = model.lm_head.weight.device
        # kv_b_proj split per head, for absorbed attention.
        self.absorbed = [layer.self_attn.absorbed_weights() for layer in model.model.layers]
        # Called after each layer's KV is written: (layer, chunks, flat slots of their tokens). Prefill workers
        # stream finished layers out through it while later layers compute.
        self.layer_hook: Callable[[int, list[SeqChunk], torch.Tensor], None] | None = None

    def _batch(self, chunks: list[SeqChunk]) -> tuple[torch.Tensor, PagedBatch, torch.Tensor, torch.Tensor]:
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
        logits_at = torch.tensor([starts[i + 1] - 1 for i, c in enumerate(chunks) if c.need_logits], device=dev)
        return ids, batch, slots, logits_at

    @torch.inference_mode()
    def forward(self, chunks: list[SeqChunk]) -> StepOutput:
        ids, batch, slots, logits_at = self._batch(chunks)
        model, cfg = self.model, self.config
        x = model.model.embed_tokens(ids)
        cos, sin = model.rope(batch.query_pos, x.dtype)
        chosen = None
        for i, layer in enumerate(model.decoder_layers):
            h = layer.input_layernorm(x)
            attn = layer.self_attn
            p = attn.project(h, cos, sin)
            index_keys = attn.indexer.keys(h, cos, sin) if attn.indexer is not None else None
            self.cache.write(i, slots, torch.cat((p.latent, p.k_rope), dim=-1), index_keys)
            if self.layer_hook is not None:
                self.layer_hook(i, chunks, slots)
            if attn.indexer is not None:
                q_index = attn.indexer.queries(p.q_resid, cos, sin)
                chosen = self.attention.select_topk(
                    batch, q_index, attn.indexer.head_weights(h), self.cache.index_keys[i], cfg.index_topk
                )
            w_uk, w_uv = self.absorbed[i]
            q = torch.cat((torch.einsum("nhd,hdc->nhc", p.q_nope, w_uk), p.q_rope), dim=-1)
            o = self.attention.attend(batch, q, self.cache.latent[i], chosen, cfg.kv_lora_rank, cfg.softmax_scale)
            x = x + attn.o_proj(torch.einsum("nhc,hvc->nhv", o, w_uv).flatten(1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        hidden = model.model.norm(x[logits_at])
        return StepOutput(logits=model.lm_head(hidden).float(), hidden=hidden)
