"""Batched sampling over logits [N, V] with one SamplingParams per row.

Steps, in vLLM's (v1) order: the structured-output bitmask, min_tokens masking, penalties (repetition, frequency,
presence), temperature, min-p, top-k, top-p, then a draw. Every step is a tensor op over the whole batch and acts on
each row alone, so a row's result does not depend on what else is in the batch. Greedy rows take the exact argmax.
Seeded rows draw from their request's own generator, so a seeded request samples the same tokens in any batch.
Logprobs come from the raw logits, before any of these steps (vLLM's default, `raw_logprobs`).

The bitmask (int32 [N, ceil(V / 32)], bit t % 32 of word t // 32 set: token t allowed; all ones on unconstrained
rows) sets disallowed tokens to -inf before anything else, so greedy rows take the best allowed token and random
rows draw only allowed ones. It is made on the host by the grammar matchers and unpacked on the logits' device.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .sampling_params import SamplingParams

TokenIds = Sequence[int] | torch.Tensor
# Below this, logits / T can overflow fp32 into inf - inf = nan; such a row is as good as greedy anyway.
MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingBatch:
    params: list[SamplingParams]
    # For the repetition penalty. A tensor kept per sequence spares converting a long prompt every step.
    prompt_token_ids: list[TokenIds]
    output_token_ids: list[TokenIds]  # for all penalties, and min_tokens
    generators: list[torch.Generator]  # one per row: the request's own when seeded, else one shared by the rest
    eos_token_ids: tuple[int, ...] = ()
    bitmask: torch.Tensor | None = None  # [N, words] int32 of allowed tokens (structured output); None: no grammar


@dataclass
class TokenLogprobs:
    logprobs: torch.Tensor  # [N] of the given tokens
    ranks: torch.Tensor  # [N], 1 = most likely
    top_ids: torch.Tensor  # [N, k] most likely tokens, best first
    top_logprobs: torch.Tensor  # [N, k]


class Sampler:
    def processed_logits(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """fp32 logits after every step but the draw. Greedy rows skip temperature; no later step moves their
        argmax."""
        logits = logits.to(torch.float32, copy=True)
        params = batch.params
        if batch.bitmask is not None:
            apply_token_bitmask(logits, batch.bitmask)
        _mask_stop_tokens(logits, batch)
        _apply_penalties(logits, batch)
        temperature = [1.0 if p.is_greedy else max(p.temperature, MIN_TEMPERATURE) for p in params]
        if any(t != 1.0 for t in temperature):
            logits /= _column(temperature, logits.device)
        if any(p.min_p > 0 for p in params):
            _apply_min_p(logits, _column([p.min_p for p in params], logits.device))
        vocab = logits.shape[-1]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        if any(k < vocab for k in top_k):
            _apply_top_k(logits, top_k)
        if any(p.top_p < 1 for p in params):
            _apply_top_p(logits, _column([p.top_p for p in params], logits.device))
        return logits

    def probs(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """[N, V]: the distribution each row samples from; one-hot on greedy rows (what speculative sampling
        verifies against)."""
        processed = self.processed_logits(logits, batch)
        probs = processed.softmax(-1)
        greedy = [p.is_greedy for p in batch.params]
        if any(greedy):
            one_hot = torch.zeros_like(probs).scatter_(-1, processed.argmax(-1, keepdim=True), 1.0)
            probs = torch.where(torch.tensor(greedy, device=probs.device)[:, None], one_hot, probs)
        return probs

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """One token id per row [N]. Each generator makes one draw per row it serves, in row order."""
        processed = self.processed_logits(logits, batch)
        tokens = processed.argmax(-1)
        random_rows = [i for i, p in enumerate(batch.params) if not p.is_greedy]
        if not random_rows:
            return tokens
        probs = processed[random_rows].softmax(-1)
        by_generator: dict[int, list[int]] = {}  # id(generator) -> positions in random_rows
        for j, i in enumerate(random_rows):
            by_generator.setdefault(id(batch.generators[i]), []).append(j)
        for positions in by_generator.values():
            generator = batch.generators[random_rows[positions[0]]]
            tokens[[random_rows[j] for j in positions]] = draw(probs[positions], generator)
        return tokens

    def logprobs(self, logits: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> TokenLogprobs:
        """Logprob and rank of token_ids [N] and the num_top most likely tokens per row, from the RAW logits [N, V]
        (before penalties, temperature and masks: vLLM's default)."""
        logprobs = logits.float().log_softmax(-1)
        token_ids = token_ids.to(logprobs.device)
        chosen = logprobs.gather(-1, token_ids[:, None]).squeeze(-1)
        ranks = (logprobs > chosen[:, None]).sum(-1) + 1
        top = logprobs.topk(num_top, dim=-1)
        return TokenLogprobs(chosen, ranks, top.indices, top.values)


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One sample per row of probs [..., V] by the exponential race: argmax(p / E), E ~ Exp(1) i.i.d. The noise is
    made on the generator's device (a seed must not mean different things on different devices) and the race is run
    on probs' device. A [V] draw advances the generator exactly as one row of a [m, V] draw, so a seeded request
    draws the same way alone or grouped."""
    noise = torch.empty(probs.shape, device=generator.device).exponential_(generator=generator).to(probs.device)
    # E == 0 on a masked token would give 0 / 0 = nan, which argmax would pick
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(-1)


def draw_skip(generator: torch.Generator, vocab_size: int) -> None:
    """Advance a generator past one `draw` made elsewhere (a prefill worker sampled the first token with the same
    seed), so the rest of the request samples as it would have in one process."""
    torch.empty(vocab_size, device=generator.device).exponential_(generator=generator)


_BITS: dict[torch.device, torch.Tensor] = {}


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
    """bool [N, vocab_size] from an int32 bitmask [N, words] (moved to `device` first: 4 bytes per 32 tokens)."""
    bits = _BITS.get(device)
    if bits is None:
        bits = _BITS[device] = torch.arange(32, dtype=torch.int32, device=device)
    words = bitmask.to(device, non_blocking=True)
    return ((words[:, :, None] >> bits) & 1).bool().flatten(1)[:, :vocab_size]


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Disallowed tokens of each row get -inf, in place."""
    logits.masked_fill_(~allowed_tokens(bitmask, logits.shape[-1], logits.device), float("-inf"))


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]


