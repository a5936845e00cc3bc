"""CUDA graphs of whole speculative decode steps for greedy sequences: verify, accept, MTP catch-up and drafting.

Eagerly, a speculative step is a target forward over K+1 positions per sequence, a host-side verification, an MTP
catch-up over the accepted positions and D-1 more one-token MTP passes, each with host work in between. For greedy
sequences all of it can stay on the device, so one replay replaces the lot:

- the token after verified position j is the target's argmax there whenever j is accepted, so the catch-up runs
  over all K+1 positions fed with those argmaxes. Rows after a sequence's first rejection compute garbage at
  positions the target forgets; the next step's catch-up rewrites their MTP entries before anything reads them;
- a sequence that accepted `a` drafts drafts from catch-up row `a`, and its draft pass i runs at position
  start + a + i: positions are device values, so nothing waits for the host.

One graph per (padded batch size, K, D, context buckets of the verify and the draft passes); padding rows repeat
the last real sequence, as in plain decode graphs. A sequence with fewer drafts than K (just out of prefill, or
capped by its request) is padded with draft -1: it verifies garbage there, which is never accepted.
"""

from dataclasses import dataclass

import torch

from glmserve.model.cuda_graphs import GraphBlockTables, GraphCache, Step, context_bucket, padded_batch_size
from glmserve.model.model_runner import ModelRunner, SeqChunk
from glmserve.model.mtp_drafter import MTPDrafter

from .verify import accepted_prefix


@dataclass
class SpecStepResult:
    """Host copies of one replay, for the first n (real) sequences."""

    target: list[list[int]]  # [n][K+1] the target's argmax at each verified position
    accepted: list[int]  # [n] drafts accepted
    drafts: list[list[int]]  # [n][D] the next drafts
    hidden: torch.Tensor  # [n, K+1, hidden] final-norm target hidden states (device; overwritten by the next replay)
    captured: bool  # this call captured the graph (its time is not a replay's)


class SpecDecodeGraphs:
    def __init__(self, runner: ModelRunner, drafter: MTPDrafter, max_batch: int, max_k: int, capture: bool = True):
        """`capture=False` runs the same static-input steps eagerly (CPU tests)."""
        self.runner = runner
        self.drafter = drafter
        self.max_batch = max_batch
        device = runner.device
        self.tokens = torch.zeros(max_batch, max_k + 1, dtype=torch.long, device=device)  # last token, then drafts
        self.meta = torch.zeros(2, max_batch, dtype=torch.long, device=device)  # start position, table row
        self.block_tables = GraphBlockTables(runner, max_batch)
        self.graphs = GraphCache(capture)

    def accepts(self, chunks: list[SeqChunk]) -> bool:
        """A pure decode step: each sequence's last token and at most K drafts, all with logits."""
        return (
            0 < len(chunks) <= self.max_batch
            and all(len(c.token_ids) == c.num_logits <= self.tokens.shape[1] for c in chunks)
            and self.runner.layer_hook is None
        )

    @torch.inference_mode()
    def run(self, chunks: list[SeqChunk], num_drafts: int) -> SpecStepResult:
        """Verify each chunk's drafts and draft `num_drafts` next ones. The caller has allocated blocks for
        start_pos + K + num_drafts tokens of every sequence, K the most drafts any chunk has."""
        n, q = len(chunks), max(len(c.token_ids) for c in chunks)
        size = padded_batch_size(n, self.max_batch)
        max_start = max(c.start_pos for c in chunks)
        verify_width = context_bucket(self.runner, max_start + q)
        draft_width = context_bucket(self.runner, max_start + q - 1 + num_drafts)
        pad = size - n
        rows = self.runner.tables.rows_for([c.block_table for c in chunks])
        rows += [rows[-1]] * pad
        padded = [c.token_ids + [-1] * (q - len(c.token_ids)) for c in chunks]
        self.tokens[:size, :q].copy_(torch.tensor(padded + padded[-1:] * pad))
        self.meta[:, :size].copy_(torch.tensor([[c.start_pos for c in chunks] + [chunks[-1].start_pos] * pad, rows]))
        self.block_tables.refresh(rows, self.meta[1, :size], self._blocks(max(verify_width, draft_width)))
        key = (size, q, num_drafts, verify_width, draft_width)
        graph, captured = self.graphs.get_or_capture(key, lambda: self._step(*key))
        target, accepted, drafts, hidden = graph.run()
        host_out = torch.cat((target[:n], accepted[:n, None], drafts[:n]), dim=1).tolist()  # one sync
        return SpecStepResult(
            target=[r[:q] for r in host_out],
            accepted=[r[q] for r in host_out],
            drafts=[r[q + 1 :] for r in host_out],
            hidden=hidden[: n * q].view(n, q, -1),  # graph memory: read it before the next replay (hidden_hook does)
            captured=captured,
        )

    def _blocks(self, width: int) -> int:
        return -(-width // self.runner.cache.spec.block_size)

    def _step(self, size: int, q: int, num_drafts: int, verify_width: int, draft_width: int) -> Step:
        runner, drafter = self.runner, self.drafter
        device = runner.device
        tokens, start = self.tokens[:size, :q], self.meta[0, :size]
        seqs = torch.arange(size, device=device)
        rows = seqs * q  # each sequence's first verified row
        all_rows = torch.arange(size * q, device=device)
        verify_starts = list(range(0, size * q + 1, q))
        verify_plan = runner.index_plan(verify_starts, verify_width)
        draft_starts = list(range(size + 1))
        draft_plan = runner.index_plan(draft_starts, draft_width)
        verify_tables = self.block_tables.tensor[:size, : self._blocks(verify_width)]
        draft_tables = self.block_tables.tensor[:size, : self._blocks(draft_width)]
        offsets = torch.arange(q, device=device)

        def step() -> tuple[torch.Tensor, ...]:
            verify = runner.step_inputs(
                [], tokens.clamp(min=0).flatten(), (start[:, None] + offsets).flatten(),
                seqs.repeat_interleave(q).int(), verify_tables, verify_starts, [verify_width] * size, verify_width,
                all_rows, rows + q - 1, verify_plan,
            )  # fmt: skip
            out = runner.execute(verify)
            target = out.logits.argmax(-1).view(size, q)
            accepted = accepted_prefix(target[:, :-1], tokens[:, 1:])
            catch_up = drafter.forward(verify, target.flatten(), out.hidden)
            last = rows + accepted
            hidden, logits = catch_up.hidden[last], catch_up.logits[last]
            reuse = drafter.reusable(catch_up, last)
            drafts = [logits.argmax(-1)] if num_drafts else []
            for i in range(1, num_drafts):
                draft = runner.step_inputs(
                    [], drafts[-1], start + accepted + i, seqs.int(), draft_tables, draft_starts,
                    [draft_width] * size, draft_width, seqs, seqs, draft_plan,
                )  # fmt: skip
                mtp = drafter.forward(draft, drafts[-1], hidden, reuse)
                hidden = mtp.hidden
                drafts.append(mtp.logits.argmax(-1))
            stacked = torch.stack(drafts, dim=1) if drafts else target.new_zeros(size, 0)
            return target, accepted, stacked, out.hidden

        return step
