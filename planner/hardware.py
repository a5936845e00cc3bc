"""The hardware catalogue: each accelerator's roofline numbers (dense bf16/fp8 FLOP/s, HBM size and bandwidth,
NVLink and network bandwidth), every number with its public source. Shipped in `data/hardware.yaml`; a user file of
the same shape adds or overrides entries (`--hardware-file`).

`cpu` carries no numbers: a CPU is planned only from a measured profile (`glmserve profile`).
"""

from functools import cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CATALOGUE = Path(__file__).parent / "data" / "hardware.yaml"
ALIASES = {"h100": "h100-sxm", "h200": "h200-sxm", "b200-sxm": "b200", "host": "cpu"}
_NUMBERS = ("bf16_tflops", "fp8_tflops", "hbm_gb", "hbm_tb_s", "nvlink_gb_s", "network_gb_s")


class UnknownHardware(ValueError):
    """A hardware name the catalogue does not hold; the message lists the known ones."""


class Hardware(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = ""  # the catalogue key, filled in on loading
    name: str
    calibrated_only: bool = False  # no roofline: step times only from a profile measured on it
    bf16_tflops: float | None = Field(None, gt=0)  # dense
    fp8_tflops: float | None = Field(None, gt=0)  # dense
    hbm_gb: float | None = Field(None, gt=0)  # 1e9 bytes
    hbm_tb_s: float | None = Field(None, gt=0)
    nvlink_gb_s: float | None = Field(None, gt=0)  # per GPU, both directions (datasheet figure)
    network_gb_s: float | None = Field(None, gt=0)  # per GPU scale-out NIC, one direction
    gpus_per_node: int = Field(8, ge=1)
    sources: dict[str, str] = Field(default_factory=dict)
    measured: dict[str, str] = Field(default_factory=dict)  # figures measured on it by this project, for reference

    @model_validator(mode="after")
    def _complete(self) -> "Hardware":
        if self.calibrated_only:
            return self
        missing = [n for n in _NUMBERS if getattr(self, n) is None]
        if missing:
            raise ValueError(f"needs {', '.join(missing)} (or calibrated_only: true)")
        unsourced = [n for n in _NUMBERS if not self.sources.get(n)]
        if unsourced:
            raise ValueError(f"every number needs its source: none given for {', '.join(unsourced)}")
        return self

    # ---- in SI units, for the cost model ----
    def peak_flops(self, dtype: str) -> float:
        value = self.fp8_tflops if dtype == "fp8" else self.bf16_tflops
        if value is None:
            raise UnknownHardware(f"{self.key} has no roofline (calibrated from a profile only)")
        return value * 1e12

    @property
    def hbm_bytes(self) -> float:
        return (self.hbm_gb or 0.0) * 1e9

    @property
    def hbm_bytes_per_s(self) -> float:
        return (self.hbm_tb_s or 0.0) * 1e12

    @property
    def nvlink_bytes_per_s(self) -> float:
        """One direction: half the datasheet's bidirectional figure."""
        return (self.nvlink_gb_s or 0.0) * 1e9 / 2

    @property
    def network_bytes_per_s(self) -> float:
        return (self.network_gb_s or 0.0) * 1e9


def load_catalogue(extra: str | Path | None = None) -> dict[str, Hardware]:
    """The shipped catalogue, plus (overriding) the entries of `extra`, a YAML file of the same shape."""
    entries = dict(_shipped())
    if extra is not None:
        entries.update(_parse(Path(extra)))
    return entries


@cache
def _shipped() -> tuple[tuple[str, Hardware], ...]:
    return tuple(_parse(CATALOGUE).items())


def _parse(path: Path) -> dict[str, Hardware]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise UnknownHardware(f"no hardware file at {path}") from None
    if not isinstance(data, dict):
        raise UnknownHardware(f"{path} must map hardware names to their numbers")
    out = {}
    for key, entry in data.items():
        try:
            out[key] = Hardware.model_validate({**(entry or {}), "key": key})
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or key}: {err['msg']}" for err in e.errors())
            raise UnknownHardware(f"{path}: hardware {key!r}: {problems}") from None
    return out


def get_hardware(name: str, extra: str | Path | None = None) -> Hardware:
    """A catalogue entry by key (`h100-sxm`, `h200-sxm`, `b200`, `cpu`) or alias (`h100`, `h200`)."""
    catalogue = load_catalogue(extra)
    key = name.lower()
    key = key if key in catalogue else ALIASES.get(key, key)
    if key not in catalogue:
        known = ", ".join(sorted(catalogue) + sorted(a for a in ALIASES if ALIASES[a] in catalogue))
        raise UnknownHardware(f"unknown hardware {name!r}; known: {known} (add one with --hardware-file)")
    return catalogue[key]
