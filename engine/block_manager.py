"""Block allocation for the paged KV cache, with reference-counted prefix caching.

A full block is identified by a hash that chains its parent's hash and its token ids, so equal hashes mean equal
prefixes. Blocks whose last user is gone keep their contents and hash on an LRU list: a later request with the same
prefix takes them back instead of recomputing; allocation evicts from the cold end only when no never-used block is
left.
"""

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence

import numpy as np


def block_hash(parent: int | None, token_ids: Sequence[int]) -> int:
    """Stable across processes (prefill replicas are chosen by it), unlike Python's salted hash of bytes."""
    h = hashlib.blake2b(np.asarray(token_ids, dtype=np.int64).tobytes(), digest_size=8)
    if parent is not None:
        h.update(parent.to_bytes(8, "little", signed=False))
    return int.from_bytes(h.digest(), "little")


def prefix_hashes(token_ids: Sequence[int], block_size: int, parent: int | None = None) -> list[int]:
    """Chained hashes of every full block of `token_ids`."""
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_hash(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


class NoFreeBlocks(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.block_of_hash: dict[int, int] = {}
        self.never_cached: deque[int] = deque(range(num_blocks))
        self.cached_free: OrderedDict[int, None] = OrderedDict()  # LRU: first = coldest
        self.prefix_queries = 0  # tokens looked up / found, for the prefix-cache hit-rate metric
        self.prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.never_cached) + len(self.cached_free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, hashes: Sequence[int], record: bool = True) -> list[int]:
        """Cached blocks holding the longest prefix of these full-block hashes (refs are not taken). `record`
        counts the lookup in the hit-rate metrics."""
        found = []
        if self.enable_prefix_caching:
            for h in hashes:
                block = self.block_of_hash.get(h)
                if block is None:
                    break
                found.append(block)
        if record:
            self.prefix_queries += len(hashes) * self.block_size
            self.prefix_hits += len(found) * self.block_size
        return found

    def acquire(self, blocks: Sequence[int]) -> None:
        """Take a reference on cached blocks (from `match_prefix`)."""
        for b in blocks:
            if self.ref_count[b] == 0:
                del self.cached_free[b]
            self.ref_count[b] += 1

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free_blocks:
            raise NoFreeBlocks(f"{n} blocks wanted, {self.num_free_blocks} free")
        out = []
        for _ in range(n):
            if self.never_cached:
                b = self.never_cached.popleft()
            else:
                b, _ = self.cached_free.popitem(last=False)
                del self.block_of_hash[self.hash_of[b]]
                self.hash_of[b] = None
            self.ref_count[b] = 1
            out.append(b)
        return out

    def free(self, blocks: Sequence[int]) -> None:
        # Tail blocks first, so they are evicted before the shared heads of the same prefix.
        for b in reversed(blocks):
            self.ref_count[b] -= 1
            assert self.ref_count[b] >= 0, f"block {b} freed twice"
            if self.ref_count[b] == 0:
                if self.hash_of[b] is None:
                    self.never_cached.append(b)
                else:
                    self.cached_free[b] = None

    def cache_full_block(self, block: int, h: int) -> None:
        """Publish a block whose 64 tokens are now written, so later requests can share it."""
        if self.enable_prefix_caching and self.hash_of[block] is None and h not in self.block_of_hash:
            self.hash_of[block] = h
            self.block_of_hash[h] = block

    def reset_prefix_cache(self) -> None:
        for b in list(self.cached_free):
            del self.block_of_hash[self.hash_of[b]]
            self.hash_of[b] = None
            self.never_cached.append(b)
        self.cached_free.clear()
