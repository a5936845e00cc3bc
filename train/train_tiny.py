"""Train the embedded glm5-tiny on Python source: next-token + MTP loss, the DSA recipe and IndexShare.

    python -m glmserve.train.code_corpus --out .data          # tokenize here (the corpus depends on this Python)
    python -m glmserve.train.train_tiny --data .data --out DIR --seed 0 --minutes 9

The training forward is the reference forward (`DecoderLayer.reference_attention`, the MTP fusion), with the
experts computed densely, so the trained weights mean the same network at inference. The recipe, after
DeepSeek-V3.2's DSA:

- Dense phase (the first `dense_fraction` of the steps): every layer attends to all causal keys. Each full layer's
  indexer learns, by KL, to match that layer's attention distribution (summed over heads, detached).
- Sparse phase: each full layer attends only to its indexer's causal top-k (`index_topk`); shared layers reuse the
  top-k of the full layer before them (IndexShare); the KL target is the attention over the selected keys.
- The indexer sees detached inputs, so only the KL trains it and the KL does not move the rest of the model.
- Loss = next-token CE + `mtp_weight` * CE of the MTP layer, which fuses the final-norm hidden state at t with the
  embedding of token t+1 and predicts token t+2.
- MoE experts are computed densely over all experts, weighted by the router's sparse top-k gates (the same sum as
  the routed forward). The noaux_tc correction bias is updated without a loss, by the sign of each expert's load
  imbalance (DeepSeek-V3's auxiliary-loss-free balancing).

Batches are random windows of the token stream drawn from a generator seeded by `--seed`; weights are initialized
from the same seed. Without `--steps`, a few timed dry steps (which change nothing) size the run to `--minutes`;
the log records the step count, and `--steps N` repeats the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from tqdm import tqdm

from glmserve.model.config import GlmConfig
from glmserve.model.default_checkpoint import PACKAGED, random_init_
from glmserve.model.glm import DecoderLayer, GlmForCausalLM
from glmserve.model.moe import MoE
from glmserve.model.weights import save_weights

from .code_corpus import load_info, load_tokens

log = logging.getLogger(__name__)

LOG_FILE = "train_log.json"
CURVE_FILE = "loss_curve.png"
CHECKPOINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


class TrainConfig(BaseModel):
    """Hyper-parameters of one run; the defaults are the ones the packaged glm5-tiny was trained with."""

    seed: int = 0
    seq_len: int = Field(512, gt=0)
    batch_size: int = Field(64, gt=0)
    steps: int | None = Field(None, gt=0, description="fixed step count; None sizes the run to `minutes`")
    minutes: float = Field(9.0, gt=0, description="wall-clock budget of the whole run, evaluation included")
    lr: float = Field(2e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(200, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    mtp_weight: float = Field(0.3, ge=0)
    kl_weight: float = Field(1.0, ge=0)
    dense_fraction: float = Field(0.3, ge=0, le=1, description="share of steps in the dense warm-up phase")
    bias_update_rate: float = Field(1e-3, ge=0, description="aux-loss-free balancing step; 0 keeps the bias at 0")
    eval_every: int = Field(250, gt=0)
    eval_windows: int = Field(32, gt=0)
    final_eval_windows: int = Field(256, gt=0)
    reserve_seconds: float = Field(30.0, ge=0, description="kept free at the end for evaluation and saving")
    autocast: bool = Field(True, description="bf16 autocast on CUDA (fp32 on CPU)")


@dataclass
class Losses:
    ce: torch.Tensor
    mtp: torch.Tensor
    kl: torch.Tensor  # summed over the layers that own an indexer
    expert_ids: list[torch.Tensor]  # per MoE layer, the experts each token was routed to

    def total(self, cfg: TrainConfig) -> torch.Tensor:
        return self.ce + cfg.mtp_weight * self.mtp + cfg.kl_weight * self.kl


@contextlib.contextmanager
def full_precision(device: torch.device):
    """Routing and indexing run in fp32 at inference too; keep autocast out of them."""
    with torch.autocast(device.type, enabled=False):
        yield


def indexer_kl(scores: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over queries of KL(attention summed over heads || softmax of index scores), both over the keys in
    `mask`. scores [B, S, T] fp32 (with grad), probs [B, H, S, T] (detached)."""
    target = probs.detach().sum(1)
    target = target / target.sum(-1, keepdim=True)
    log_q = scores.masked_fill(~mask, float("-inf")).log_softmax(-1).masked_fill(~mask, 0.0)
    log_p = target.clamp_min(1e-20).log()
    return (target * (log_p - log_q)).masked_fill(~mask, 0.0).sum(-1).mean()


