"""What the prefill worker hands over besides the KV cache: the first sampled token and the last hidden state."""

import math
from dataclasses import dataclass, field

import torch

from . import kv_transfer_pb2 as pb
from .layout import dtype_name, parse_dtype

HIDDEN_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Completion:
    first_token: int
    logprob: float
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    hidden: torch.Tensor | None = None  # [hidden] of the last prompt token; the MTP layer drafts from it

    def to_proto(self, transfer: pb.TransferRef, session_id: str) -> pb.CompleteRequest:
        msg = pb.CompleteRequest(
            session_id=session_id,
            transfer=transfer,
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
        """Raises ValueError when the hidden state's bytes, dtype and shape do not agree."""
        hidden = None
        if msg.hidden_dtype:
            if msg.hidden_dtype not in HIDDEN_DTYPES or not 1 <= len(msg.hidden_shape) <= 2:
                raise ValueError(f"hidden state {msg.hidden_dtype} {list(msg.hidden_shape)} is not a hidden state")
            dtype = parse_dtype(msg.hidden_dtype)
            shape = tuple(msg.hidden_shape)
            if min(shape) < 0 or math.prod(shape) * dtype.itemsize != len(msg.hidden_state):
                raise ValueError(f"{len(msg.hidden_state)} bytes are not a {msg.hidden_dtype} tensor of {shape}")
            raw = torch.frombuffer(bytearray(msg.hidden_state), dtype=torch.uint8)
            hidden = raw.view(dtype).view(shape)
        elif msg.hidden_state:
            raise ValueError("a hidden state without a dtype")
        top = [(t.token_id, t.logprob) for t in msg.top_logprobs]
        return cls(msg.first_token, msg.logprob, top, hidden)
