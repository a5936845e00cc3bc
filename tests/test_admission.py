"""Admission control and API-key quotas on a fake clock: what each limit refuses, what Retry-After says, and that
every way a request can end gives its place back."""

import pytest

from glmserve.api.errors import RateLimitError
from glmserve.api.quota import ApiKey, Quotas
from glmserve.engine.admission import Admission, AdmissionLimits, Overloaded


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def measured(clock: Clock, limits: AdmissionLimits, tokens_per_s: float) -> Admission:
    """An Admission whose rate estimate has seen `tokens_per_s` (one prompt of that many tokens, cleared in 1 s)."""
    admission = Admission(limits, clock)
    ticket = admission.reserve()
    ticket.admit_prompt(int(tokens_per_s))
    clock.now += 1.0
    ticket.first_token()
    ticket.release()
    assert admission.rate.tokens_per_s == pytest.approx(tokens_per_s)
    return admission


def test_no_limits_admit_everything_and_count_it():
    admission = Admission()
    tickets = [admission.reserve(num_seqs=2) for _ in range(50)]
    for t in tickets:
        t.admit_prompt(1000)
    assert admission.stats()["num_requests_admitted"] == 100
    assert admission.stats()["queued_prompt_tokens"] == 50_000
    assert admission.stats()["prefill_tokens_per_s"] == 0.0  # nothing cleared yet: no estimate
    for t in tickets:
        t.release()
    assert admission.in_flight == 0 and admission.queued_tokens == 0


def test_max_num_queued_reqs_counts_sequences_in_flight():
    admission = Admission(AdmissionLimits(max_num_queued_reqs=4))
    a = admission.reserve(num_seqs=3)
    with pytest.raises(Overloaded) as e:
        admission.reserve(num_seqs=2)  # n=2 needs two places
    assert e.value.reason == "queued_requests" and "max_num_queued_reqs=4" in str(e.value)
    b = admission.reserve(num_seqs=1)
    with pytest.raises(Overloaded):
        admission.reserve()
    a.first_token()  # running still counts
    with pytest.raises(Overloaded):
        admission.reserve()
    a.release()
    a.release()  # idempotent: every exit path may call it
    assert admission.in_flight == 1
    admission.reserve(num_seqs=3)
    b.release()


def test_max_num_queued_tokens_counts_prompts_before_their_first_token():
    clock = Clock()
    admission = measured(clock, AdmissionLimits(max_num_queued_tokens=1000), tokens_per_s=500)
    a = admission.reserve()
    a.admit_prompt(800)
    b = admission.reserve()
    with pytest.raises(Overloaded) as e:
        b.admit_prompt(300)
    assert e.value.reason == "queued_tokens"
    assert e.value.retry_after == pytest.approx(1.0)  # 100 tokens over, at 500/s: the 1 s floor
    assert admission.in_flight == 1  # the refused request gave its place back
    c = admission.reserve()
    c.admit_prompt(200)  # exactly at the limit
    a.first_token()  # 800 tokens leave the backlog; a is still in flight
    d = admission.reserve()
    d.admit_prompt(800)
    assert admission.queued_tokens == 1000 and admission.in_flight == 3


def test_a_request_that_ends_before_its_first_token_clears_nothing():
    clock = Clock()
    admission = measured(clock, AdmissionLimits(), tokens_per_s=1000)
    t = admission.reserve()
    t.admit_prompt(5000)
    clock.now += 10
    t.release()  # aborted (client gone, error) during its prefill
    assert admission.queued_tokens == 0
    assert admission.rate.tokens_per_s < 1000 / 2  # ten busy seconds that cleared nothing pull the estimate down


def test_predicted_ttft_counts_the_queue_ahead():
    clock = Clock()
    admission = measured(clock, AdmissionLimits(max_predicted_ttft_s=2.0), tokens_per_s=1000)
    first = admission.reserve()
    first.admit_prompt(1500)  # alone: 1.5 s
    assert admission.predicted_ttft_s(400) == pytest.approx(1.9)
    second = admission.reserve()
    second.admit_prompt(400)
    third = admission.reserve()
    with pytest.raises(Overloaded) as e:
        third.admit_prompt(400)  # 2300 tokens ahead of and in it: 2.3 s > 2 s
    assert e.value.reason == "predicted_ttft" and "2.3 s" in str(e.value)
    assert admission.in_flight == 2
    clock.now += 1.5
    first.first_token()
    again = admission.reserve()
    again.admit_prompt(400)


