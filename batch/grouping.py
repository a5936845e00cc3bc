"""The order batch requests run in, so that requests about one document share its prefix cache.

Requests are grouped by the start of their prompts: sorted by it, a run of requests whose prompts share at least
`min_shared` characters with the run's first is one group (sorting brings requests with long common prefixes
together, as a radix tree would). A group's first request (its leader) runs alone; once it has finished, its
prompt's KV blocks are in the prefix cache and the rest of the group runs, each prefilling only what follows the
shared part. Requests started together would each compute the prefix: the cache
holds a block only once a sequence has filled it. Followers of finished leaders go before new leaders, so a
document's blocks are used while they are still cached.
"""

import os
from collections import deque
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


MIN_SHARED_CHARS = 256  # about one 64-token KV block of text: less than that shares no cached block


def group_by_prefix(items: Iterable[T], text: Callable[[T], str], min_shared: int = MIN_SHARED_CHARS) -> list[list[T]]:
    """Groups of items whose `text` equals the group's first or shares at least `min_shared` leading characters with
    it; groups in sorted order, each in input order."""
    ordered = sorted(enumerate(items), key=lambda pair: text(pair[1]))
    groups: list[list[tuple[int, T]]] = []
    leader = ""
    for index, item in ordered:
        start = text(item)
        if groups and (start == leader or _shared(leader, start) >= min_shared):
            groups[-1].append((index, item))
        else:
            groups.append([(index, item)])
            leader = start
    return [[item for _, item in sorted(group, key=lambda pair: pair[0])] for group in groups]


def _shared(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


class PrefixScheduler(Generic[T]):
    """Hands out items leader-first: `next()` gives an item that may start now (None: wait for a `done`), `done(item)`
    releases its group's followers when it was a leader."""

    def __init__(self, groups: Iterable[list[T]]):
        self._groups = deque(g for g in groups if g)
        self._ready: deque[T] = deque()
        self._waiting: dict[int, list[T]] = {}  # id(leader) -> its followers
        self._outstanding = 0

    def next(self) -> T | None:
        if self._ready:
            item = self._ready.popleft()
        elif self._groups:
            leader, *followers = self._groups.popleft()
            if followers:
                self._waiting[id(leader)] = followers
            item = leader
        else:
            return None
        self._outstanding += 1
        return item

    def done(self, item: T) -> None:
        self._outstanding -= 1
        self._ready.extend(self._waiting.pop(id(item), ()))

    @property
    def exhausted(self) -> bool:
        """Nothing left to hand out, now or later."""
        return not self._ready and not self._groups and not self._waiting

    @property
    def finished(self) -> bool:
        return self.exhausted and self._outstanding == 0
