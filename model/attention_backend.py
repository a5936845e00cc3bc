"""Paged DSA attention in plain PyTorch: the CPU path, and the reference the Triton kernels are checked against.

Queries of one step come flattened: query i belongs to sequence `query_seq[i]` and sits at `query_pos[i]`. The
indexer scores every causal key of the index-key pool; attention then reads only the chosen latent rows (or all
causal rows where a query sees no more than `index_topk` keys).
"""

from dataclasses import dataclass

import torch

from .indexer import index_scores, topk_positions


@dataclass
class PagedBatch:
    """Where a step's queries sit and where their sequences' KV lives."""

    query_pos: torch.Tensor  # [N] absolute positions
    query_start: list[int]  # [B + 1] offsets of each sequence's queries in the flat batch
    context_lens: list[int]  # [B] tokens with KV after this step's writes
    block_tables: list[torch.Tensor]  # B x [num_blocks] int64
    block_size: int

    def context_slots(self, b: int) -> torch.Tensor:
        """Flat cache slots of sequence b's tokens 0 .. context_len - 1."""
        table = self.block_tables[b]
        slots = table[:, None] * self.block_size + torch.arange(self.block_size, device=table.device)
        return slots.flatten()[: self.context_lens[b]]


class TorchAttention:
    """One sequence at a time; within a sequence, all of its queries at once."""

    def select_topk(
        self, batch: PagedBatch, q: torch.Tensor, w: torch.Tensor, index_pool: torch.Tensor, topk: int
    ) -> list[torch.Tensor | None]:
        """Per sequence: top-k key positions [n, k] (-1 where a query has fewer causal keys), or None when no query
        of the sequence sees more than `topk` keys (dense attention)."""
        pool = index_pool.view(-1, index_pool.shape[-1])
        chosen: list[torch.Tensor | None] = []
        for b in range(len(batch.context_lens)):
            ctx = batch.context_lens[b]
            if ctx <= topk:
                chosen.append(None)
                continue
            lo, hi = batch.query_start[b], batch.query_start[b + 1]
            keys = pool[batch.context_slots(b)]
            scores = index_scores(q[lo:hi], keys, w[lo:hi])
            causal = torch.arange(ctx, device=q.device)[None, :] <= batch.query_pos[lo:hi, None]
            scores = scores.masked_fill(~causal, float("-inf"))
            top = topk_positions(scores, topk)
            chosen.append(torch.where(causal.gather(1, top), top, -1))
        return chosen

    @staticmethod
    def last_query_picks(chosen: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Each sequence's last query's picks, reused by a one-token step right after (MTP draft steps)."""
        return [None if picks is None else picks[-1:] for picks in chosen]

    def attend(
        self,
        batch: PagedBatch,
        q: torch.Tensor,
        latent_pool: torch.Tensor,
        chosen: list[torch.Tensor | None],
        kv_lora_rank: int,
        scale: float,
    ) -> torch.Tensor:
        """Absorbed MLA. q [N, H, kv_lora + rope] -> [N, H, kv_lora]: softmax-weighted sums of latent rows."""
        pool = latent_pool.view(-1, latent_pool.shape[-1])
        out = q.new_empty(q.shape[0], q.shape[1], kv_lora_rank)
        for b, picks in enumerate(chosen):
            lo, hi = batch.query_start[b], batch.query_start[b + 1]
            slots = batch.context_slots(b)
            pos = batch.query_pos[lo:hi]
            if picks is None:
                rows = pool[slots]  # [T, D], shared by all queries
                scores = torch.einsum("nhd,td->nht", q[lo:hi], rows) * scale
                valid = torch.arange(len(slots), device=q.device)[None, :] <= pos[:, None]
                scores = scores.masked_fill(~valid[:, None], float("-inf"))
                out[lo:hi] = torch.einsum(
                    "nht,tc->nhc", scores.softmax(-1, dtype=torch.float32).to(q.dtype), rows[:, :kv_lora_rank]
                )
            else:
                rows = pool[slots[picks.clamp(min=0)]]  # [n, k, D]
                scores = torch.einsum("nhd,nkd->nhk", q[lo:hi], rows) * scale
                scores = scores.masked_fill((picks < 0)[:, None], float("-inf"))
                out[lo:hi] = torch.einsum(
                    "nhk,nkc->nhc", scores.softmax(-1, dtype=torch.float32).to(q.dtype), rows[..., :kv_lora_rank]
                )
        return out
