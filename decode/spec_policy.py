"""How many tokens to draft: the K that maximizes expected tokens per second at the current batch size.

With per-position acceptance rates a_1..a_K (a_i: the chance draft i is accepted given the ones before it were), a
step that verifies K drafts emits E(K) = 1 + a_1 + a_1 a_2 + ... tokens and costs t(B, K), the measured time of
such a step at batch size B. Speculation pays while E(K) / t(B, K) beats E(0) / t(B, 0) = 1 / t(B, 0); at large
batches the forward is compute-bound, t grows with K, and K falls to 0. Unmeasured (B, K) cells are tried now and
then, so the choice follows the load. With whole-step CUDA graphs the engine offers only 0 and K: every other draft
length would be a family of graphs of its own to capture.
"""

import random
from collections import defaultdict


class SpeculationPolicy:
    EMA = 0.1
    EXPLORE = 0.05

    def __init__(self, max_k: int, seed: int = 0, choices: tuple[int, ...] | None = None):
        self.max_k = max_k
        self.choices = list(choices if choices is not None else range(max_k + 1))
        self.accept = [0.7] * max_k  # prior until measured
        self.step_time: dict[tuple[int, int], float] = {}
        self.drafted = [0] * max_k
        self.accepted = [0] * max_k
        self.rng = random.Random(seed)
        self.counts: dict[tuple[int, int], int] = defaultdict(int)

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
        unmeasured = [k for k in self.choices if (b, k) not in self.step_time]
        if unmeasured and (self.rng.random() < 0.5 or len(unmeasured) == len(self.choices)):
            return self.rng.choice(unmeasured)
        if self.rng.random() < self.EXPLORE:
            return self.rng.choice(self.choices)
        measured = [k for k in self.choices if (b, k) in self.step_time]
        return max(measured, key=lambda k: self.expected_tokens(k) / self.step_time[(b, k)])

    def record_step(self, batch_size: int, k: int, seconds: float) -> None:
        key = (self.bucket(batch_size), k)
        old = self.step_time.get(key)
        self.step_time[key] = seconds if old is None else (1 - self.EMA) * old + self.EMA * seconds
        self.counts[key] += 1

    def record_verification(self, num_drafts: int, num_accepted: int) -> None:
        for i in range(num_drafts):
            self.drafted[i] += 1
            hit = i < num_accepted
            self.accepted[i] += hit
            self.accept[i] = (1 - self.EMA) * self.accept[i] + self.EMA * hit
            if not hit:
                break  # later drafts were not judged
