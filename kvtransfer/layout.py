"""The paged KV cache as the transfer service sees it.

Per layer `l` a latent pool `[num_blocks, block_size, latent_dim]`, and on indexer layers an index-key pool
`[num_blocks, block_size, index_dim]`; all of one dtype and device. Fields match `glmserve.model.kv_cache.KVCacheSpec`.
"""

from dataclasses import dataclass
from enum import IntEnum

import torch

from . import kv_transfer_pb2 as pb


class RowKind(IntEnum):
    LATENT = 0
    INDEX = 1


@dataclass(frozen=True)
class KVLayout:
    num_layers: int  # model layers plus the MTP layer
    block_size: int
    latent_dim: int
    index_dim: int
    index_layers: tuple[int, ...]  # layers that own an index-key pool
    dtype: torch.dtype

    def row_dim(self, kind: RowKind) -> int:
        return self.latent_dim if kind == RowKind.LATENT else self.index_dim

    def kinds(self, layer: int) -> tuple[RowKind, ...]:
        return (RowKind.LATENT, RowKind.INDEX) if layer in self.index_layers else (RowKind.LATENT,)

    @property
    def bytes_per_token(self) -> int:
        values = self.num_layers * self.latent_dim + len(self.index_layers) * self.index_dim
        return values * self.dtype.itemsize

    @property
    def rows_per_token(self) -> int:
        """(layer, kind) pairs a transfer must fill for every token."""
        return self.num_layers + len(self.index_layers)

    def mismatch(self, other: "KVLayout") -> str | None:
        """Why rows of `other` cannot land in pools of this layout (block sizes may differ: rows are per token)."""
        for field in ("num_layers", "latent_dim", "index_dim", "index_layers", "dtype"):
            if getattr(self, field) != getattr(other, field):
                return f"{field} differs: {getattr(self, field)} here, {getattr(other, field)} at the peer"
        return None

    def check_pools(self, latent: list[torch.Tensor], index_keys: dict[int, torch.Tensor]) -> None:
        if len(latent) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} latent pools, got {len(latent)}")
        if set(index_keys) != set(self.index_layers):
            raise ValueError(f"index-key pools for layers {sorted(index_keys)}, layout says {self.index_layers}")
        pools = [(latent[layer], RowKind.LATENT) for layer in range(self.num_layers)]
        pools += [(index_keys[layer], RowKind.INDEX) for layer in self.index_layers]
        first = latent[0]
        for pool, kind in pools:
            if pool.dim() != 3 or pool.shape[1:] != (self.block_size, self.row_dim(kind)):
                raise ValueError(
                    f"pool shape {tuple(pool.shape)} is not [blocks, {self.block_size}, {self.row_dim(kind)}]"
                )
            if pool.dtype != self.dtype or pool.device != first.device or pool.shape[0] != first.shape[0]:
                raise ValueError("all pools must share dtype, device and block count with the layout")
            if not pool.is_contiguous():
                raise ValueError("pools must be contiguous (rows are addressed in the flattened pool)")

    def to_proto(self) -> pb.Layout:
        return pb.Layout(
            num_layers=self.num_layers,
            block_size=self.block_size,
            latent_dim=self.latent_dim,
            index_dim=self.index_dim,
            index_layers=list(self.index_layers),
            dtype=dtype_name(self.dtype),
        )

    @classmethod
    def from_proto(cls, msg: pb.Layout) -> "KVLayout":
        return cls(
            msg.num_layers,
            msg.block_size,
            msg.latent_dim,
            msg.index_dim,
            tuple(msg.index_layers),
            parse_dtype(msg.dtype),
        )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype
