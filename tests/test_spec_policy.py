"""The speculation policy picks the K with the most expected tokens per second at the batch size, explores K values
it has not measured, and is not locked out of a K by one slow step."""

from glmserve.decode.spec_policy import SpeculationPolicy


def _trained(policy: SpeculationPolicy, batch: int, step_s: dict[int, float], steps: int = 40):
    """Every draft accepted; step times as given."""
    for _ in range(steps):
        policy.record_verification(policy.max_k, policy.max_k)
        for k, t in step_s.items():
            policy.record_step(batch, k, t)


def test_speculates_where_it_pays_and_not_where_it_does_not():
    policy = SpeculationPolicy(3, choices=(0, 3))
    _trained(policy, 1, {0: 1.0, 3: 1.6})  # 4 tokens for 1.6x the time
    _trained(policy, 64, {0: 1.0, 3: 5.0})  # compute-bound: 4 tokens for 5x the time
    picks = {b: [policy.choose(b) for _ in range(200)] for b in (1, 64)}
    assert picks[1].count(3) > 180 and picks[64].count(0) > 180  # the rest is exploration


def test_unmeasured_values_are_tried_first():
    policy = SpeculationPolicy(2)
    assert {policy.choose(8) for _ in range(50)} == {0, 1, 2}
    policy.record_step(8, 0, 1.0)
    assert {policy.choose(8) for _ in range(50)} >= {1, 2}


def test_one_slow_step_does_not_lock_a_value_out():
    policy = SpeculationPolicy(3, choices=(0, 3))
    _trained(policy, 64, {0: 1.0, 3: 1.5}, steps=10)
    policy.record_step(64, 3, 100.0)  # a stall
    assert [policy.choose(64) for _ in range(100)].count(3) > 90
