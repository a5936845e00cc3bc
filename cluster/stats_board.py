"""A small Ray actor where worker replicas post their latest stats; /metrics on any decode replica reads them all.

Ray Serve has no way to ask every replica of a deployment, so replicas push (about once a second) instead. The board
is detached: it must not die with the replica that happened to create it (a killed prefill replica took every
replica's /metrics down with it).
"""

import time

import ray

NAME = "glmserve-stats"
STALE_S = 30.0  # a replica that stopped reporting (scaled down, dead) is dropped after this


@ray.remote(num_cpus=0)
class StatsBoard:
    def __init__(self) -> None:
        self._latest: dict[str, tuple[float, dict[str, float]]] = {}

    def post(self, replica: str, stats: dict[str, float]) -> None:
        self._latest[replica] = (time.monotonic(), stats)

    def forget(self, replica: str) -> None:
        """A replica going away leaves at once (its last figures must not count as a live replica's for STALE_S)."""
        self._latest.pop(replica, None)

    def snapshot(self) -> dict[str, dict[str, float]]:
        now = time.monotonic()
        self._latest = {r: v for r, v in self._latest.items() if now - v[0] < STALE_S}
        return {r: stats for r, (_, stats) in self._latest.items()}


def get_or_create(app_name: str) -> "ray.actor.ActorHandle":
    """The board of one Serve application (apps sharing a cluster must not add up each other's series)."""
    name = f"{NAME}-{app_name}"
    return StatsBoard.options(name=name, get_if_exists=True, namespace="glmserve", lifetime="detached").remote()
