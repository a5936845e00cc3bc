"""Moving one request's KV cache from a prefill worker into a decode worker's blocks.

A gRPC control plane (handshake, open, lease renewal, completion, abort) and data-plane transports: `tcp`
everywhere, `cuda_ipc` on one host, `nccl` between GPUs (gloo on CPU). The decode worker runs a `KVReceiver` and
registers transfers, each with a capability (`new_capability()`); a prefill worker sends through a `KVSender`. Both
need the cluster secret (`ClusterSecret`, `auth`); the receiver's resources are bounded by `ReceiverLimits`.
"""

from .auth import ClusterSecret, new_capability, resolve_secret
from .completion import Completion
from .errors import FailureKind, LeaseExpired, PeerLost, TransferAborted, TransferFailed
from .layout import KVLayout
from .limits import CompletionCheck, ReceiverLimits
from .receiver import KVReceiver
from .sender import KVSender, MirroredTransfer, OutgoingTransfer, open_mirrored
from .stats import ReceiverStats, SenderStats

__all__ = [
    "ClusterSecret",
    "Completion",
    "CompletionCheck",
    "FailureKind",
    "KVLayout",
    "KVReceiver",
    "KVSender",
    "LeaseExpired",
    "MirroredTransfer",
    "OutgoingTransfer",
    "PeerLost",
    "ReceiverLimits",
    "ReceiverStats",
    "SenderStats",
    "TransferAborted",
    "TransferFailed",
    "new_capability",
    "open_mirrored",
    "resolve_secret",
]
