"""Profiles: engine step times measured on one device (`glmserve profile`), and interpolation over their grids.

A profile holds, for one model config, dtype and device: the time of a prefill step of one chunk (new tokens x
tokens already cached), of a decode step (batch x context x MTP draft length K), and optionally of a KV transfer
(bytes over a transport). Grids are full tensor products, so step times between and beyond the measured points
come from multilinear interpolation (linear extrapolation past the edges, along the last segment).

Shipped profiles live in `data/profiles/`; any JSON of the same schema can be given with `--profile`.
"""

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from glmserve.model.config import GlmConfig

log = logging.getLogger(__name__)

PROFILE_DIR = Path(__file__).parent / "data" / "profiles"
SCHEMA_VERSION = 1


class ProfileError(ValueError):
    """A profile file that cannot be read, or does not fit what it is asked for; the message says why."""


class PrefillPoint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: int = Field(gt=0)  # new tokens in the chunk
    context: int = Field(ge=0)  # tokens already in the cache before it
    seconds: float = Field(gt=0)  # median step time
    samples: list[float] = Field(default_factory=list)


class DecodePoint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch: int = Field(gt=0)
    context: int = Field(gt=0)  # mean tokens per sequence in the cache while timed
    k: int = Field(ge=0)  # MTP drafts verified per sequence per step
    seconds: float = Field(gt=0)
    mean_context: float | None = None  # measured while timed (the grid's context plus the tokens decoded so far)
    samples: list[float] = Field(default_factory=list)


class TransferPoint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bytes: int = Field(gt=0)
    seconds: float = Field(gt=0)


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    device: str  # as torch names it ("cpu", "NVIDIA H200")
    hardware: str  # the catalogue key it calibrates ("cpu", "h200-sxm")
    threads: int | None = None  # torch CPU threads while measuring
    model: str  # the config's name (checkpoint directory, "glm5-tiny")
    model_config_sha256: str
    glm_config: dict  # the GlmConfig it was measured on (lets the analytic model be fitted to it)
    dtype: str  # of weights and KV cache while measuring ("float32", "bfloat16")
    tensor_parallel_size: int = 1
    expert_parallel_size: int = 1
    torch_version: str = ""
    glmserve_commit: str = ""
    date: str = ""
    command: str = ""
    notes: str = ""
    prefill: list[PrefillPoint] = Field(min_length=1)
    decode: list[DecodePoint] = Field(min_length=1)
    transport: str | None = None
    transfer: list[TransferPoint] = Field(default_factory=list)

    @model_validator(mode="after")
    def _full_grids(self) -> "Profile":
        _grid([(p.tokens, p.context) for p in self.prefill], "prefill (tokens x context)")
        _grid([(p.batch, p.context, p.k) for p in self.decode], "decode (batch x context x k)")
        return self

    @property
    def config(self) -> GlmConfig:
        return GlmConfig.from_dict(self.glm_config)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        path = Path(path)
        try:
            return cls.model_validate_json(path.read_text())
        except FileNotFoundError:
            raise ProfileError(f"no profile at {path}") from None
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'profile'}: {err['msg']}" for err in e.errors())
            raise ProfileError(f"{path} is not a valid profile: {problems}") from None


def config_sha256(config: GlmConfig) -> str:
    """Identity of a model config, so a profile is only used for the network it measured."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def shipped_profiles() -> list[Path]:
    return sorted(PROFILE_DIR.glob("*.json"))


def find_profile(
    config: GlmConfig, hardware: str, dtype: str | None = None, tp: int = 1, ep: int = 1
) -> Profile | None:
    """A shipped profile measured on this config and hardware (and dtype, tp, ep, when given), if any."""
    sha = config_sha256(config)
    for path in shipped_profiles():
        try:
            profile = Profile.load(path)
        except ProfileError as e:
            log.warning("skipping %s", e)
            continue
        if (
            profile.model_config_sha256 == sha
            and profile.hardware == hardware
            and (dtype is None or profile.dtype == dtype)
            and (profile.tensor_parallel_size, profile.expert_parallel_size) == (tp, ep)
        ):
            return profile
    return None


def _grid(points: list[tuple], what: str) -> tuple[list[np.ndarray], dict[tuple, int]]:
    axes = [np.array(sorted({p[d] for p in points}), dtype=np.float64) for d in range(len(points[0]))]
    index = {p: i for i, p in enumerate(points)}
    if len(index) != len(points):
        raise ValueError(f"{what}: a grid point is measured twice")
    expected = int(np.prod([len(a) for a in axes]))
    if expected != len(points):
        sizes = " x ".join(str(len(a)) for a in axes)
        raise ValueError(f"{what}: {len(points)} points do not fill the {sizes} grid of their axes")
    return axes, index


class GridInterpolator:
    """Multilinear interpolation on a full grid, linear extrapolation beyond it (the outermost segment's slope);
    an axis with one value is constant along it. Values are floored at `floor`."""

    def __init__(self, axes: list[np.ndarray], values: np.ndarray, floor: float = 0.0):
        self.axes = axes
        self.values = values
        self.floor = floor

    @classmethod
    def from_points(cls, coords: list[tuple], seconds: list[float], floor: float = 0.0) -> "GridInterpolator":
        axes, index = _grid(coords, "grid")
        values = np.empty([len(a) for a in axes])
        for coord, i in index.items():
            values[tuple(int(np.searchsorted(a, x)) for a, x in zip(axes, coord, strict=True))] = seconds[i]
        return cls(axes, values, floor)

    def __call__(self, *point: float | np.ndarray) -> np.ndarray | float:
        """Scalars give a float; arrays (broadcast together) give an array."""
        arrays = np.broadcast_arrays(*[np.asarray(x, dtype=np.float64) for x in point])
        lo, t = [], []
        for axis, x in zip(self.axes, arrays, strict=True):
            if len(axis) == 1:
                lo.append(np.zeros(x.shape, dtype=np.int64))
                t.append(np.zeros(x.shape))
                continue
            i = np.clip(np.searchsorted(axis, x, side="right") - 1, 0, len(axis) - 2)
            lo.append(i)
            t.append((x - axis[i]) / (axis[i + 1] - axis[i]))
        out = np.zeros(arrays[0].shape)
        d = len(self.axes)
        for corner in range(1 << d):
            weight = np.ones(arrays[0].shape)
            index = []
            for j in range(d):
                up = (corner >> j) & 1
                if len(self.axes[j]) == 1:
                    if up:
                        weight = weight * 0.0
                    index.append(lo[j])
                    continue
                weight = weight * (t[j] if up else 1.0 - t[j])
                index.append(lo[j] + up)
            out = out + weight * self.values[tuple(index)]
        out = np.maximum(out, self.floor)
        return float(out) if out.ndim == 0 else out
