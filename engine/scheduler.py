"""Continuous batching with chunked prefill, prefix caching and preemption by recompute.

Each step hands out a token budget: running sequences first (one token each when decoding, the next chunk when still
prefilling), then waiting ones in arrival order. When blocks run out, the latest-arrived running sequence is
preempted: its blocks are freed and it recomputes later from its tokens (prefix caching often makes that cheap).
The work per step is proportional to the number of sequences, never to their lengths.
"""

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from glmserve.engine.block_manager import BlockManager, block_hash, prefix_hashes

from .sequence import Sequence, Status

log = logging.getLogger(__name__)


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens this step)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.block_size = block_manager.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        still_running: list[Sequence] = []
        queue = deque(self.running)
        while queue and budget > 0:
            seq = queue.popleft()
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self._grow(seq, seq.num_computed_tokens + n):
                if not queue:  # nothing left to evict but itself
                    self._preempt(seq, out)
                    seq = None
                    break
                self._preempt(queue.pop(), out)
            if seq is None:
                break
            out.scheduled.append((seq, n))
            still_running.append(seq)
            budget -= n
        still_running.extend(queue)  # budget exhausted: they wait for the next step, keeping their blocks
        self.running = still_running

        # Admit waiting sequences in order; stop at the first that does not fit (no overtaking), and admit none in
        # a step that had to preempt.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            if not self._admit(seq, budget):
                break
            self.waiting.popleft()
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n
        for seq, n in out.scheduled:
            seq.num_computed_tokens += n
        return out

    def ensure_blocks(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for `num_tokens` tokens of a running sequence (drafts need room ahead of time)."""
        return self._grow(seq, num_tokens)

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        need = self.blocks.blocks_needed(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.blocks.num_free_blocks:
            return False
        seq.block_table.extend(self.blocks.allocate(need))
        return True

    def cached_prefix_tokens(self, seq: Sequence) -> int:
        """Tokens of `seq` the prefix cache would serve now (a look, not a claim)."""
        return len(self.blocks.match_prefix(self._cacheable(seq), record=False)) * self.block_size

    def _cacheable(self, seq: Sequence) -> list[int]:
        # Always compute at least the last token: its logits are needed.
        return prefix_hashes(seq.token_ids[: seq.num_tokens - 1], self.block_size)

    def _admit(self, seq: Sequence, budget: int) -> bool:
        """Take cached prefix blocks and allocate blocks for the next `budget` tokens; False if they do not fit."""
        cacheable = self._cacheable(seq)
        hit = self.blocks.match_prefix(cacheable)
        n = min(seq.num_tokens - len(hit) * self.block_size, budget)
        need = self.blocks.blocks_needed(len(hit) * self.block_size + n) - len(hit)
        # Hit blocks on the LRU list are about to leave it: they cannot also serve as fresh blocks.
        reusable = sum(1 for b in hit if self.blocks.ref_count[b] == 0)
        if need > self.blocks.num_free_blocks - reusable:
            return False
        self.blocks.acquire(hit)
        seq.block_table = hit + self.blocks.allocate(need)
        seq.block_hashes = cacheable[: len(hit)]
        seq.num_computed_tokens = len(hit) * self.block_size
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = seq.num_computed_tokens
            seq.scheduled_at = time.perf_counter()
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        log.debug("preempting %s (%d tokens)", seq.request_id, seq.num_tokens)
        self._release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def publish_full_blocks(self, seq: Sequence) -> None:
        """After a step wrote their KV, offer the sequence's newly full blocks to the prefix cache."""
        full = seq.num_computed_tokens // self.block_size
        while len(seq.block_hashes) < full:
            k = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = block_hash(parent, seq.token_ids[k * self.block_size : (k + 1) * self.block_size])
            seq.block_hashes.append(h)
            self.blocks.cache_full_block(seq.block_table[k], h)

    def reserve_remote(self, seq: Sequence) -> bool:
        """Blocks for the whole prompt (cached prefix reused) for a prefill worker to fill; the sequence waits
        outside the queues until `resume_remote` or `requeue`."""
        if not self._admit(seq, seq.num_tokens):
            return False
        seq.status = Status.REMOTE_PREFILL
        return True

    def resume_remote(self, seq: Sequence) -> None:
        """The prompt's KV has landed: the sequence joins the running batch."""
        seq.num_computed_tokens = seq.num_tokens
        seq.status = Status.RUNNING
        self.running.append(seq)
        self.publish_full_blocks(seq)

    def requeue(self, seq: Sequence) -> None:
        """A remote prefill failed: free what it reserved and prefill here instead, first in line."""
        self._release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence (done or aborted) and return its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        # REMOTE_PREFILL: in no queue; the caller stopped its transfer before freeing the blocks
        self._release(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
