"""Counters the servers export as Prometheus metrics (read without locks: ints and floats, torn reads harmless)."""

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ReceiverStats:
    transfers_registered: int = 0
    transfers_completed: int = 0
    transfers_failed: int = 0
    failures_by_kind: Counter = field(default_factory=Counter)  # FailureKind.value -> count
    bytes_received: int = 0  # rows landed in the pools
    transfer_seconds: float = 0.0  # registration to completion, summed over completed transfers
    data_seconds: float = 0.0  # first chunk arrived to every row in the pools, summed over completed transfers
    chunks_dropped: int = 0  # arrived for a transfer that had failed or was unknown: never written
    connections_refused: int = 0  # data-plane connections closed at once: every connection slot was taken
    hellos_refused: int = 0  # data-plane connections that did not prove the cluster secret (or named no session)


@dataclass
class SenderStats:
    transfers_opened: int = 0
    transfers_completed: int = 0
    transfers_failed: int = 0
    bytes_sent: int = 0
    send_seconds: float = 0.0  # time spent moving chunks