def moe_forward(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert on every token, weighted by the router's top-k gates (zero elsewhere): the routed sum, with
    dense matrix products. Returns (output, expert ids [N, top_k])."""
    flat = x.reshape(-1, x.shape[-1])
    with full_precision(x.device):
        ids, weights = moe.gate(flat)
    gates = torch.zeros(flat.shape[0], moe.n_experts, device=x.device, dtype=weights.dtype).scatter(1, ids, weights)
    w_gate = torch.cat([e.gate_proj.weight for e in moe.experts])
    w_up = torch.cat([e.up_proj.weight for e in moe.experts])
    w_down = torch.cat([e.down_proj.weight for e in moe.experts], dim=1)
    act = F.silu(F.linear(flat, w_gate)) * F.linear(flat, w_up)
    act = (act.unflatten(-1, (moe.n_experts, -1)) * gates[..., None].to(act.dtype)).flatten(-2)
    out = F.linear(act, w_down)
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(flat)
    return out.view(x.shape), ids


def layer_forward(
    layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, sparse: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One decoder layer: the reference attention block (dense: all causal keys; sparse: the indexer's top-k, or
    IndexShare's `mask` from the full layer before), then the MLP with dense expert products. Returns (x, the mask
    it attended with, its indexer KL or None, its expert ids or None)."""
    positions = torch.arange(x.shape[1], device=x.device)
    x, mask, trace = layer.reference_attention(x, positions, cos, sin, mask, dense=not sparse)
    kl = indexer_kl(trace.index_scores, trace.probs, mask) if trace.index_scores is not None else None
    h = layer.post_attention_layernorm(x)
    if isinstance(layer.mlp, MoE):
        y, ids = moe_forward(layer.mlp, h)
    else:
        y, ids = layer.mlp(h), None
    return x + y, mask, kl, ids


def model_losses(model: GlmForCausalLM, windows: torch.Tensor, sparse: bool) -> Losses:
    """windows [B, T + 2] token ids -> losses: CE of token t+1, MTP CE of token t+2, indexer KL."""
    ids, next_ids, next_next_ids = windows[:, :-2], windows[:, 1:-1], windows[:, 2:]
    positions = torch.arange(ids.shape[1], device=ids.device)
    cos, sin = model.rope(positions, torch.float32)
    x = model.model.embed_tokens(ids)
    mask = None
    kls, expert_ids = [], []
    for layer in model.decoder_layers:
        x, mask, kl, routed = layer_forward(layer, x, cos, sin, mask, sparse)
        kls += [kl] if kl is not None else []
        expert_ids += [routed] if routed is not None else []
    hidden = model.model.norm(x)
    ce = F.cross_entropy(model.lm_head(hidden).float().flatten(0, 1), next_ids.flatten())
    mtp_ce = torch.zeros((), device=ids.device)
    if model.mtp is not None:
        fused = model.mtp.fuse(model.model.embed_tokens(next_ids), hidden)
        out, _, kl, routed = layer_forward(model.mtp, fused, cos, sin, None, sparse)
        kls += [kl] if kl is not None else []
        expert_ids += [routed] if routed is not None else []
        logits = model.lm_head(model.mtp.shared_head.norm(out)).float()
        mtp_ce = F.cross_entropy(logits.flatten(0, 1), next_next_ids.flatten())
    kl_sum = torch.stack(kls).sum() if kls else torch.zeros((), device=ids.device)
    return Losses(ce, mtp_ce, kl_sum, expert_ids)


def moe_layers(model: GlmForCausalLM) -> list[MoE]:
    return [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoE)]


@torch.no_grad()
def update_expert_bias(model: GlmForCausalLM, expert_ids: list[torch.Tensor], rate: float) -> None:
    """Aux-loss-free balancing: raise the correction bias of under-loaded experts, lower it for over-loaded ones."""
    for moe, ids in zip(moe_layers(model), expert_ids, strict=True):
        flat = ids.flatten()
        load = torch.zeros(moe.n_experts, device=flat.device).index_add_(
            0, flat, torch.ones(len(flat), device=flat.device)
        )
        moe.gate.e_score_correction_bias += rate * torch.sign(load.mean() - load)


