"""One forward over a flat batch of sequences in mixed phases (prefill chunks and decode tokens) on the paged cache.

Per layer: project the new tokens, write their latent (and, on full-indexer layers, indexer keys) into the cache,
pick top-k keys per query on full layers (shared layers reuse the pick of the full layer before them, within the
same step), attend in the absorbed latent space, then the MLP or MoE. Logits are computed only where asked.

A model loaded in its serving form (model/fusion.py: packed weights, Triton elementwise kernels) runs on the Triton
attention backend, its routed experts through one grouped GEMM; pure decode steps replay as CUDA graphs where a
`cuda_graphs.DecodeGraphs` is attached. A reference model runs plain PyTorch, the exact reference path. The runner
never changes the model it is given.
"""

import functools
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .attention_backend import (
    IndexChunk,
    PagedBatch,
    StageTimer,
    TopkPicks,
    TorchAttention,
    TritonAttention,
    index_chunk_plan,
    no_stage,
)
from .glm import DecoderLayer, GlmForCausalLM
from .kv_cache import PagedKVCache
from .moe import MoE

log = logging.getLogger(__name__)


@dataclass
class SeqChunk:
    """One sequence's part of a step."""

    token_ids: list[int]  # the new tokens
    start_pos: int  # position of token_ids[0]; tokens before it already have KV in the cache
    block_table: list[int]  # grows by appending while it is the same list; replace the list for any other change
    num_logits: int = 1  # logits for the last this-many new tokens (1: sample; K+1: verify K drafts; 0: none)
    request_id: str = ""  # lets a layer hook tell whose rows were written (a label: n sequences share it)


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


@dataclass(eq=False)
class _TableRow:
    row: int
    source: list[int]  # the engine's list (held, so its id stays unique while the row lives)
    length: int = 0  # entries copied so far
    last: int = -1  # source[length - 1] when copied, to notice a list changed in place
    seen: int = 0


class BlockTables:
    """The block tables of the sequences being run, on the device, one row per sequence, refreshed with each
    sequence's new entries only: per-step host work grows with the blocks added, not with context length."""

    EVICT_EVERY = 256  # steps; rows unused that long are freed

    def __init__(self, max_blocks: int, device: torch.device, rows: int = 8):
        self.max_blocks = max_blocks
        self.table = torch.zeros(rows, max_blocks, dtype=torch.int32, device=device)
        self.rows: dict[int, _TableRow] = {}  # id(list) -> its row
        self.free = list(range(rows))
        self.step = 0
        self.version = 0  # changes whenever `table` or an entry of it does

    def rows_for(self, tables: list[list[int]]) -> list[int]:
        """Table rows holding these lists (copied in or brought up to date first)."""
        self.step += 1
        new_rows, new_cols, new_values, out = [], [], [], []
        for source in tables:
            if len(source) > self.max_blocks:
                raise ValueError(f"a block table of {len(source)} blocks exceeds this runner's {self.max_blocks}")
            entry = self.rows.get(id(source))
            if entry is None:
                entry = self.rows[id(source)] = _TableRow(self._take_row(), source)
            elif len(source) < entry.length or (entry.length and source[entry.length - 1] != entry.last):
                entry.length = 0  # changed in place: copy it again
            if len(source) > entry.length:
                new_rows += [entry.row] * (len(source) - entry.length)
                new_cols += range(entry.length, len(source))
                new_values += source[entry.length :]
                entry.length, entry.last = len(source), source[-1]
            entry.seen = self.step
            out.append(entry.row)
        if new_values:
            update = torch.tensor([new_rows, new_cols, new_values], dtype=torch.long).to(self.table.device)
            self.table[update[0], update[1]] = update[2].to(torch.int32)
            self.version += 1
        if self.step % self.EVICT_EVERY == 0:
            for key, entry in list(self.rows.items()):
                if entry.seen <= self.step - self.EVICT_EVERY:
                    self.free.append(entry.row)
                    del self.rows[key]
        return out

    def _take_row(self) -> int:
        if not self.free:
            grown = self.table.new_zeros(2 * self.table.shape[0], self.max_blocks)
            grown[: self.table.shape[0]] = self.table
            self.free = list(range(self.table.shape[0], grown.shape[0]))
            self.table = grown
            self.version += 1
        return self.free.pop()


