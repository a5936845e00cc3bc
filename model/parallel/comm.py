"""Process groups of one replica and the few collectives the sharded model needs.

Backend "nccl" for CUDA tensors, "gloo" for CPU ones: the same code runs both, so CPU tests cover it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import ParallelConfig


@dataclass(frozen=True)
class Comm:
    """One process group as this rank sees it. A group of one rank communicates nothing (and has no group)."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the group, in place."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's x (same shape everywhere), concatenated in rank order along `dim`."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim)

    def all_gather_rows(self, x: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Every rank's rows (rank r holds rows[r] of them), concatenated in rank order. Collectives want equal
        shapes, so each rank pads its rows to the largest count and the padding is dropped after."""
        if self.size == 1:
            return x
        padded = x.new_zeros((max(rows), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in rows]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([part[:n] for part, n in zip(parts, rows, strict=True)])

    def all_to_all(self, x: torch.Tensor, send_rows: list[int], recv_rows: list[int]) -> torch.Tensor:
        """Rows of x go to their ranks (the first send_rows[0] to rank 0, ...); returns the rows received, grouped
        by source rank in rank order, recv_rows[r] from rank r."""
        if self.size == 1:
            return x
        out = x.new_empty((sum(recv_rows), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_rows, send_rows, group=self.group)
        return out


@dataclass(frozen=True)
class ParallelContext:
    """This rank's place in a replica: its tensor-parallel group, its expert-parallel group and the whole replica."""

    config: ParallelConfig
    tp: Comm
    ep: Comm
    world: Comm

    @classmethod
    def create(cls, config: ParallelConfig) -> ParallelContext:
        """Build the groups over the default process group, which must span exactly the replica. Every rank calls
        this with the same config (creating a group is itself collective)."""
        if dist.get_world_size() != config.world_size:
            raise ValueError(f"the process group has {dist.get_world_size()} ranks, {config} needs {config.world_size}")
        rank = dist.get_rank()
        return cls(
            config=config,
            tp=_comm_for(rank, config.tp_groups()),
            ep=_comm_for(rank, config.ep_groups()),
            world=Comm(rank, config.world_size, dist.group.WORLD),
        )


def _comm_for(rank: int, groups: list[list[int]]) -> Comm:
    mine = None
    for ranks in groups:
        if len(ranks) == 1:
            group = None
        elif len(ranks) == dist.get_world_size():
            group = dist.group.WORLD
        else:
            group = dist.new_group(ranks)  # every rank creates every group, members or not
        if rank in ranks:
            mine = Comm(ranks.index(rank), len(ranks), group)
    assert mine is not None, f"rank {rank} is in no group of {groups}"
    return mine


def init_parallel(
    config: ParallelConfig,
    rank: int,
    master_addr: str,
    master_port: int,
    device: torch.device | str = "cpu",
    timeout_s: float = 300.0,
) -> ParallelContext:
    """Join the replica's process group (rank 0 serves the rendezvous at master_addr:master_port) and build its
    groups. A collective that waits longer than `timeout_s` for a peer raises instead of hanging."""
    device = torch.device(device)
    if device.type == "cuda":
        # NCCL binds its communicators to the current device.
        torch.cuda.set_device(torch.cuda.current_device() if device.index is None else device.index)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=config.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return ParallelContext.create(config)


def free_port() -> int:
    """A TCP port free right now on this host, for rank 0's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]
