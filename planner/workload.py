"""The requests a simulation replays: a trace (Azure CSV or Mooncake JSONL) or synthetic lengths, built exactly as
`glmserve bench serve` builds them (`bench.serve.build_workload`: `--trace-rate`, `--length-scale`,
`--num-requests`, `--request-rate`, clipping), plus each request's prefix-block keys for the prefix cache.

Mooncake's `hash_ids` name the prompt's 512-token blocks (fewer tokens after `--length-scale`, as
`bench.traces.prefix_block_tokens` says); two prompts with the same leading ids share those tokens, so an engine
block (64 tokens) is shared when every trace block it overlaps is. Its key chains the previous engine block's key,
like `engine/block_manager.block_hash`. Tokens beyond the named blocks, and all tokens of Azure requests, are the
request's own.
"""

import csv
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from glmserve.bench.serve import BenchServeConfig, build_workload
from glmserve.bench.traces import AzureRow, MooncakeRow, TraceRequest, prefix_block_tokens, resolve_trace

ENGINE_BLOCK = 64


class TraceError(ValueError):
    """A trace file the planner cannot replay; the message names the file and what is wrong with it."""


@dataclass(eq=False)
class SimRequest:
    index: int
    arrival_s: float
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] | None = None
    trace_block_tokens: int = 512
    _keys: list[int] | None = field(default=None, repr=False)
    _all: list[int] = field(default_factory=list, repr=False)

    def shared_keys(self) -> list[int]:
        """Keys of the prompt's engine blocks that other requests can share (Mooncake), in order."""
        if self._keys is None:
            self._keys = _shared_keys(self.hash_ids or (), self.trace_block_tokens, self.input_len)
        return self._keys

    def block_key(self, j: int) -> int:
        """The prefix-cache key of this request's engine block j (prompt or output)."""
        keys = self.shared_keys()
        if j < len(keys):
            return keys[j]
        return -(self.index * (1 << 32) + j) - 1  # the request's own tokens: a key nobody else has

    def keys(self, n: int) -> list[int]:
        """`block_key(j)` for j < n, as one list (kept and grown: the simulator asks often)."""
        keys = self._all
        if len(keys) < n:
            if not keys:
                keys.extend(self.shared_keys())
            first = len(keys)
            base = -(self.index * (1 << 32)) - 1
            keys.extend(range(base - first, base - max(n, first + 64), -1))
        return keys if len(keys) == n else keys[:n]


def _shared_keys(hash_ids: tuple[int, ...], block_tokens: int, input_len: int) -> list[int]:
    covered = min(len(hash_ids) * block_tokens, input_len)
    keys, parent = [], 0
    for j in range(covered // ENGINE_BLOCK):
        first, last = (j * ENGINE_BLOCK) // block_tokens, (j * ENGINE_BLOCK + ENGINE_BLOCK - 1) // block_tokens
        parent = hash((parent, hash_ids[first : last + 1], (j * ENGINE_BLOCK) % block_tokens)) & ((1 << 62) - 1)
        keys.append(parent)
    return keys


REQUIRED_AZURE = {field.alias for field in AzureRow.model_fields.values()}
REQUIRED_MOONCAKE = set(MooncakeRow.model_fields)


def check_trace_columns(path: Path) -> None:
    """Fail naming the missing columns (fields) before a long load, from the header or the first record."""
    kind = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    opener = gzip.open(path, "rt", newline="") if path.suffix == ".gz" else open(path, newline="")
    with opener as f:
        if kind == ".csv":
            header = next(csv.reader(f), None)
            have, need, what = set(header or ()), REQUIRED_AZURE, "columns"
        else:
            first = next((line for line in f if line.strip()), None)
            if first is None:
                raise TraceError(f"trace {path} is empty")
            try:
                record = json.loads(first)
            except json.JSONDecodeError as e:
                raise TraceError(f"trace {path}: the first line is not JSON: {e}") from None
            have, need, what = set(record) if isinstance(record, dict) else set(), REQUIRED_MOONCAKE, "fields"
    missing = need - have
    if missing:
        raise TraceError(
            f"trace {path} lacks the {what} {', '.join(sorted(missing))} (found: {', '.join(sorted(have)) or 'none'};"
            f" an Azure CSV needs {', '.join(sorted(REQUIRED_AZURE))}, a Mooncake JSONL "
            f"{', '.join(sorted(REQUIRED_MOONCAKE))})"
        )


def load_workload(config: BenchServeConfig) -> list[SimRequest]:
    """The requests `glmserve bench serve` would send for this configuration, in arrival order."""
    if config.trace:
        try:
            path = resolve_trace(config.trace, config.trace_dir)
        except FileNotFoundError as e:
            raise TraceError(str(e)) from None
        check_trace_columns(path)
    try:
        requests: list[TraceRequest] = build_workload(config)
    except ValidationError as e:
        err = e.errors()[0]
        raise TraceError(f"trace {config.trace}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    except ValueError as e:
        raise TraceError(f"trace {config.trace}: {e}") from None
    if not requests:
        raise TraceError(f"the workload is empty (trace {config.trace})")
    block = prefix_block_tokens(config.length_scale)
    return [
        SimRequest(i, r.arrival_s, r.input_len, r.output_len, r.prefix_hash_ids, block) for i, r in enumerate(requests)
    ]
