"""Replica choice through Ray Serve's request-router API: decode replicas by load, prefill replicas by prefix
affinity (a prompt whose first blocks a replica has prefilled before goes back there, where they are cached)."""

import hashlib
import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def _load(replica: RunningReplica) -> float:
    """Lower is better: KV use first, then queued work (stats arrive from `record_routing_stats`)."""
    stats = replica.routing_stats or {}
    queue = stats.get("num_requests_running", 0) + 2 * stats.get("num_requests_waiting", 0)
    return stats.get("kv_cache_usage", 0.0) + 0.01 * queue


class LeastLoadedRouter(RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        ranked = sorted(candidate_replicas, key=lambda r: (_load(r), random.random()))
        return [[r] for r in ranked]


class PrefixAffinityRouter(RequestRouter):
    """Hash the request's first prefix block to a home replica (rendezvous hashing, stable as replicas come and
    go); fall back to the least loaded replica when the home one is much busier than the rest."""

    IMBALANCE = 0.3

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        by_load = sorted(candidate_replicas, key=lambda r: (_load(r), random.random()))
        key = _affinity_key(pending_request)
        if key is None or len(candidate_replicas) < 2:
            return [[r] for r in by_load]
        home = max(candidate_replicas, key=lambda r: _rendezvous(key, r.replica_id.unique_id))
        if _load(home) - _load(by_load[0]) > self.IMBALANCE:
            return [[r] for r in by_load]
        return [[home]] + [[r] for r in by_load if r is not home]


def _affinity_key(pending: PendingRequest | None) -> int | None:
    if pending is None or not pending.args:
        return None
    return getattr(pending.args[0], "affinity_key", None)


def _rendezvous(key: int, replica: str) -> int:
    # not hash(): string hashing is salted per process, and every decode replica must agree on the home replica
    return int.from_bytes(hashlib.blake2b(f"{key}:{replica}".encode(), digest_size=8).digest(), "little")
