"""Lossless verification of draft tokens (speculative sampling: Leviathan et al. 2023, Chen et al. 2023).

Draft token d_i, drawn from the draft distribution q_i, is accepted with probability min(1, p_i(d_i) / q_i(d_i));
at the first rejection the token is resampled from norm(max(p_i - q_i, 0)); when every draft is accepted, one more
token comes from the target's next distribution. The output then follows the target distribution exactly. Greedy
requests (one-hot p) reduce to: accept while the draft equals the target's argmax, then emit the argmax.
"""

import torch

from glmserve.engine.sampler import draw


def accepted_prefix(targets: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    """How many leading drafts equal the target's tokens at their positions (greedy acceptance), along the last
    dim: [..., K] -> [...]."""
    return (targets == drafts).int().cumprod(-1).sum(-1)


def verify_drafts(
    target_probs: torch.Tensor,
    drafts: list[int],
    draft_probs: torch.Tensor | None,
    generator: torch.Generator,
    greedy: bool,
) -> list[int]:
    """target_probs [K+1, V] at the draft positions and one past; draft_probs [K, V] (None when greedy).

    Returns the accepted drafts followed by one token from the target (1 to K+1 tokens).
    """
    if greedy:
        best = target_probs.argmax(-1)
        n = int(accepted_prefix(best[:-1], torch.tensor(drafts, dtype=best.dtype, device=best.device)))
        return drafts[:n] + [int(best[n])]
    uniforms = torch.rand(len(drafts), generator=generator).tolist() if drafts else []
    out = []
    for i, d in enumerate(drafts):
        p, q = float(target_probs[i, d]), float(draft_probs[i, d])
        # u < p/q, without dividing by a tiny q; p > 0 too: a draft the target (or its grammar) rules out is never
        # taken, not even when u draws exactly 0
        if p > 0 and q > 0 and uniforms[i] * q <= p:
            out.append(d)
            continue
        residual = (target_probs[i] - draft_probs[i]).clamp(min=0)
        total = residual.sum()
        # p == q leaves nothing to resample from; then p itself is the right distribution
        return out + [int(draw(residual / total if total > 0 else target_probs[i], generator))]
    return out + [int(draw(target_probs[len(drafts)], generator))]
