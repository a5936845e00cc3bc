"""`glmserve profile`: time the real engine (`LLMEngine.step`, scheduler, model runner, sampler and all) on this
device over a grid, and write a profile JSON the planner interpolates.

- prefill: one prompt chunk of `tokens` new tokens after `context` tokens already cached. The cached part comes
  from the engine's own prefix cache: a base prompt of `context` tokens is prefilled first, then each timed request
  is that prompt plus fresh tokens, admitted with its prefix hit and computed in one step (`max_tokens=1`).
- decode: `batch` sequences of about `context` tokens decoding together; with K > 0 each step verifies K MTP drafts
  (the engine runs with `num_speculative_tokens = max K` and its policy is offered only K). K = 0 is timed on an
  engine without speculation, as `num_speculative_tokens: 0` serves. Prompts repeat across cells, so after the first
  time their KV comes from the prefix cache and only the timing costs.
- transfer (optional): KV bytes over a transport between two processes (`bench/kvtransfer.py`'s harness).

Each point is the median of `repeats` timed steps after `warmup` untimed ones.
"""

import argparse
import contextlib
import logging
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from glmserve.engine.engine_args import EngineArgs
from glmserve.engine.llm_engine import LLMEngine
from glmserve.engine.sampling_params import SamplingParams
from glmserve.model.config import GlmConfig

from .profile import DecodePoint, PrefillPoint, Profile, TransferPoint, config_sha256

log = logging.getLogger(__name__)

DEFAULT_PREFILL_TOKENS = [16, 64, 256, 1024, 2048]
DEFAULT_PREFILL_CONTEXTS = [0, 1024]
DEFAULT_DECODE_BATCHES = [1, 4, 16]
DEFAULT_DECODE_CONTEXTS = [64, 256, 1024]
DEFAULT_KS = [0, 1, 3]
BLOCK = 64


def hardware_key(device: torch.device) -> str:
    """The catalogue entry a device calibrates."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).upper()
    for marker, key in (("H200", "h200-sxm"), ("H100", "h100-sxm"), ("B200", "b200")):
        if marker in name:
            return key
    return name.lower().replace(" ", "-")


def git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return commit + ("+dirty" if commit and dirty else "")
    return ""


class _Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def step(self, engine: LLMEngine) -> tuple[float, list]:
        """Seconds of one engine step, and its outputs."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        outputs = engine.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0, outputs


