"""Paged DSA attention: the plain-PyTorch backend (the CPU path, and the reference) and the Triton backend (GPU).

Queries of one step come flattened: query i belongs to sequence `query_seq[i]` (a row of `block_tables`) and sits at
`query_pos[i]`; the queries of one sequence are contiguous. The indexer scores every causal key of the index-key
pool; attention then reads only the chosen latent rows (or all causal rows where a query sees no more than
`index_topk` keys).

Both backends have `select_topk` (on layers that run their own indexer) and `attend`; what `select_topk` returns
is opaque to the runner and passed on to `attend` by the shared layers after it (IndexShare).
"""

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from .config import GlmConfig
from .indexer import index_scores, topk_positions

# Indexer logits are materialized for at most this many bytes at a time (fp32 [queries, keys]): 256 queries per
# launch at 1M keys, 2048 at 128K.
MAX_LOGITS_BYTES = 1 << 30
# Steps whose sequences bring at most this many queries each (decode, MTP verification) score keys per query.
PER_QUERY_MAX_QUERIES = 8

StageTimer = Callable[[str], AbstractContextManager]


def no_stage(name: str) -> AbstractContextManager:
    return contextlib.nullcontext()


@dataclass
class IndexChunk:
    """Queries [begin, end) of a step scored in one indexer launch, and their tiles of one sequence each (start,
    end relative to `begin`, int32 on the device)."""

    begin: int
    end: int
    tile_start: torch.Tensor
    tile_end: torch.Tensor


