"""Why a transfer failed. The decode worker catches `TransferFailed`, frees the blocks and recomputes or fails."""

from enum import Enum

from . import kv_transfer_pb2 as pb


class FailureKind(Enum):
    LEASE_EXPIRED = "lease_expired"
    ABORTED = "aborted"
    PEER_LOST = "peer_lost"
    UNKNOWN_TRANSFER = "unknown_transfer"
    INVALID = "invalid"
    CLOSED = "closed"  # the receiver shut down

    def to_proto(self) -> int:
        return pb.FailureKind.Value(self.name)

    @classmethod
    def from_proto(cls, value: int) -> "FailureKind":
        return cls[pb.FailureKind.Name(value)]


class TransferFailed(RuntimeError):
    kind: FailureKind = FailureKind.INVALID

    def __init__(self, reason: str, kind: FailureKind | None = None):
        super().__init__(reason)
        self.reason = reason
        if kind is not None:
            self.kind = kind


class LeaseExpired(TransferFailed):
    kind = FailureKind.LEASE_EXPIRED


class TransferAborted(TransferFailed):
    kind = FailureKind.ABORTED


class PeerLost(TransferFailed):
    kind = FailureKind.PEER_LOST


_BY_KIND = {cls.kind: cls for cls in (LeaseExpired, TransferAborted, PeerLost)}


def transfer_failed(kind: FailureKind, reason: str) -> TransferFailed:
    """The most specific exception for a failure kind."""
    cls = _BY_KIND.get(kind)
    return cls(reason) if cls else TransferFailed(reason, kind)


def status_ok() -> pb.TransferStatus:
    return pb.TransferStatus(failure=pb.NONE)


def status_of(error: TransferFailed) -> pb.TransferStatus:
    return pb.TransferStatus(failure=error.kind.to_proto(), reason=error.reason)


def raise_for_status(status: pb.TransferStatus) -> None:
    if status.failure != pb.NONE:
        raise transfer_failed(FailureKind.from_proto(status.failure), status.reason)