class Profiler:
    def __init__(
        self,
        model: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        warmup: int = 2,
        repeats: int = 5,
        seed: int = 0,
        prefill_warmup: int = 1,
        prefill_repeats: int = 3,
    ):
        self.model, self.device_arg, self.dtype_arg = model, device, dtype
        self.warmup, self.repeats = warmup, repeats
        self.prefill_warmup, self.prefill_repeats = prefill_warmup, prefill_repeats
        self.rng = np.random.default_rng(seed)
        self._ids = 0

    # ---- engines ----
    def engine(self, max_tokens_per_step: int, max_seqs: int, kv_tokens: int, k: int) -> LLMEngine:
        engine = self._build(max_tokens_per_step, max_seqs, kv_tokens, k)
        self.device, self.dtype = engine.device, engine.cache.spec.dtype
        return engine

    def _build(self, max_tokens_per_step: int, max_seqs: int, kv_tokens: int, k: int) -> LLMEngine:
        return LLMEngine(
            EngineArgs(
                model=self.model,
                device=self.device_arg,
                dtype=self.dtype_arg,
                max_num_seqs=max_seqs,
                max_num_batched_tokens=max_tokens_per_step,
                enable_prefix_caching=True,
                num_gpu_blocks_override=-(-kv_tokens // BLOCK) + 8,
                num_speculative_tokens=k,
                adaptive_speculation=k > 0,  # with one choice offered, the adaptive policy always takes it
            )
        )

    def warm(self, engine: LLMEngine) -> None:
        """A few untimed steps first: the first steps of an engine pay one-time costs (allocations, first calls)."""
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        for _ in range(2):
            engine.add_request(self._rid("warm"), self._tokens(engine, BLOCK + 3), params)
        while engine.has_unfinished_requests():
            engine.step()

    def _tokens(self, engine: LLMEngine, n: int) -> list[int]:
        vocab = engine.config.vocab_size
        low, high = min(1000, vocab // 8), min(8000, vocab)
        return self.rng.integers(low, high, n).tolist()

    def _rid(self, tag: str) -> str:
        self._ids += 1
        return f"{tag}-{self._ids}"

    # ---- prefill ----
    def prefill_grid(self, tokens: list[int], contexts: list[int], progress: tqdm | None = None) -> list[PrefillPoint]:
        if any(c % BLOCK for c in contexts):
            raise ValueError(f"prefill contexts must be multiples of the {BLOCK}-token block: {contexts}")
        longest = max(tokens) + max(contexts)
        runs = self.prefill_warmup + self.prefill_repeats
        kv = (max(contexts) + 1) * len(contexts) + longest * (runs + 2) + 4 * BLOCK
        engine = self.engine(max(tokens), 4, kv, 0)
        self._check_len(engine, longest)
        self.warm(engine)
        timer = _Timer(engine.device)
        greedy = SamplingParams(max_tokens=1, temperature=0.0)
        points = []
        for context in contexts:
            base = self._tokens(engine, context)
            if context:  # prefilled once (untimed): its full blocks stay in the prefix cache
                engine.add_request(self._rid("base"), base + self._tokens(engine, 1), greedy)
                while engine.has_unfinished_requests():
                    engine.step()
            for n in tokens:
                times = []
                for i in range(runs):
                    rid = self._rid("prefill")
                    engine.add_request(rid, base + self._tokens(engine, n), greedy)
                    seconds, outputs = timer.step(engine)
                    if engine.has_unfinished_requests():
                        raise RuntimeError(f"the prefill of {n} tokens after {context} took more than one step")
                    cached = [o.num_cached_tokens for o in outputs if o.request_id == rid]
                    if cached != [context]:
                        raise RuntimeError(
                            f"expected {context} tokens from the prefix cache, the engine served {cached}"
                        )
                    if i >= self.prefill_warmup:
                        times.append(seconds)
                points.append(PrefillPoint(tokens=n, context=context, seconds=statistics.median(times), samples=times))
                if progress is not None:
                    progress.update()
        return points

    # ---- decode ----
    def decode_grid(
        self, batches: list[int], contexts: list[int], ks: list[int], progress: tqdm | None = None
    ) -> list[DecodePoint]:
        points = []
        steps = self.warmup + self.repeats
        spec_ks = sorted(k for k in ks if k > 0)
        groups = ([(0, [0])] if 0 in ks else []) + ([(max(spec_ks), spec_ks)] if spec_ks else [])
        for engine_k, cell_ks in groups:
            per_step = max(2 * BLOCK, max(batches) * (1 + engine_k))
            kv = sum(max(batches) * (c + (steps + 3) * (1 + engine_k) + BLOCK) for c in contexts) + 4 * BLOCK
            engine = self.engine(max(per_step, BLOCK * 32), max(batches), kv, engine_k)
            self._check_len(engine, max(contexts) + (steps + 3) * (1 + engine_k) + BLOCK)
            self.warm(engine)
            timer = _Timer(engine.device)
            for context in contexts:
                prompts = [self._tokens(engine, context) for _ in range(max(batches))]
                for batch in batches:
                    for k in cell_ks:
                        seconds, samples, mean_ctx = self._decode_cell(engine, timer, prompts[:batch], k, steps)
                        points.append(
                            DecodePoint(
                                batch=batch, context=context, k=k, seconds=seconds, samples=samples,
                                mean_context=mean_ctx,
                            )
                        )  # fmt: skip
                        if progress is not None:
                            progress.update()
        return points

    def _decode_cell(
        self, engine: LLMEngine, timer: _Timer, prompts: list[list[int]], k: int, steps: int
    ) -> tuple[float, list[float], float]:
        if engine.spec is not None:
            engine.spec.policy.choices = [k]
        # long enough that no sequence finishes while the others still prefill, or while timed
        room = engine.max_model_len - max(len(p) for p in prompts) - 1
        params = SamplingParams(max_tokens=max(1, room), temperature=0.0, ignore_eos=True)
        rids = [self._rid("decode") for _ in prompts]
        for rid, prompt in zip(rids, prompts, strict=True):
            engine.add_request(rid, prompt, params)
        while engine.scheduler.waiting or any(
            s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running
        ):
            engine.step()  # prefill (from the prefix cache after the first cell of this context)
        engine.step()  # the first decode step of the batch: drafts exist from here on
        times, contexts = [], []
        for i in range(steps):
            if len(engine.scheduler.running) != len(prompts):
                raise RuntimeError("a sequence left the batch while it was timed")
            contexts.append(float(np.mean([s.num_tokens for s in engine.scheduler.running])))
            seconds, _ = timer.step(engine)
            if i >= self.warmup:
                times.append(seconds)
        for rid in rids:
            engine.abort(rid)
        return statistics.median(times), times, float(np.mean(contexts))

    @staticmethod
    def _check_len(engine: LLMEngine, tokens: int) -> None:
        if tokens > engine.max_model_len:
            raise ValueError(f"the grid needs {tokens} tokens per sequence; the model allows {engine.max_model_len}")


def measure_transfer(transport: str, sizes: list[int], device: str) -> list[TransferPoint]:
    from glmserve.bench.kvtransfer import bench_transfer

    points = []
    for size in sizes:
        result = bench_transfer(transport, size, device=device, repeats=2)
        points.append(TransferPoint(bytes=int(result["bytes"]), seconds=float(result["seconds"])))
    return points


def run_profile(
    model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    threads: int | None = None,
    prefill_tokens: list[int] | None = None,
    prefill_contexts: list[int] | None = None,
    decode_batches: list[int] | None = None,
    decode_contexts: list[int] | None = None,
    ks: list[int] | None = None,
    warmup: int = 2,
    repeats: int = 5,
    prefill_warmup: int = 1,
    prefill_repeats: int = 3,
    transport: str | None = None,
    transfer_sizes: list[int] | None = None,
    hardware: str | None = None,
    output: str | Path | None = None,
    progress: bool = True,
) -> Profile:
    """Measure a profile (see the module docstring); written to `output` when given."""
    if threads:
        torch.set_num_threads(threads)
    prefill_tokens = prefill_tokens or DEFAULT_PREFILL_TOKENS
    prefill_contexts = prefill_contexts if prefill_contexts is not None else DEFAULT_PREFILL_CONTEXTS
    decode_batches = decode_batches or DEFAULT_DECODE_BATCHES
    decode_contexts = decode_contexts or DEFAULT_DECODE_CONTEXTS
    ks = ks if ks is not None else DEFAULT_KS
    from glmserve.model.default_checkpoint import default_checkpoint

    checkpoint = Path(model) if model else default_checkpoint()
    config = GlmConfig.from_pretrained(checkpoint)
    if any(k > 0 for k in ks) and not config.num_nextn_predict_layers:
        raise ValueError(f"{checkpoint} has no MTP layer: profile it with --ks 0")
    profiler = Profiler(
        model, device, dtype, warmup, repeats, prefill_warmup=prefill_warmup, prefill_repeats=prefill_repeats
    )
    cells = len(prefill_tokens) * len(prefill_contexts) + len(decode_batches) * len(decode_contexts) * len(ks)
    bar = tqdm(total=cells, desc="profile", unit="point", disable=not progress)
    t0 = time.perf_counter()
    prefill = profiler.prefill_grid(prefill_tokens, prefill_contexts, bar)
    decode = profiler.decode_grid(decode_batches, decode_contexts, ks, bar)
    bar.close()
    dev = profiler.device  # as the engines resolved it
    transfer = []
    if transport:
        try:
            transfer = measure_transfer(transport, transfer_sizes, "cuda" if dev.type == "cuda" else "cpu")
        except Exception as e:  # the grid is kept: a profile without transfer points falls back to defaults
            log.warning("KV transfer over %s not measured: %r", transport, e)
            transport = None
    profile = Profile(
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        hardware=hardware or hardware_key(dev),
        threads=torch.get_num_threads() if dev.type == "cpu" else None,
        model=checkpoint.name if model else "glm5-tiny",
        model_config_sha256=config_sha256(config),
        glm_config=config.model_dump(mode="json"),
        dtype=str(profiler.dtype).removeprefix("torch."),
        torch_version=torch.__version__,
        glmserve_commit=git_commit(),
        date=datetime.now().isoformat(timespec="seconds"),
        command="glmserve " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("glmserve") else "",
        notes=(
            f"measured in {time.perf_counter() - t0:.0f} s; median of {prefill_repeats} prefill steps after "
            f"{prefill_warmup}, of {repeats} decode steps after {warmup}"
        ),
        prefill=prefill,
        decode=decode,
        transport=transport,
        transfer=transfer,
    )
    if output:
        log.info("wrote %s", profile.save(output))
    return profile


def profile_from_args(args: argparse.Namespace) -> int:
    profile = run_profile(
        model=args.model, device=args.device, dtype=args.dtype, threads=args.threads,
        prefill_tokens=args.prefill_tokens, prefill_contexts=args.prefill_contexts,
        decode_batches=args.decode_batches, decode_contexts=args.decode_contexts, ks=args.ks,
        warmup=args.warmup, repeats=args.repeats, prefill_warmup=args.prefill_warmup,
        prefill_repeats=args.prefill_repeats, transport=args.transport, transfer_sizes=args.transfer_sizes,
        hardware=args.hardware, output=args.output, progress=args.progress,
    )  # fmt: skip
    print(f"{profile.model} on {profile.device}: {len(profile.prefill)} prefill, {len(profile.decode)} decode points")
    return 0
