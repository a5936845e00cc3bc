"""One prefill or decode replica spanning several devices: its ranks as Ray actors in one placement group.

STRICT_PACK puts every rank on one node, so NCCL runs over NVLink there. Rank 0's actor picks the rendezvous
address; every rank joins the process group, loads only its shard, and all ranks run each forward together.
"""

import logging
from pathlib import Path

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from glmserve.model.parallel import ParallelConfig, free_port, init_parallel, load_parallel_model

log = logging.getLogger(__name__)


@ray.remote
class ParallelRank:
    """One rank: a process holding one device (Ray sets CUDA_VISIBLE_DEVICES to its GPU) and one model shard."""

    def __init__(self, parallel: ParallelConfig, rank: int, use_gpu: bool):
        self.parallel = parallel
        self.rank = rank
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        self.model = None

    def rendezvous_address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    def start(self, master_addr: str, master_port: int, path: str, dtype: str, timeout_s: float) -> None:
        ctx = init_parallel(self.parallel, self.rank, master_addr, master_port, self.device, timeout_s)
        self.model = load_parallel_model(path, ctx, dtype, self.device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Logits [B, T, vocab] on rank 0 (every rank computes them; one copy travels back)."""
        logits = self.model(input_ids.to(self.device))
        return logits.cpu() if self.rank == 0 else None

    def stop(self) -> None:
        torch.distributed.destroy_process_group()


class ParallelGroup:
    """Starts `parallel.world_size` ranks in one STRICT_PACK placement group (bundles of one GPU, or one CPU), wires
    their process group (NCCL on GPUs, gloo on CPUs) and loads the checkpoint at `path` sharded over them."""

    def __init__(
        self,
        path: str | Path,
        parallel: ParallelConfig,
        use_gpu: bool = False,
        dtype: str = "float32",
        timeout_s: float = 300.0,
    ):
        self.timeout_s = timeout_s
        bundle = {"GPU": 1} if use_gpu else {"CPU": 1}
        self.placement_group: PlacementGroup = placement_group([bundle] * parallel.world_size, strategy="STRICT_PACK")
        self.ranks: list[ray.actor.ActorHandle] = []
        try:
            ray.get(self.placement_group.ready(), timeout=timeout_s)
            self.ranks = [
                ParallelRank.options(
                    num_cpus=0 if use_gpu else 1,
                    num_gpus=1 if use_gpu else 0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, rank),
                ).remote(parallel, rank, use_gpu)
                for rank in range(parallel.world_size)
            ]
            master_addr, master_port = ray.get(self.ranks[0].rendezvous_address.remote(), timeout=timeout_s)
            log.info("starting %d ranks (%s), rendezvous at %s:%d", len(self.ranks), parallel, master_addr, master_port)
            starts = [r.start.remote(master_addr, master_port, str(path), dtype, timeout_s) for r in self.ranks]
            ray.get(starts, timeout=timeout_s)
        except BaseException:
            self._release()
            raise

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full-sequence causal logits [B, T, vocab], like `glmserve.model.load_model(path)(input_ids)`."""
        return ray.get([r.forward.remote(input_ids) for r in self.ranks], timeout=self.timeout_s)[0]

    def shutdown(self) -> None:
        """Close the process group, end the actors and free the placement group."""
        try:
            ray.get([r.stop.remote() for r in self.ranks], timeout=self.timeout_s)
        finally:
            self._release()

    def _release(self) -> None:
        for r in self.ranks:
            ray.kill(r)
        remove_placement_group(self.placement_group)
