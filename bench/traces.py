"""Benchmark workloads: production traces, synthetic load, and the prompts sent for them.

Traces, packaged gzip-compressed in `bench/data/` (sources, licenses and citations in its NOTICE.md):
- Azure LLM inference 2023 (`TIMESTAMP,ContextTokens,GeneratedTokens`), code and conversation, one hour each.
  Source: Azure/AzurePublicDataset, CC-BY 4.0; cite Patel et al., "Splitwise", ISCA 2024.
- Mooncake conversation (`{"timestamp" ms, "input_length", "output_length", "hash_ids"}`), where `hash_ids` name the
  prompt's 512-token blocks, so requests with equal leading ids share a prompt prefix. Source: kvcache-ai/Mooncake
  (FAST'25 release), Apache-2.0; cite Qin et al., "Mooncake", FAST 2025.

Every workload becomes a list of `TraceRequest` sorted by arrival. `PromptBuilder` turns one into a prompt of its
length; blocks named by the same hash id get the same tokens, so replaying Mooncake exercises prefix caching.
"""

import csv
import gzip
import math
import os
from dataclasses import dataclass, replace
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import TextIO

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

MOONCAKE_BLOCK_TOKENS = 512
NAMED_TRACES = {
    "azure-code": "azure_llm_2023_code.csv",
    "azure-conv": "azure_llm_2023_conv.csv",
    "mooncake": "mooncake_conversation.jsonl",
}
PACKAGED_TRACE_DIR = Path(__file__).with_name("data")


class TraceNotFoundError(FileNotFoundError):
    """No trace file where one was looked for; the message says where that was."""


def resolve_trace(name_or_path: str, trace_dir: str | Path | None = None) -> Path:
    """The file of a trace path, or of a named trace (plain or `.gz`) in the first of: `trace_dir`,
    `$GLMSERVE_TRACE_DIR`, the traces packaged with glmserve."""
    if name_or_path not in NAMED_TRACES:
        path = Path(name_or_path)
        if path.is_file():
            return path
        raise TraceNotFoundError(f"trace file not found: {path} (named traces: {', '.join(NAMED_TRACES)})")
    if trace_dir:
        folder, source = Path(trace_dir), "--trace-dir"
    elif os.environ.get("GLMSERVE_TRACE_DIR"):
        folder, source = Path(os.environ["GLMSERVE_TRACE_DIR"]), "$GLMSERVE_TRACE_DIR"
    else:
        folder, source = PACKAGED_TRACE_DIR, "the traces packaged with glmserve"
    file = NAMED_TRACES[name_or_path]
    for path in (folder / file, folder / f"{file}.gz"):
        if path.is_file():
            return path
    raise TraceNotFoundError(
        f"trace {name_or_path!r} not found: looked for {file} and {file}.gz in {folder} (from {source})"
    )