def index_chunk_plan(
    query_start: list[int], max_context: int, block_s: int, max_bytes: int = MAX_LOGITS_BYTES
) -> tuple[list[tuple[int, int]], list[int], list[int], list[int]]:
    """Host-side plan of a step's indexer launches: row ranges, and the query tiles (runs of at most `block_s`
    queries of one sequence, never across a range boundary). Returns (ranges, first tile of each range, tile
    starts, tile ends), tile offsets relative to their range. Costs O(queries / block_s + sequences)."""
    num_queries = query_start[-1]
    rows = max(block_s, max_bytes // (4 * max(max_context, 1)) // block_s * block_s)
    cuts = set(range(0, num_queries, rows)) | {num_queries}
    for begin, end in zip(query_start[:-1], query_start[1:], strict=True):
        cuts.update(range(begin, end, block_s))
    cuts = sorted(cuts)
    ranges = [(begin, min(begin + rows, num_queries)) for begin in range(0, num_queries, rows)]
    first_tile, starts, ends = [], [], []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        begin = lo // rows * rows
        if lo == begin:
            first_tile.append(len(starts))
        starts.append(lo - begin)
        ends.append(hi - begin)
    return ranges, first_tile, starts, ends


@dataclass
class PagedBatch:
    """Where a step's queries sit and where their sequences' KV lives."""

    query_pos: torch.Tensor  # [N] int32 absolute positions
    query_seq: torch.Tensor  # [N] int32 sequence of each query (its row of block_tables)
    query_start: list[int]  # [B + 1] offsets of each sequence's queries in the flat batch
    context_lens: list[int]  # [B] tokens with KV after this step's writes (an upper bound in CUDA-graph steps)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    block_size: int
    max_context: int  # >= every context: the width of the indexer logits
    last_query: torch.Tensor  # [B] index of each sequence's last query
    index_chunks: list[IndexChunk]  # the Triton backend's indexer launches (empty for the torch backend)
    max_queries_per_seq: int

    def context_slots(self, b: int) -> torch.Tensor:
        """Flat cache slots of sequence b's tokens 0 .. context_len - 1."""
        table = self.block_tables[b].long()
        slots = table[:, None] * self.block_size + torch.arange(self.block_size, device=table.device)
        return slots.flatten()[: self.context_lens[b]]


class TorchAttention:
    """One sequence at a time; within a sequence, all of its queries at once. Picks are a list with, per sequence,
    its top-k positions [n, k] (-1 padded) or None where the sequence is short enough for dense attention."""

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
    def picks_at(chosen: list[torch.Tensor | None], batch: PagedBatch, rows: torch.Tensor) -> list[torch.Tensor | None]:
        """Per sequence b, the picks [1, k] of the step's query `rows[b]`, reused by a one-token step right after
        (MTP draft steps)."""
        return [
            None if picks is None else picks.index_select(0, rows[b : b + 1] - batch.query_start[b])
            for b, picks in enumerate(chosen)
        ]

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


@dataclass
class TopkPicks:
    """The Triton backend's picks for a whole step: positions [N, k] int32, best first, -1 padded."""

    positions: torch.Tensor
    last_query: torch.Tensor  # [B] each sequence's last row


def _power_of_two_from_16(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


class TritonAttention:
    """The whole batch in a few launches: indexer logits in bounded chunks of queries, one torch.topk per chunk,
    sparse (or dense) paged MLA. Picks are None when every context fits in `topk` (dense attention), else one
    TopkPicks: a short sequence in a sparse step gets all of its causal keys, which is dense attention too.

    No host sync anywhere: a decode step runs inside a CUDA graph. `stage` is called around the indexer and top-k
    launches (benchmarks time the stages through it)."""

    def __init__(self) -> None:
        # Triton loads with the first Triton backend, not with this module.
        from .kernels import indexer, paged_mla, topk

        self.kernels = indexer, paged_mla, topk
        self.stage: StageTimer = no_stage

    @property
    def tile_queries(self) -> int:
        """Queries per tile of the multi-query indexer kernel: `index_chunk_plan`'s block_s."""
        return self.kernels[0].INDEXER_BLOCK_S

    @staticmethod
    def supports(config: GlmConfig) -> bool:
        """The kernels want power-of-two latent, rope and indexer dims of at least 16 (tensor-core tiles)."""
        dims = (config.kv_lora_rank, config.qk_rope_head_dim, config.index_head_dim)
        return all(_power_of_two_from_16(d) for d in dims)

    def select_topk(
        self, batch: PagedBatch, q: torch.Tensor, w: torch.Tensor, index_pool: torch.Tensor, topk: int
    ) -> TopkPicks | None:
        if batch.max_context <= topk:
            return None
        indexer, _, topk_kernels = self.kernels
        w = (w * q.shape[-1] ** -0.5).contiguous()  # the kernels take the D^-0.5 scale inside the head weights
        picks = torch.empty(q.shape[0], topk, dtype=torch.int32, device=q.device)
        per_query = batch.max_queries_per_seq <= PER_QUERY_MAX_QUERIES
        for chunk in batch.index_chunks:
            rows = slice(chunk.begin, chunk.end)
            args = (q[rows], w[rows], index_pool, batch.block_tables, batch.query_seq[rows], batch.query_pos[rows])
            with self.stage("indexer"):
                if per_query:
                    logits = indexer.indexer_logits_per_query_triton(*args, batch.max_context)
                else:
                    logits = indexer.indexer_logits_triton(
                        *args, batch.max_context, tiles=(chunk.tile_start, chunk.tile_end)
                    )
            with self.stage("topk"):
                if per_query:
                    picks[rows] = topk_kernels.topk_causal_logits_few_rows(logits, batch.query_pos[rows], topk)
                else:
                    picks[rows] = topk_kernels.topk_causal_logits(logits, topk)
        return TopkPicks(picks, batch.last_query)

    @staticmethod
    def picks_at(chosen: TopkPicks | None, batch: PagedBatch, rows: torch.Tensor) -> list[torch.Tensor] | None:
        """Per sequence b, the picks [1, k] of the step's query `rows[b]`, one list entry per sequence (the engine
        keeps the entries of the sequences still drafting), reused by the one-token steps right after (MTP draft
        steps). None after a dense step: the draft steps then select their own."""
        if chosen is None:
            return None
        return list(chosen.positions[rows].split(1))

    def attend(
        self,
        batch: PagedBatch,
        q: torch.Tensor,
        latent_pool: torch.Tensor,
        chosen: TopkPicks | list[torch.Tensor] | None,
        kv_lora_rank: int,
        scale: float,
    ) -> torch.Tensor:
        """`chosen`: this step's picks, or `picks_at` entries of one-query sequences (MTP draft steps)."""
        if isinstance(chosen, list):
            chosen = TopkPicks(torch.cat(chosen), batch.last_query)
        topk_idx = None if chosen is None else chosen.positions
        o, _ = self.kernels[1].mla_attention_triton(
            q, latent_pool, batch.block_tables, batch.query_seq, batch.query_pos, scale, kv_lora_rank, topk_idx
        )
        return o
