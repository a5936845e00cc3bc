"""The MTP layer on the paged cache: catch-up over positions whose next token is known, then chained drafts.

MTP position j fuses the target's final hidden state h_j with the embedding of token j+1 and predicts token j+2.
Its KV lives in the cache's MTP layer (index num_hidden_layers) at the same slots as the target's. Catch-up writes
the entries for positions the target just computed (rewriting whatever a rejected draft left there: that is the MTP
cache's rollback); drafting then runs the layer on its own output, one position further each step.
"""

from dataclasses import dataclass

import torch

from .model_runner import ModelRunner, SeqChunk, StepInputs


@dataclass
class MTPOutput:
    logits: torch.Tensor  # [rows with num_logits, vocab] fp32: next-next-token predictions
    hidden: torch.Tensor  # the layer's output at those rows (fed back in the next draft step)
    chosen: object  # the attention backend's top-k picks of this pass (IndexShare across draft steps)
    step: StepInputs


class MTPDrafter:
    def __init__(self, runner: ModelRunner):
        if runner.model.mtp is None:
            raise ValueError("speculative decoding needs a checkpoint with an MTP layer (num_nextn_predict_layers 1)")
        self.runner = runner
        self.model = runner.model
        self.layer = runner.config.num_hidden_layers
        self.share_topk = runner.config.index_share_for_mtp_iteration

    @torch.inference_mode()
    def run(self, chunks: list[SeqChunk], hidden: torch.Tensor, reuse: object = None) -> MTPOutput:
        """chunks: per sequence, the NEXT tokens (token j+1 for positions j = start_pos, ...) and its block table;
        hidden: the matching rows of h_j. `reuse`: top-k picks to reuse instead of running the MTP indexer."""
        step = self.runner.prepare(chunks)
        return self.forward(step, step.ids, hidden, reuse)

    def forward(self, step: StepInputs, next_ids: torch.Tensor, hidden: torch.Tensor, reuse: object = None):
        """The layer on prepared step inputs whose rows carry `next_ids` (device ops only: CUDA graphs capture it)."""
        mtp = self.model.mtp
        x = mtp.fuse(self.model.model.embed_tokens(next_ids), hidden.to(self.model.model.embed_tokens.weight.dtype))
        x, chosen = self.runner.run_layer(self.layer, x, step, reuse, reuse_topk=reuse is not None)
        out = x[step.logits_at]
        logits = self.model.lm_head(mtp.shared_head.norm(out)).float()
        return MTPOutput(logits, out, chosen, step)

    def reusable(self, out: MTPOutput, rows: torch.Tensor | None = None) -> object:
        """The picks of query `rows[b]` of each sequence (default: its last), for the next draft step
        (index_share_for_mtp_iteration); None when each draft step picks anew."""
        if not self.share_topk:
            return None
        batch = out.step.batch
        return self.runner.attention.picks_at(out.chosen, batch, batch.last_query if rows is None else rows)
