"""The ranks of one replica that spans several devices, as Ray actors in one placement group.

STRICT_PACK puts every rank on one node, so NCCL runs over NVLink there. Rank 0's actor picks the rendezvous
address; every rank joins the process group (NCCL on GPUs, gloo on CPUs) and then builds what it serves. What the
ranks run (a full-sequence forward, an engine) is up to the actor class, a subclass of `RankProcess`.
"""

import logging

import ray
import torch
from ray.exceptions import GetTimeoutError, RayError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from glmserve.kvtransfer.auth import ENV_VAR as KV_SECRET_ENV
from glmserve.kvtransfer.auth import exported_secret
from glmserve.model.parallel import ParallelConfig, ParallelContext, free_port, init_parallel

log = logging.getLogger(__name__)


class RankFailed(RuntimeError):
    """A rank died, raised, or did not answer in time; the whole group has been released."""


class RankProcess:
    """Base of a rank actor class (decorate the subclass with `ray.remote`): a process holding one device (Ray sets
    CUDA_VISIBLE_DEVICES to its GPU). Subclasses define `start(master_addr, master_port, timeout_s, *args)`, which
    calls `join` first."""

    def __init__(self, parallel: ParallelConfig, rank: int, use_gpu: bool):
        self.parallel = parallel
        self.rank = rank
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")

    def rendezvous_address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    def join(self, master_addr: str, master_port: int, timeout_s: float) -> ParallelContext:
        return init_parallel(self.parallel, self.rank, master_addr, master_port, self.device, timeout_s)

    def stop(self) -> None:
        torch.distributed.destroy_process_group()


class RankGroup:
    """Starts `parallel.world_size` actors of `rank_class` in one STRICT_PACK placement group (bundles of one GPU,
    or one CPU) and has each run `start(master_addr, master_port, timeout_s, *start_args)`."""

    def __init__(
        self,
        rank_class: ray.actor.ActorClass,
        parallel: ParallelConfig,
        use_gpu: bool,
        timeout_s: float,
        *start_args: object,
    ):
        self.timeout_s = timeout_s
        bundle = {"GPU": 1} if use_gpu else {"CPU": 1}
        self.placement_group: PlacementGroup = placement_group([bundle] * parallel.world_size, strategy="STRICT_PACK")
        self.ranks: list[ray.actor.ActorHandle] = []
        self._released = False
        try:
            self._wait_for_bundles(parallel.world_size, "GPUs" if use_gpu else "CPUs")
            self.ranks = [
                rank_class.options(
                    num_cpus=0 if use_gpu else 1,
                    num_gpus=1 if use_gpu else 0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, rank),
                    # the KV transfer's cluster secret of this replica, for the ranks' receivers and senders
                    runtime_env={"env_vars": {KV_SECRET_ENV: exported_secret()}},
                ).remote(parallel, rank, use_gpu)
                for rank in range(parallel.world_size)
            ]
            master_addr, master_port = ray.get(self.ranks[0].rendezvous_address.remote(), timeout=timeout_s)
            log.info("starting %d ranks (%s), rendezvous at %s:%d", len(self.ranks), parallel, master_addr, master_port)
            self.call("start", master_addr, master_port, timeout_s, *start_args)
        except BaseException:
            self._release()
            raise

    def _wait_for_bundles(self, n: int, unit: str) -> None:
        try:
            ray.get(self.placement_group.ready(), timeout=self.timeout_s)
        except GetTimeoutError:
            raise RankFailed(f"no node had {n} free {unit} for the ranks within {self.timeout_s:g} s") from None

    def call(self, method: str, *args: object) -> list:
        """Run `method(*args)` on every rank at once; returns each rank's result. Fails fast: when one rank dies or
        raises, the others may be waiting for it inside a collective, so the group is released (ending them) and
        RankFailed raised, rather than waiting for them."""
        if self._released:
            raise RankFailed("the ranks were released after an earlier failure")
        refs = [getattr(r, method).remote(*args) for r in self.ranks]
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, timeout=self.timeout_s)
            if not ready:
                self._release()
                raise RankFailed(f"{len(pending)} rank(s) did not finish {method} within {self.timeout_s:g} s")
            for ref in ready:
                try:
                    ray.get(ref)
                except RayError as e:
                    self._release()
                    raise RankFailed(f"rank {rank_of[ref]} failed in {method}: {_describe(e)}") from e
        return ray.get(refs)

    def shutdown(self) -> None:
        """Close the process group, end the actors and free the placement group."""
        if self._released:
            return
        try:
            ray.get([r.stop.remote() for r in self.ranks], timeout=self.timeout_s)
        finally:
            self._release()

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        for r in self.ranks:
            ray.kill(r)
        remove_placement_group(self.placement_group)


def _describe(error: RayError) -> str:
    """What went wrong, without the remote traceback: the rank's own exception, or why its actor died."""
    cause = getattr(error, "cause", None)
    if cause is not None:
        return repr(cause)
    return str(error).strip().splitlines()[0]