def learning_rate(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio` of the peak at `total`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min((step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: GlmForCausalLM, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; matrices decay, norms and biases do not; the routing correction bias is not trained by gradient."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if name.endswith("e_score_correction_bias"):
            p.requires_grad_(False)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


class WindowSampler:
    """Random windows of `length` tokens from one stream, drawn from a seeded generator (the stream stays on the
    training device)."""

    def __init__(self, tokens: np.ndarray, length: int, device: torch.device, seed: int):
        if len(tokens) <= length:
            raise ValueError(f"the token stream ({len(tokens)}) is shorter than a window ({length})")
        self.tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int32)).to(device)
        self.offsets = torch.arange(length, device=device)
        self.generator = torch.Generator(device).manual_seed(seed)
        self.length = length

    def sample(self, batch: int) -> torch.Tensor:
        high = len(self.tokens) - self.length + 1
        starts = torch.randint(0, high, (batch,), generator=self.generator, device=self.tokens.device)
        return self.tokens[starts[:, None] + self.offsets].long()


def evenly_spaced_windows(tokens: np.ndarray, length: int, count: int) -> torch.Tensor:
    """`count` non-overlapping windows of `length` tokens spread over the whole stream (a fixed evaluation set)."""
    total = len(tokens) // length
    if total == 0:
        raise ValueError(f"the token stream ({len(tokens)}) is shorter than a window ({length})")
    picks = np.linspace(0, total - 1, min(count, total)).round().astype(np.int64)
    return torch.from_numpy(np.stack([np.asarray(tokens[i * length : (i + 1) * length]) for i in picks])).long()


@torch.no_grad()
def heldout_losses(
    model: GlmForCausalLM, windows: torch.Tensor, sparse: bool, autocast: bool, batch: int = 32
) -> dict[str, float]:
    """Mean CE and MTP CE over evaluation windows [N, T + 2]."""
    device = next(model.parameters()).device
    totals = {"ce": 0.0, "mtp": 0.0}
    for chunk in windows.split(batch):
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            losses = model_losses(model, chunk.to(device), sparse)
        totals["ce"] += losses.ce.item() * len(chunk)
        totals["mtp"] += losses.mtp.item() * len(chunk)
    return {name: value / len(windows) for name, value in totals.items()}


class Trainer:
    """One training run: model, optimizer, data and the phase schedule."""

    def __init__(
        self,
        config: GlmConfig,
        cfg: TrainConfig,
        train_tokens: np.ndarray,
        heldout_tokens: np.ndarray,
        device: torch.device,
    ):
        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.seed)
        self.model = GlmForCausalLM(config)
        random_init_(self.model, cfg.seed)
        self.model.to(device).train()
        self.optimizer = make_optimizer(self.model, cfg, device)
        self.sampler = WindowSampler(train_tokens, cfg.seq_len + 2, device, cfg.seed)
        self.eval_windows = evenly_spaced_windows(heldout_tokens, cfg.seq_len + 2, cfg.eval_windows)
        self.final_windows = evenly_spaced_windows(heldout_tokens, cfg.seq_len + 2, cfg.final_eval_windows)
        self.autocast = cfg.autocast and device.type == "cuda"
        self.total_steps = cfg.steps
        self.history: list[dict] = []

    def dense_steps(self, total: int) -> int:
        return round(self.cfg.dense_fraction * total)

    def _losses(self, windows: torch.Tensor, sparse: bool) -> Losses:
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            return model_losses(self.model, windows, sparse)

    def step(self, step: int, sparse: bool) -> dict[str, torch.Tensor]:
        """One optimizer step; the losses come back as device tensors (reading them would wait for the device)."""
        windows = self.sampler.sample(self.cfg.batch_size)
        lr = learning_rate(step, self.total_steps, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses = self._losses(windows, sparse)
        self.optimizer.zero_grad(set_to_none=True)
        losses.total(self.cfg).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        if self.cfg.bias_update_rate:
            update_expert_bias(self.model, losses.expert_ids, self.cfg.bias_update_rate)
        return {"ce": losses.ce.detach(), "mtp": losses.mtp.detach(), "kl": losses.kl.detach(), "grad_norm": grad_norm}

    def time_step(self, sparse: bool, repeats: int = 3) -> float:
        """Seconds per training step, from forward+backward passes on a fixed batch that change no state."""
        starts = torch.arange(self.cfg.batch_size, device=self.device)[:, None] * self.sampler.length
        windows = self.sampler.tokens[(starts + self.sampler.offsets) % len(self.sampler.tokens)].long()
        times = []
        for _ in range(repeats + 1):
            _sync(self.device)
            begin = time.perf_counter()
            self._losses(windows, sparse).total(self.cfg).backward()
            _sync(self.device)
            times.append(time.perf_counter() - begin)
        self.optimizer.zero_grad(set_to_none=True)
        return float(np.median(times[1:]))

    def plan_steps(self, seconds: float) -> int:
        """The step count that fits `seconds`, from timed dense and sparse steps (a margin for the optimizer)."""
        dense, sparse = self.time_step(False), self.time_step(True)
        per_step = 1.1 * (self.cfg.dense_fraction * dense + (1 - self.cfg.dense_fraction) * sparse)
        steps = max(int(seconds / per_step), self.cfg.warmup_steps + 1)
        log.info(
            "dense step %.1f ms, sparse step %.1f ms: %d steps fit %.0f s", 1e3 * dense, 1e3 * sparse, steps, seconds
        )
        return steps

    def _history(self, records: list[dict[str, torch.Tensor]], switch: int) -> list[dict]:
        """Per-step records as plain numbers, read from the device once at the end."""
        values = {name: torch.stack([r[name] for r in records]).tolist() for name in records[0]}
        tokens_per_step = self.cfg.batch_size * self.cfg.seq_len
        return [
            {
                "step": i,
                "tokens": (i + 1) * tokens_per_step,
                "lr": learning_rate(i, self.total_steps, self.cfg),
                "phase": "sparse" if i >= switch else "dense",
                **{name: v[i] for name, v in values.items()},
            }
            for i in range(len(records))
        ]

    def evaluate(self, step: int, sparse: bool) -> dict:
        self.model.eval()
        result = heldout_losses(self.model, self.eval_windows, sparse, self.autocast)
        self.model.train()
        return {
            "step": step,
            "tokens": (step + 1) * self.cfg.batch_size * self.cfg.seq_len,
            "phase": "sparse" if sparse else "dense",
            "heldout_ce": result["ce"],
            "heldout_mtp": result["mtp"],
        }

    def run(self, out: Path, deadline: float) -> dict:
        """Train until the planned step count (or the deadline), checkpointing into `out` at each evaluation."""
        cfg = self.cfg
        if self.total_steps is None:
            self.total_steps = self.plan_steps(deadline - time.monotonic())
        total, switch = self.total_steps, self.dense_steps(self.total_steps)
        log.info(
            "training %d steps (%d dense, %d sparse), %d tokens each",
            total,
            switch,
            total - switch,
            cfg.batch_size * cfg.seq_len,
        )
        records: list[dict[str, torch.Tensor]] = []
        eval_log = []
        started = time.monotonic()
        bar = tqdm(range(total), desc="training", unit="step", mininterval=5.0)
        for step in bar:
            sparse = step >= switch
            records.append(self.step(step, sparse))
            if (step + 1) % cfg.eval_every == 0 or step + 1 == total or step + 1 == switch:
                eval_log.append(self.evaluate(step, sparse))
                last = {name: value.item() for name, value in records[-1].items()}
                bar.set_postfix(
                    phase="sparse" if sparse else "dense",
                    ce=f"{last['ce']:.3f}",
                    heldout=f"{eval_log[-1]['heldout_ce']:.3f}",
                    kl=f"{last['kl']:.3f}",
                )
                save_weights(self.model, out, dtype=torch.bfloat16)
            if time.monotonic() > deadline:
                log.warning("stopping at step %d of %d: the time budget is spent", step + 1, total)
                break
        bar.close()
        seconds = time.monotonic() - started
        steps_done = len(records)
        train_log = self._history(records, switch)
        self.model.eval()
        final = {
            mode: heldout_losses(self.model, self.final_windows, mode == "sparse", self.autocast)
            for mode in ("dense", "sparse")
        }
        save_weights(self.model, out, dtype=torch.bfloat16)
        return {
            "config": cfg.model_dump(),
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "planned_steps": total,
            "steps": steps_done,
            "dense_steps": min(switch, steps_done),
            "tokens_seen": steps_done * cfg.batch_size * cfg.seq_len,
            "train_seconds": seconds,
            "tokens_per_second": steps_done * cfg.batch_size * cfg.seq_len / seconds,
            "final_heldout": final,
            "expert_bias": [m.gate.e_score_correction_bias.tolist() for m in moe_layers(self.model)],
            "train": train_log,
            "eval": eval_log,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plot_curve(result: dict, path: Path) -> None:
    """Training and held-out losses against tokens seen, with the dense-to-sparse switch; indexer KL below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = result["train"], result["eval"]
    tokens = np.array([r["tokens"] for r in train]) / 1e6
    window = max(len(train) // 200, 1)

    def smooth(values: list[float]) -> np.ndarray:
        return np.convolve(values, np.ones(window) / window, mode="valid")

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=(2, 1))
    top.plot(tokens[window - 1 :], smooth([r["ce"] for r in train]), label="train next-token CE")
    top.plot(tokens[window - 1 :], smooth([r["mtp"] for r in train]), label="train MTP CE (token t+2)")
    top.plot([e["tokens"] / 1e6 for e in evals], [e["heldout_ce"] for e in evals], "o-", label="held-out CE")
    bottom.plot(tokens[window - 1 :], smooth([r["kl"] for r in train]), color="tab:red", label="indexer KL (sum)")
    if 0 < result["dense_steps"] < len(train):
        for ax in (top, bottom):
            ax.axvline(tokens[result["dense_steps"]], color="gray", linestyle="--", label="dense -> sparse")
    top.set_ylabel("loss (nats)")
    top.set_ylim(top=min(top.get_ylim()[1], 8))
    bottom.set_ylabel("KL (nats)")
    bottom.set_xlabel("tokens seen (millions)")
    top.set_title(f"glm5-tiny: {result['steps']} steps, {result['tokens_seen'] / 1e6:.0f}M tokens")
    top.legend()
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(
    data: Path,
    out: Path,
    cfg: TrainConfig,
    device: torch.device,
    checkpoint: Path = PACKAGED,
    started: float | None = None,
) -> dict:
    """Train the architecture of `checkpoint` from the token arrays in `data`; `out` becomes a checkpoint directory
    (its config, tokenizer and chat template, the trained model.safetensors) with train_log.json and
    loss_curve.png. `started` (time.monotonic()) is when the run's time budget began."""
    started = time.monotonic() if started is None else started
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != checkpoint.resolve():  # make `out` a whole checkpoint: config, tokenizer, chat template
        for name in CHECKPOINT_FILES:
            if (checkpoint / name).is_file():
                shutil.copyfile(checkpoint / name, out / name)
    info = load_info(data)
    log.info(
        "corpus: %d train tokens (%d files), %d held-out tokens (%d files)",
        info.train_tokens,
        info.train_files,
        info.heldout_tokens,
        info.heldout_files,
    )
    config = GlmConfig.from_pretrained(checkpoint)
    trainer = Trainer(config, cfg, load_tokens(data, "train"), load_tokens(data, "heldout"), device)
    result = trainer.run(out, deadline=started + 60 * cfg.minutes - cfg.reserve_seconds)
    result["corpus"] = info.model_dump()
    (out / LOG_FILE).write_text(json.dumps(result) + "\n")
    plot_curve(result, out / CURVE_FILE)
    final = result["final_heldout"]
    log.info(
        "done: %d steps, %.0fM tokens, %.0f tokens/s; held-out CE dense %.4f (ppl %.2f), sparse %.4f (ppl %.2f)",
        result["steps"],
        result["tokens_seen"] / 1e6,
        result["tokens_per_second"],
        final["dense"]["ce"],
        math.exp(final["dense"]["ce"]),
        final["sparse"]["ce"],
        math.exp(final["sparse"]["ce"]),
    )
    log.info("to repeat this run: --seed %d --steps %d", cfg.seed, result["planned_steps"])
    return result


def main(argv: Sequence[str] | None = None) -> None:
    started = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="directory written by glmserve.train.code_corpus")
    parser.add_argument("--out", type=Path, required=True, help="directory for model.safetensors and the logs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget of the whole run")
    parser.add_argument("--steps", type=int, default=None, help="fixed step count (default: fit --minutes)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {"batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps}
    cfg = TrainConfig(seed=args.seed, minutes=args.minutes, **{k: v for k, v in overrides.items() if v is not None})
    torch.backends.cuda.matmul.allow_tf32 = True
    train(args.data, args.out, cfg, torch.device(args.device), started=started)


if __name__ == "__main__":
    main()
