"""How many tokens to draft: the K that maximizes expected tokens per second at the current batch size.

With per-position acceptance rates a_1..a_K (a_i: the chance draft i is accepted given the ones before it were), a
step that verifies K drafts emits E(K) = 1 + a_1 + a_1 a_2 + ... tokens and costs t(B, K), the measured time of
such a step at batch size B. Speculation pays while E(K) / t(B, K) beats E(0) / t(B, 0) = 1 / t(B, 0); at large
batches the forward is compute-bound, t grows with K, and K falls to 0. Each (B, K) cell is tried first, and a
value not chosen for REMEASURE_EVERY steps at that batch size is tried once more, so the choice follows the load.
Trials are rare and scheduled rather than random: every switch of K changes the shape of the next steps, and with
whole-step CUDA graphs a new shape costs a capture. For the same reason the engine then offers only 0 and K.
"""

import statistics
from collections import defaultdict, deque


class SpeculationPolicy:
    EMA = 0.1  # acceptance rates
    WINDOW = 16  # recent step times kept per (batch bucket, K): their median is the estimate
    REMEASURE_EVERY = 128  # steps at a batch size after which a value not chosen there is tried again

    def __init__(self, max_k: int, choices: tuple[int, ...] | None = None):
        self.max_k = max_k
        self.choices = list(choices if choices is not None else range(max_k + 1))
        self.accept = [0.7] * max_k  # prior until measured
        # A median, not a running mean: one slow step (a page fault, a collection) must not lock a K out, since a K
        # that looks slow is rarely tried again.
        self.samples: dict[tuple[int, int], deque[float]] = defaultdict(lambda: deque(maxlen=self.WINDOW))
        self.drafted = [0] * max_k
        self.accepted = [0] * max_k
        self.steps: dict[int, int] = defaultdict(int)  # choices made per batch bucket
        self.last_chosen: dict[tuple[int, int], int] = {}  # (bucket, K) -> step of the bucket it was last chosen

    @property
    def step_time(self) -> dict[tuple[int, int], float]:
        """Estimated seconds per step by (batch bucket, K)."""
        return {key: statistics.median(times) for key, times in self.samples.items()}

    @staticmethod
    def bucket(batch_size: int) -> int:
        return 1 << max(0, (batch_size - 1).bit_length())

    def expected_tokens(self, k: int) -> float:
        total, p = 1.0, 1.0
        for i in range(k):
            p *= self.accept[i]
            total += p
        return total

    def choose(self, batch_size: int) -> int:
        if self.max_k == 0:
            return 0
        b = self.bucket(batch_size)
        self.steps[b] += 1
        unmeasured = [k for k in self.choices if (b, k) not in self.samples]
        stale = [k for k in self.choices if self.steps[b] - self.last_chosen.get((b, k), 0) > self.REMEASURE_EVERY]
        if unmeasured or stale:
            k = (unmeasured or stale)[0]
        else:
            times = {k: statistics.median(self.samples[(b, k)]) for k in self.choices}
            k = max(times, key=lambda k: self.expected_tokens(k) / times[k])
        self.last_chosen[(b, k)] = self.steps[b]
        return k

    def record_step(self, batch_size: int, k: int, seconds: float) -> None:
        self.samples[(self.bucket(batch_size), k)].append(seconds)

    def record_verification(self, num_drafts: int, num_accepted: int) -> None:
        for i in range(num_drafts):
            self.drafted[i] += 1
            hit = i < num_accepted
            self.accepted[i] += hit
            self.accept[i] = (1 - self.EMA) * self.accept[i] + self.EMA * hit
            if not hit:
                break  # later drafts were not judged