class ModelRunner:
    def __init__(
        self,
        model: GlmForCausalLM,
        cache: PagedKVCache,
        attention: TorchAttention | TritonAttention | None = None,
        topk_layers: set[int] | None = None,
    ):
        """`attention`: the backend (default: Triton for a model loaded fused, else torch). `topk_layers`: the
        layers that run their own top-k selection (default: those with an indexer); benchmarks pass all layers to
        switch IndexShare off on a model built with an indexer everywhere."""
        self.model = model
        self.config = model.config
        self.cache = cache
        self.device = model.lm_head.weight.device
        if attention is None:
            attention = TritonAttention() if model.fused else TorchAttention()
        self.attention = attention
        self.fused = isinstance(attention, TritonAttention)
        # kv_b_proj split per head, for absorbed attention.
        self.absorbed = [layer.self_attn.absorbed_weights() for layer in model.model.layers]
        self.write_kv = cache.write
        if self.fused:
            from .kernels import kv_write  # Triton loads with the fused path only

            self.write_kv = functools.partial(kv_write.write_kv_triton, cache)
        self.topk_layers = topk_layers if topk_layers is not None else {
            i for i, layer in enumerate(model.model.layers) if layer.self_attn.indexer is not None
        }  # fmt: skip
        bs = cache.spec.block_size
        max_tokens = min(self.config.max_position_embeddings, cache.max_tokens)
        self.tables = BlockTables(-(-max_tokens // bs), self.device)
        # Called after each layer's KV is written, with the step's inputs (which tokens went to which slots).
        # Prefill workers stream finished layers out through it while later layers compute.
        self.layer_hook: Callable[[int, StepInputs], None] | None = None
        self.stage: StageTimer = no_stage
        self.graphs = None  # a cuda_graphs.DecodeGraphs, attached by whoever wants pure decode steps replayed

    def set_stage_timer(self, stage: StageTimer) -> None:
        """Time the stages of eager steps (indexer, topk, attention, moe) through `stage(name)` contexts."""
        self.stage = stage
        if isinstance(self.attention, TritonAttention):
            self.attention.stage = stage

    # ---- step inputs ----
    def index_plan(self, query_start: list[int], max_context: int) -> list[IndexChunk]:
        """The indexer launches of a step with this shape, built once (CUDA graphs); none for the torch backend."""
        if not self.fused:
            return []
        ranges, first_tile, starts, ends = index_chunk_plan(query_start, max_context, self.attention.tile_queries)
        tiles = torch.tensor([starts, ends], dtype=torch.int32, device=self.device)
        bounds = first_tile + [len(starts)]
        return [
            IndexChunk(b, e, tiles[0, t0:t1], tiles[1, t0:t1])
            for (b, e), t0, t1 in zip(ranges, bounds[:-1], bounds[1:], strict=True)
        ]

    def prepare(self, chunks: list[SeqChunk]) -> StepInputs:
        bs = self.cache.spec.block_size
        lens = [len(c.token_ids) for c in chunks]
        starts = list(itertools.accumulate(lens, initial=0))
        context_lens = [c.start_pos + n for c, n in zip(chunks, lens, strict=True)]
        max_context = max(context_lens)
        rows = self.tables.rows_for([c.block_table for c in chunks])
        seq = torch.repeat_interleave(torch.arange(len(chunks)), torch.tensor(lens))
        offset = torch.tensor([c.start_pos - s for c, s in zip(chunks, starts[:-1], strict=True)])
        logits_at = [j for i, c in enumerate(chunks) for j in range(starts[i + 1] - c.num_logits, starts[i + 1])]
        ranges, first_tile, tile_start, tile_end = [], [], [], []
        if self.fused:
            ranges, first_tile, tile_start, tile_end = index_chunk_plan(
                starts, max_context, self.attention.tile_queries
            )
        # Everything the step needs from the host, in one copy.
        parts = [
            torch.tensor([t for c in chunks for t in c.token_ids]),
            torch.arange(starts[-1]) + offset[seq],
            seq,
            torch.tensor(logits_at, dtype=torch.long),
            torch.tensor(starts[1:]) - 1,
            torch.tensor(rows),
            torch.tensor(tile_start, dtype=torch.long),
            torch.tensor(tile_end, dtype=torch.long),
        ]
        ids, positions, seq, logits_at, last_query, rows, tile_start, tile_end = (
            torch.cat(parts).to(self.device).split([p.numel() for p in parts])
        )
        block_tables = self.tables.table[rows, : -(-max_context // bs)]
        bounds = first_tile + [len(parts[6])]
        chunks_plan = [
            IndexChunk(b, e, tile_start[t0:t1].int(), tile_end[t0:t1].int())
            for (b, e), t0, t1 in zip(ranges, bounds[:-1], bounds[1:], strict=True)
        ]
        return self.step_inputs(
            chunks, ids, positions, seq.int(), block_tables, starts, context_lens, max_context, logits_at,
            last_query, chunks_plan,
        )  # fmt: skip

    def step_inputs(
        self,
        chunks: list[SeqChunk],
        ids: torch.Tensor,
        positions: torch.Tensor,
        query_seq: torch.Tensor,
        block_tables: torch.Tensor,
        query_start: list[int],
        context_lens: list[int],
        max_context: int,
        logits_at: torch.Tensor,
        last_query: torch.Tensor,
        index_chunks: list[IndexChunk],
    ) -> StepInputs:
        """The step's tensors from device-side inputs (device ops only: CUDA graphs capture this too)."""
        bs = self.cache.spec.block_size
        batch = PagedBatch(
            query_pos=positions.int(),
            query_seq=query_seq,
            query_start=query_start,
            context_lens=context_lens,
            block_tables=block_tables,
            block_size=bs,
            max_context=max_context,
            last_query=last_query,
            index_chunks=index_chunks,
            max_queries_per_seq=max(b - a for a, b in itertools.pairwise(query_start)),
        )
        slots = block_tables[query_seq.long(), positions // bs].long() * bs + positions % bs
        cos, sin = self.model.rope(positions, self.model.model.embed_tokens.weight.dtype)
        return StepInputs(chunks, ids, batch, slots, logits_at, cos, sin)

    # ---- layers ----
    def run_layer(self, i: int, x: torch.Tensor, step: StepInputs, chosen, reuse_topk: bool = False):
        """One decoder layer (index i; the MTP layer too) on the paged cache: write this step's KV, pick top-k on
        layers that select their own (unless `reuse_topk`: keep `chosen`), attend, MLP. Returns (x, chosen)."""
        layer = self.model.model.layers[i]
        cfg = self.config
        h = layer.input_layernorm(x)
        attn = layer.self_attn
        p = attn.project(h, step.cos, step.sin)
        index_keys = attn.indexer.keys(h, step.cos, step.sin) if attn.indexer is not None else None
        self.write_kv(i, step.slots, p.latent, p.k_rope, index_keys)
        if self.layer_hook is not None:
            self.layer_hook(i, step)
        if i in self.topk_layers and not reuse_topk:
            with self.stage("indexer"):
                q_index = attn.indexer.queries(p.q_resid, step.cos, step.sin)
                weights = attn.indexer.head_weights(h)
            chosen = self.attention.select_topk(step.batch, q_index, weights, self.cache.index_keys[i], cfg.index_topk)
        w_uk, w_uv = self.absorbed[i]
        q = torch.cat((torch.einsum("nhd,hdc->nhc", p.q_nope, w_uk), p.q_rope), dim=-1)
        with self.stage("attention"):
            o = self.attention.attend(step.batch, q, self.cache.latent[i], chosen, cfg.kv_lora_rank, cfg.softmax_scale)
        x, h = layer.post_attention_layernorm.add_forward(
            x, attn.o_proj(torch.einsum("nhc,hvc->nhv", o, w_uv).flatten(1))
        )
        return self.feed_forward(i, layer, h, x), chosen

    def feed_forward(self, i: int, layer: DecoderLayer, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + the layer's MLP of h (the packed MoE adds its shared expert and the residual in its combine
        launch)."""
        moe = layer.mlp
        if not isinstance(moe, MoE) or moe.packed is None:
            return residual + moe(h)
        from .kernels.moe import moe_experts

        with self.stage("moe"):
            expert_ids, weights = moe.gate(h)
            shared = moe.shared_experts(h) if moe.shared_experts is not None else None
            return moe_experts(
                h, expert_ids, weights, *moe.packed, shared=shared, residual=residual, scales=moe.packed_scales
            )

    def execute(self, step: StepInputs, keep_all_hidden: bool = False) -> StepOutput:
        """Embedding, every main layer, final norm and the logits rows of a prepared step."""
        model = self.model
        x = model.model.embed_tokens(step.ids)
        chosen: list | TopkPicks | None = None
        for i in range(self.config.num_hidden_layers):
            x, chosen = self.run_layer(i, x, step, chosen)
        if keep_all_hidden:
            all_hidden = model.model.norm(x)
            hidden = all_hidden[step.logits_at]
        else:
            all_hidden, hidden = None, model.model.norm(x[step.logits_at])
        return StepOutput(logits=model.lm_head(hidden).float(), hidden=hidden, all_hidden=all_hidden)

    @torch.inference_mode()
    def forward(self, chunks: list[SeqChunk], keep_all_hidden: bool = False) -> StepOutput:
        if self.graphs is not None and self.layer_hook is None and self.graphs.accepts(chunks):
            return self.graphs.run(chunks, keep_all_hidden)
        return self.execute(self.prepare(chunks), keep_all_hidden)
