"""Batched sampling: penalties, temperature, top-k, top-p and min-p per row, greedy rows exact, seeded rows
reproducible whatever else is in the batch, logprobs from the raw logits (vLLM's default)."""

from dataclasses import dataclass

import torch

from .sampling_params import SamplingParams


@dataclass
class SamplingBatch:
    params: list[SamplingParams]
    prompt_token_ids: list[list[int]]  # for the repetition penalty
    output_token_ids: list[list[int]]  # for all penalties, and min_tokens
    generators: list[torch.Generator]  # one per row: the request's own when seeded
    eos_token_ids: tuple[int, ...] = ()


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [N]
    logprobs: torch.Tensor | None = None  # [N] of the sampled token
    ranks: torch.Tensor | None = None  # [N], 1 = most likely
    top_ids: torch.Tensor | None = None  # [N, k] most likely tokens (k = the batch's largest `logprobs`)
    top_logprobs: torch.Tensor | None = None


class Sampler:
    def processed_logits(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Logits after min_tokens masking, penalties, temperature, top-k, top-p and min-p (vLLM's order)."""
        logits = logits.float().clone()
        n, vocab = logits.shape
        for i, p in enumerate(batch.params):
            out = batch.output_token_ids[i]
            if len(out) < p.min_tokens:
                stops = [t for t in (*batch.eos_token_ids, *p.stop_token_ids) if t < vocab]
                logits[i, stops] = float("-inf")
            if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
                logits[i] = _penalize(logits[i], batch.prompt_token_ids[i], out, p)
        temps = torch.tensor([p.temperature if not p.is_greedy else 1.0 for p in batch.params], device=logits.device)
        logits /= temps[:, None]
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in batch.params], device=logits.device)
        top_p = torch.tensor([p.top_p for p in batch.params], device=logits.device)
        min_p = torch.tensor([p.min_p for p in batch.params], device=logits.device)
        if (top_k < vocab).any() or (top_p < 1).any():
            logits = _top_k_top_p(logits, top_k.clamp(max=vocab), top_p)
        if (min_p > 0).any():
            probs = logits.softmax(-1)
            floor = min_p[:, None] * probs.max(-1, keepdim=True).values
            logits = logits.masked_fill(probs < floor, float("-inf"))
        return logits

    def probs(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The distribution each row samples from; one-hot on greedy rows (what speculative sampling verifies)."""
        processed = self.processed_logits(logits, batch)
        probs = processed.softmax(-1)
        greedy = torch.tensor([p.is_greedy for p in batch.params], device=logits.device)
        if greedy.any():
            one_hot = torch.zeros_like(probs).scatter_(-1, processed.argmax(-1, keepdim=True), 1.0)
            probs = torch.where(greedy[:, None], one_hot, probs)
        return probs

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        processed = self.processed_logits(logits, batch)
        tokens = processed.argmax(-1)
        probs = processed.softmax(-1)
        for i, p in enumerate(batch.params):
            if not p.is_greedy:
                tokens[i] = draw(probs[i], batch.generators[i])
        out = SamplerOutput(token_ids=tokens)
        k = max((p.logprobs for p in batch.params if p.logprobs is not None), default=None)
        if k is not None:
            raw = logits.float().log_softmax(-1)
            out.logprobs = raw.gather(-1, tokens[:, None]).squeeze(-1)
            out.ranks = (raw > out.logprobs[:, None]).sum(-1) + 1
            out.top_logprobs, out.top_ids = raw.topk(k, dim=-1)
        return out


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One sample by the exponential race: argmax(p / E), E ~ Exp(1). One generator call per draw, so a seeded
    request advances its generator the same way in any batch."""
    noise = torch.empty(probs.shape, device=probs.device).exponential_(generator=generator)
    return (probs / noise).argmax(-1)


def draw_skip(generator: torch.Generator, vocab_size: int) -> None:
    """Advance a generator past one `draw` made elsewhere (a prefill worker sampled the first token with the same
    seed), so the rest of the request samples as it would have in one process."""
    torch.empty(vocab_size).exponential_(generator=generator)


def _penalize(row: torch.Tensor, prompt: list[int], output: list[int], p: SamplingParams) -> torch.Tensor:
    vocab = row.shape[-1]
    out_counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=vocab)[:vocab].to(row.device)
    if p.repetition_penalty != 1.0:
        seen = out_counts > 0
        if prompt:
            seen |= torch.bincount(torch.tensor(prompt, dtype=torch.long), minlength=vocab)[:vocab].to(row.device) > 0
        penalized = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
        row = torch.where(seen, penalized, row)
    row = row - p.frequency_penalty * out_counts - p.presence_penalty * (out_counts > 0)
    return row


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    drop = ranks >= top_k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    # keep the smallest prefix whose mass reaches top_p (the token that crosses it stays)
    drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]
    drop[:, 0] = False
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
