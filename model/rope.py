"""Rotary position embedding as GLM-5 applies it to the rope slices of MLA and of the DSA indexer."""

import torch


def rope_cos_sin(
    positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [*positions.shape, dim // 2]: one angle per rotated pair."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    # transformers rounds cos/sin to the activation dtype before rotating; doing the same keeps bf16 parity.
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool, rotary_dim: int | None = None
) -> torch.Tensor:
    """Rotate the first `rotary_dim` dims (default: all) of x's last dim; the rest pass through unchanged. cos/sin
    broadcast against x[..., : rotary_dim // 2].

    Interleaved pairs are (x0, x1), (x2, x3), ...; the result is written de-interleaved (rotated evens, then rotated
    odds), as transformers does. That permutes q and k the same way, so their dot product is unchanged.
    """
    if rotary_dim is not None and rotary_dim < x.shape[-1]:
        rot, rest = x.split([rotary_dim, x.shape[-1] - rotary_dim], dim=-1)
        return torch.cat((apply_rope(rot, cos, sin, interleave), rest), dim=-1)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotate(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleave: bool,
    rotary_dim: int | None = None,
    fused: bool = False,
) -> torch.Tensor:
    """`apply_rope`, or with `fused` (a model loaded for serving) the one-kernel version: rounded once instead of
    after each product, a last-bit difference."""
    if fused:
        from .kernels.rope import rope_triton

        return rope_triton(x, cos, sin, interleave, rotary_dim)
    return apply_rope(x, cos, sin, interleave, rotary_dim)
