"""The speculation policy picks the K with the most expected tokens per second at the batch size, explores K values
it has not measured, and is not locked out of a K by one slow step."""

from glmserve.engine.spec.policy import SpeculationPolicy


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
    # the other value is tried again once per REMEASURE_EVERY steps
    assert picks[1].count(0) <= 2 and picks[64].count(3) <= 2


def test_each_value_is_measured_first_then_remeasured_now_and_then():
    policy = SpeculationPolicy(2)
    for k in (0, 1, 2):
        assert policy.choose(8) == k  # unmeasured: tried in turn
        policy.record_step(8, k, {0: 1.0, 1: 1.2, 2: 1.3}[k])
    policy.record_verification(2, 2)
    picks = [policy.choose(8) for _ in range(2 * policy.REMEASURE_EVERY)]
    assert picks.count(2) >= len(picks) - 4 and 0 in picks and 1 in picks


def test_one_slow_step_does_not_lock_a_value_out():
    policy = SpeculationPolicy(3, choices=(0, 3))
    _trained(policy, 64, {0: 1.0, 3: 1.5}, steps=10)
    policy.record_step(64, 3, 100.0)  # a stall
    assert [policy.choose(64) for _ in range(100)].count(3) > 95