def test_retry_after_follows_the_backlog_and_is_bounded():
    clock = Clock()
    admission = measured(clock, AdmissionLimits(max_num_queued_tokens=10_000), tokens_per_s=100)
    big = admission.reserve()
    big.admit_prompt(10_000)
    t = admission.reserve()
    with pytest.raises(Overloaded) as e:
        t.admit_prompt(500)  # 500 over, at 100 tokens/s
    assert e.value.retry_after == pytest.approx(5.0)
    with pytest.raises(Overloaded) as e:
        admission.reserve().admit_prompt(9000)
    assert e.value.retry_after == 60.0


def test_draining_refuses_new_requests_only():
    admission = Admission()
    held = admission.reserve()
    admission.draining = True
    with pytest.raises(Overloaded) as e:
        admission.reserve()
    assert e.value.reason == "draining"
    held.release()
    assert admission.in_flight == 0


def test_rate_estimate_forgets_old_load():
    clock = Clock()
    admission = measured(clock, AdmissionLimits(), tokens_per_s=1000)
    clock.now += 300  # idle for five minutes: idle time is not busy time, the estimate stays...
    assert admission.stats()["prefill_tokens_per_s"] == pytest.approx(1000)
    t = admission.reserve()
    t.admit_prompt(100)
    clock.now += 1.0
    t.first_token()
    t.release()
    # ...but its weight has decayed, so the first new busy second (ten times slower) decides the estimate
    assert admission.rate.tokens_per_s == pytest.approx(100, rel=0.01)


def test_rate_estimate_follows_a_slowdown_under_steady_load():
    clock = Clock()
    admission = measured(clock, AdmissionLimits(), tokens_per_s=1000)
    for _ in range(60):  # two memory periods of back-to-back prompts at a tenth of the old rate
        t = admission.reserve()
        t.admit_prompt(100)
        clock.now += 1.0
        t.first_token()
        t.release()
    assert admission.rate.tokens_per_s == pytest.approx(100, rel=0.2)
    assert admission.rate.tokens_per_s > 100  # the old, faster second still weighs a little


def key(name: str, **quota) -> ApiKey:
    return ApiKey(name=name, key=f"sk-{name}-0123456789", **quota)


def test_requests_per_minute_is_a_bucket_per_key():
    clock = Clock()
    quotas = Quotas([key("alice", requests_per_minute=2), key("bob")], clock)
    quotas.admit("alice", 10)
    quotas.admit("alice", 10)
    with pytest.raises(RateLimitError) as e:
        quotas.admit("alice", 10)
    assert e.value.code == "requests_per_minute_exceeded" and "alice" in str(e.value)
    assert e.value.headers["Retry-After"] == "30"  # one request refills in 60/2 s
    for _ in range(100):
        quotas.admit("bob", 10)  # no quota
        quotas.admit(None, 10)  # no key (an unguarded server)
    clock.now += 30
    quotas.admit("alice", 10)


def test_tokens_per_minute_charges_the_completion_when_it_ends():
    clock = Clock()
    quotas = Quotas([key("alice", tokens_per_minute=1000)], clock)
    quotas.admit("alice", 400)
    quotas.used("alice", 1100)  # the completion took the bucket below zero
    with pytest.raises(RateLimitError) as e:
        quotas.admit("alice", 1)
    assert e.value.code == "tokens_per_minute_exceeded"
    assert e.value.retry_after == pytest.approx((1 + 500) * 60 / 1000)
    clock.now += 90  # from -500 back to a full 1000
    quotas.admit("alice", 1000)  # a full bucket admits anything up to its size
    clock.now += 60
    quotas.admit("alice", 50_000)  # larger than the whole allowance: it runs when the bucket is full, not never
    with pytest.raises(RateLimitError):
        quotas.admit("alice", 1)


def test_a_refused_request_is_not_charged():
    clock = Clock()
    quotas = Quotas([key("alice", requests_per_minute=10, tokens_per_minute=100)], clock)
    quotas.admit("alice", 90)
    for _ in range(20):
        with pytest.raises(RateLimitError):
            quotas.admit("alice", 50)  # the token bucket refuses; the request bucket must not pay for it
    quotas.admit("alice", 10)  # 9 requests left of 10, and exactly 10 tokens


def test_the_allowance_is_shared_by_the_decode_replicas():
    clock = Clock()
    quotas = Quotas([key("alice", requests_per_minute=60)], clock)
    quotas.set_replicas(3)
    for _ in range(20):
        quotas.admit("alice", 1)
    with pytest.raises(RateLimitError) as e:
        quotas.admit("alice", 1)
    assert e.value.retry_after == pytest.approx(3.0)  # this replica refills at 20 a minute
