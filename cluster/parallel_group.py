"""One replica's reference forward over several devices: rank actors (`rank_group.py`) each load their shard of the
checkpoint, and all of them run each full-sequence forward together."""

from pathlib import Path

import ray
import torch

from glmserve.model.parallel import ParallelConfig, load_parallel_model

from .rank_group import RankGroup, RankProcess


@ray.remote
class ParallelRank(RankProcess):
    """One rank: its process-group membership and one model shard."""

    def start(self, master_addr: str, master_port: int, timeout_s: float, path: str, dtype: str) -> None:
        ctx = self.join(master_addr, master_port, timeout_s)
        self.model = load_parallel_model(path, ctx, dtype, self.device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Logits [B, T, vocab] on rank 0 (every rank computes them; one copy travels back)."""
        logits = self.model(input_ids.to(self.device))
        return logits.cpu() if self.rank == 0 else None


class ParallelGroup(RankGroup):
    """Loads the checkpoint at `path` sharded over `parallel.world_size` ranks (one GPU, or one CPU, each)."""

    def __init__(
        self,
        path: str | Path,
        parallel: ParallelConfig,
        use_gpu: bool = False,
        dtype: str = "float32",
        timeout_s: float = 300.0,
    ):
        super().__init__(ParallelRank, parallel, use_gpu, timeout_s, str(path), dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full-sequence causal logits [B, T, vocab], like `glmserve.model.load_model(path)(input_ids)`."""
        return self.call("forward", input_ids)[0]
