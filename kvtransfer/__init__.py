"""Moving one request's KV cache from a prefill worker into a decode worker's blocks.

A gRPC control plane (handshake, open, lease renewal, completion, abort) and data-plane transports: `tcp`
everywhere, `cuda_ipc` on one host, `nccl` between GPUs (gloo on CPU). The decode worker runs a `KVReceiver` and
registers transfers; a prefill worker sends through a `KVSender`.
"""

from .completion import Completion
from .errors import FailureKind, LeaseExpired, PeerLost, TransferAborted, TransferFailed
from .layout import KVLayout
from .receiver import KVReceiver
from .sender import KVSender, MirroredTransfer, OutgoingTransfer, open_mirrored
from .stats import ReceiverStats, SenderStats

__all__ = [
    "Completion",
    "FailureKind",
    "KVLayout",
    "KVReceiver",
    "KVSender",
    "LeaseExpired",
    "MirroredTransfer",
    "OutgoingTransfer",
    "PeerLost",
    "ReceiverStats",
    "SenderStats",
    "TransferAborted",
    "TransferFailed",
    "open_mirrored",
]
