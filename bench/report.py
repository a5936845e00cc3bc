"""The one JSON result format every `glmserve bench ...` command writes: what ran, where, and the table's rows.

    {"command": "glmserve bench scheduler --steps 50", "commit": "dd17d22...", "date": "2026-11-29T12:05:17+00:00",
     "device": "NVIDIA H200", "torch": "2.11.0+cu130", "triton": "3.6.0", "python": "3.12.3",
     "rows": [{...one dict per row of the printed table...}], "extra": {...what else the command measured...}}

`device` is the machine the command ran on: the first CUDA device's name, else "cpu: <processor>, <N> cores".
Results recorded before this format (docs/bench/) leave what their runs did not record as null.
"""

import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, field_serializer


class BenchResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    command: str  # the command line that made it
    commit: str | None  # `git rev-parse HEAD` of the glmserve checkout; None when not run from one
    date: AwareDatetime | None  # when it was written, UTC
    device: str | None
    torch: str | None
    triton: str | None
    python: str | None
    rows: list[dict[str, Any]]
    extra: dict[str, Any] = {}

    @field_serializer("date")
    def _iso(self, date: datetime | None) -> str | None:
        return None if date is None else date.isoformat(timespec="seconds")


def command_line() -> str:
    """This process's command line as typed: `glmserve bench ...` or `python -m glmserve.bench.kernels ...`."""
    program = Path(sys.argv[0])
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    head = ["python", "-m", spec.name] if program.suffix == ".py" and spec is not None else [program.name]
    return shlex.join(head + sys.argv[1:])


def git_commit() -> str | None:
    """HEAD of the git checkout that is this package (the repository root is the package), else None: an installed
    wheel, maybe inside some other repository, or no git."""
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != root:
        return None
    return lines[1]


def device_name() -> str:
    import torch  # here, not at the top: the CPU-only commands import it no earlier than they must

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu: {_cpu_model()}, {cores} cores"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    """The installed version, read without importing the package (Triton is slow to import)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def write_report(path: str | Path, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> BenchResult:
    """Write `rows` (the printed table, one dict per row) and `extra` to `path` with this run's environment."""
    result = BenchResult(
        command=command_line(),
        commit=git_commit(),
        date=datetime.now(UTC).replace(microsecond=0),  # as written: the file keeps whole seconds
        device=device_name(),
        torch=_version("torch"),
        triton=_version("triton"),
        python=platform.python_version(),
        rows=rows,
        extra=extra or {},
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # default=str: a row may hold values JSON has no type for (a dtype, a path); they are written as text
    path.write_text(json.dumps(result.model_dump(), indent=2, default=str) + "\n")
    return result