def _mask_stop_tokens(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """Rows below min_tokens cannot end: eos (unless ignored) and stop token ids get -inf. Not rows under a
    grammar: it alone says where the output may end."""
    vocab = logits.shape[-1]
    rows, ids = [], []
    for i, p in enumerate(batch.params):
        if len(batch.output_token_ids[i]) >= p.min_tokens or p.structured_outputs is not None:
            continue
        eos = () if p.ignore_eos else batch.eos_token_ids
        for t in {*eos, *p.stop_token_ids}:
            if t < vocab:
                rows.append(i)
                ids.append(t)
    if rows:
        logits[torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device)] = float("-inf")


def _token_counts(rows: list[TokenIds], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, V] float counts of each token id in each row."""
    ids = [torch.as_tensor(r, dtype=torch.long, device=device) for r in rows]
    lengths = torch.tensor([len(t) for t in ids], device=device)
    row_of = torch.repeat_interleave(torch.arange(len(rows), device=device), lengths)
    flat = torch.cat(ids) + row_of * vocab
    counts = torch.zeros(len(rows) * vocab, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=counts.dtype))
    return counts.view(len(rows), vocab)


def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """Repetition (HF/vLLM: positive logits divided, negative multiplied) on tokens of the prompt or the output;
    frequency and presence (OpenAI: subtracted) on output tokens only."""
    rows = [
        i
        for i, p in enumerate(batch.params)
        if p.repetition_penalty != 1.0 or p.frequency_penalty != 0 or p.presence_penalty != 0
    ]
    if not rows:
        return
    params = [batch.params[i] for i in rows]
    vocab, device = logits.shape[-1], logits.device
    counts = _token_counts([batch.output_token_ids[i] for i in rows], vocab, device)
    penalized = logits[rows]
    if any(p.repetition_penalty != 1.0 for p in params):
        # the prompt is only read for rows that need it
        prompts = [
            batch.prompt_token_ids[i] if p.repetition_penalty != 1.0 else () for i, p in zip(rows, params, strict=True)
        ]
        seen = (counts > 0) | (_token_counts(prompts, vocab, device) > 0)
        repetition = _column([p.repetition_penalty for p in params], device)
        scaled = torch.where(penalized > 0, penalized / repetition, penalized * repetition)
        penalized = torch.where(seen, scaled, penalized)
    frequency = _column([p.frequency_penalty for p in params], device)
    presence = _column([p.presence_penalty for p in params], device)
    logits[rows] = penalized - frequency * counts - presence * (counts > 0)


def _apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """Drop tokens less likely than min_p times the row's most likely token."""
    probs = logits.softmax(-1)
    logits.masked_fill_(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))


def _apply_top_k(logits: torch.Tensor, top_k: list[int]) -> None:
    """Keep each row's top_k logits (and any tied with the k-th); a row with top_k = V keeps all."""
    vocab = logits.shape[-1]
    k = torch.tensor(top_k, device=logits.device)
    k_max = max(t for t in top_k if t < vocab)
    largest = logits.topk(k_max, dim=-1).values
    kth = largest.gather(-1, (k.clamp(max=k_max) - 1)[:, None])
    kth = kth.masked_fill((k == vocab)[:, None], float("-inf"))
    logits.masked_fill_(logits < kth, float("-inf"))


def _apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> None:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (the token that crosses it stays)."""
    sorted_logits, order = logits.sort(-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    # rows with top_p = 1 keep everything, even where rounding lifts the running sum to 1 before the tail
    drop = (mass_before >= top_p) & (top_p < 1)
    drop[:, 0] = False
    logits.masked_fill_(torch.zeros_like(drop).scatter_(-1, order, drop), float("-inf"))