def _open_text(path: Path) -> TextIO:
    """A trace file for reading, gzip-compressed or not (by its `.gz` suffix)."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", newline="")
    return open(path, newline="")


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float  # seconds after the workload's first request
    input_len: int  # prompt tokens
    output_len: int  # tokens to generate
    prefix_hash_ids: tuple[int, ...] | None = None  # one id per prompt block (Mooncake); None: no shared prefix


class AzureRow(BaseModel):
    model_config = ConfigDict(frozen=True)
    timestamp: datetime = Field(alias="TIMESTAMP")
    context_tokens: int = Field(alias="ContextTokens", ge=0)
    generated_tokens: int = Field(alias="GeneratedTokens", ge=0)


class MooncakeRow(BaseModel):
    model_config = ConfigDict(frozen=True)
    timestamp: float = Field(ge=0)  # milliseconds
    input_length: int = Field(ge=0)
    output_length: int = Field(ge=0)
    hash_ids: list[int]


def load_azure_trace(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    with _open_text(Path(path)) as f:
        rows = [AzureRow.model_validate(r) for r in islice(csv.DictReader(f), limit)]
    if not rows:
        return []
    start = min(r.timestamp for r in rows)
    requests = [TraceRequest((r.timestamp - start).total_seconds(), r.context_tokens, r.generated_tokens) for r in rows]
    return sorted(requests, key=lambda r: r.arrival_s)


def load_mooncake_trace(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    with _open_text(Path(path)) as f:
        lines = islice((line for line in f if line.strip()), limit)
        rows = [MooncakeRow.model_validate_json(line) for line in lines]
    if not rows:
        return []
    start = min(r.timestamp for r in rows)
    requests = [
        TraceRequest((r.timestamp - start) / 1000.0, r.input_length, r.output_length, tuple(r.hash_ids)) for r in rows
    ]
    return sorted(requests, key=lambda r: r.arrival_s)


def load_trace(name_or_path: str, limit: int | None = None, trace_dir: str | Path | None = None) -> list[TraceRequest]:
    """A named trace (`azure-code`, `azure-conv`, `mooncake`) or a file path; `.csv` is Azure, `.jsonl` Mooncake,
    either of them possibly gzip-compressed (`.csv.gz`, `.jsonl.gz`)."""
    path = resolve_trace(name_or_path, trace_dir)
    kind = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    if kind == ".csv":
        return load_azure_trace(path, limit)
    if kind in (".jsonl", ".json"):
        return load_mooncake_trace(path, limit)
    raise ValueError(f"unknown trace format {kind!r}: expected .csv (Azure) or .jsonl (Mooncake), maybe .gz")


def synthetic_requests(
    num_requests: int, input_len: int, output_len: int, range_ratio: float = 0.0, seed: int = 0
) -> list[TraceRequest]:
    """Lengths fixed, or uniform in [len * (1 - range_ratio), len * (1 + range_ratio)]; all arrive at time 0."""
    rng = np.random.default_rng(seed)

    def lengths(center: int) -> np.ndarray:
        low = max(1, math.floor(center * (1 - range_ratio)))
        high = max(low, math.ceil(center * (1 + range_ratio)))
        return rng.integers(low, high + 1, num_requests)

    return [TraceRequest(0.0, int(i), int(o)) for i, o in zip(lengths(input_len), lengths(output_len), strict=True)]


def with_poisson_arrivals(requests: list[TraceRequest], rate: float, seed: int = 0) -> list[TraceRequest]:
    """Replace arrivals by a Poisson process of `rate` requests/s (inf: all at once); the first arrives at 0."""
    if math.isinf(rate):
        return [replace(r, arrival_s=0.0) for r in requests]
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(requests))
    gaps[0] = 0.0
    return [replace(r, arrival_s=float(t)) for r, t in zip(requests, np.cumsum(gaps), strict=True)]


def rescale_to_rate(requests: list[TraceRequest], rate: float) -> list[TraceRequest]:
    """Stretch or squeeze time so the mean rate, (N - 1) / span, is `rate`; all gaps scale alike (bursts keep shape)."""
    if len(requests) < 2:
        return list(requests)
    span = requests[-1].arrival_s - requests[0].arrival_s
    if span <= 0:
        raise ValueError("these requests all arrive at one instant; there is no rate to rescale")
    factor = (len(requests) - 1) / span / rate
    start = requests[0].arrival_s
    return [replace(r, arrival_s=(r.arrival_s - start) * factor) for r in requests]


def scale_lengths(
    requests: list[TraceRequest],
    length_scale: float = 1.0,
    max_input_len: int | None = None,
    max_output_len: int | None = None,
) -> list[TraceRequest]:
    """Divide lengths by `length_scale` (rounding up, at least 1 token), then clip them.

    Hash ids stay: with `prefix_block_tokens(length_scale)` tokens per block the same prefixes are shared.
    """

    def scaled(n: int, cap: int | None) -> int:
        n = max(1, math.ceil(n / length_scale))
        return min(n, cap) if cap else n

    return [
        replace(r, input_len=scaled(r.input_len, max_input_len), output_len=scaled(r.output_len, max_output_len))
        for r in requests
    ]


def prefix_block_tokens(length_scale: float = 1.0) -> int:
    return max(1, round(MOONCAKE_BLOCK_TOKENS / length_scale))


# Common English words; most tokenizers spend about one token on " word", so a prompt of N words is about N tokens.
WORDS = (
    "the of and to in is was for on that with as by at from his her they this had not are but which be have one "
    "all were when we there can an their more if no out so said what up its about into than them only other new "
    "some could time these two may then do first any my now such like our over man me even most made after also "
    "did many before must through back years where much your way well down should because each just those people "
    "how too little state good very make world still own see men work long get here between both life being under"
).split()
WORDS_PER_LINE = 16  # a newline now and then, so text prompts look like lines rather than one endless sentence


@dataclass(frozen=True)
class PromptBuilder:
    """Deterministic prompts of each request's length, as token ids or as text of about that many tokens.

    A prompt is the request's prefix blocks in order (block `h` holds the same units in every prompt), then units
    drawn for this request alone; it is cut at `input_len`. Token ids come from `token_id_range` (low, high), which
    must be ordinary tokens in the served model's vocabulary.
    """

    block_tokens: int = MOONCAKE_BLOCK_TOKENS
    token_id_range: tuple[int, int] = (1000, 8000)
    seed: int = 0

    def _units(self, index: int, request: TraceRequest, choices: int) -> np.ndarray:
        parts, have = [], 0
        for hash_id in request.prefix_hash_ids or ():
            if have >= request.input_len:
                break
            parts.append(np.random.default_rng((self.seed, 0, hash_id)).integers(0, choices, self.block_tokens))
            have += self.block_tokens
        if have < request.input_len:
            own = np.random.default_rng((self.seed, 1, index)).integers(0, choices, request.input_len - have)
            parts.append(own)
        return np.concatenate(parts)[: request.input_len]

    def token_ids(self, index: int, request: TraceRequest) -> list[int]:
        low, high = self.token_id_range
        return (self._units(index, request, high - low) + low).tolist()

    def text(self, index: int, request: TraceRequest) -> str:
        words = [WORDS[i] for i in self._units(index, request, len(WORDS))]
        lines = (" ".join(words[i : i + WORDS_PER_LINE]) for i in range(0, len(words), WORDS_PER_LINE))
        return "\n".join(lines)
