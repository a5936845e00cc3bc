"""What the prefill worker hands over besides the KV cache: the first sampled token and the last hidden state."""

from dataclasses import dataclass, field

import torch

from . import kv_transfer_pb2 as pb
from .layout import dtype_name, parse_dtype


@dataclass
class Completion:
    first_token: int
    logprob: float
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    hidden: torch.Tensor | None = None  # [hidden] of the last prompt token; the MTP layer drafts from it

    def to_proto(self, transfer_id: str) -> pb.CompleteRequest:
        msg = pb.CompleteRequest(
            transfer_id=transfer_id,
            first_token=self.first_token,
            logprob=self.logprob,
            top_logprobs=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in self.top_logprobs],
        )
        if self.hidden is not None:
            hidden = self.hidden.detach().to("cpu").contiguous()
            msg.hidden_state = hidden.view(torch.uint8).numpy().tobytes()
            msg.hidden_dtype = dtype_name(hidden.dtype)
            msg.hidden_shape.extend(hidden.shape)
        return msg

    @classmethod
    def from_proto(cls, msg: pb.CompleteRequest) -> "Completion":
        hidden = None
        if msg.hidden_dtype:
            raw = torch.frombuffer(bytearray(msg.hidden_state), dtype=torch.uint8)
            hidden = raw.view(parse_dtype(msg.hidden_dtype)).view(tuple(msg.hidden_shape))
        top = [(t.token_id, t.logprob) for t in msg.top_logprobs]
        return cls(msg.first_token, msg.logprob, top, hidden)
