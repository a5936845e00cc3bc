"""A decode worker fed by prefill workers that lie, break or are impersonated, in process (no Ray) over real tcp
transfers: an out-of-vocabulary first token, corrupted rows, a peer with the cluster secret racing the real prefill
worker to complete the transfer with its own token. Every victim's output equals the offline engine's greedy output,
a bystander's stream runs to its end, and the engine loop stays alive. Also: two requests under one client id both
come out right, and `max_tokens: 1` (or a first token that is a stop token) returns exactly what the colocated path
and the offline engine return."""

import asyncio

import pytest
import torch
from engine_fixtures import generate_tokens

from glmserve import LLM, SamplingParams
from glmserve.decode.server import DecodeWorker
from glmserve.engine.engine_args import EngineArgs
from glmserve.engine.remote import PrefillRequest
from glmserve.engine.request import EngineRequest
from glmserve.kvtransfer import kv_transfer_pb2 as pb
from glmserve.kvtransfer.auth import new_capability, resolve_secret
from glmserve.kvtransfer.control import ControlClient
from glmserve.kvtransfer.sender import KVSender
from glmserve.kvtransfer.tcp_transport import TcpSendChannel
from glmserve.prefill.worker import PrefillWorker

pytestmark = pytest.mark.timeout(300)

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
KV_BUDGET = 256 << 20
THRESHOLD = 100


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 8000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def offline():
    llm = LLM(kv_cache_memory_bytes=KV_BUDGET)

    def run(prompt: list[int], params: SamplingParams = GREEDY):
        return llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0]

    return run


@pytest.fixture(scope="module")
def workers():
    args = EngineArgs(kv_cache_memory_bytes=KV_BUDGET)
    prefill = PrefillWorker(args)
    decode = DecodeWorker(args, prefill=prefill.prefill, local_prefill_threshold=THRESHOLD, lease_s=5.0)
    colocated = DecodeWorker(args)
    yield decode, prefill, colocated
    decode.shutdown()
    prefill.shutdown()
    colocated.shutdown()


def _run(decode: DecodeWorker, jobs: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[int]]:
    async def all_of_them():
        tokens = await asyncio.gather(*(generate_tokens(decode, rid, p, params) for rid, (p, params) in jobs.items()))
        assert await decode.wait_idle()
        return dict(zip(jobs, tokens, strict=True))

    return asyncio.run(all_of_them())


class _Lying:
    """A prefill worker that was asked (it holds the capability) but sends what it likes: zero rows and a completion
    `first_token`, or rows whose bytes are corrupted on the way."""

    def __init__(self, decode: DecodeWorker, first_token: int | None = None, corrupt: bool = False):
        self.layout = decode.engine.transfer_layout()[0]
        self.first_token, self.corrupt = first_token, corrupt
        self.calls = 0

    async def __call__(self, request: PrefillRequest):
        self.calls += 1
        return await asyncio.to_thread(self._send, request)

    def _send(self, request: PrefillRequest) -> None:
        with KVSender.connect(request.receiver_address, self.layout) as sender:
            if self.corrupt:
                sender._data = _CorruptingChannel(sender._sock)
            transfer = sender.open_transfer(request.request_id, request.capability)
            for layer in range(self.layout.num_layers):
                index = torch.zeros(transfer.num_tokens, self.layout.index_dim, dtype=self.layout.dtype)
                latent = torch.randn(transfer.num_tokens, self.layout.latent_dim).to(self.layout.dtype)
                transfer.send_layer(layer, latent, index if layer in self.layout.index_layers else None)
            try:
                transfer.complete(self.first_token or 0, -0.1, [(3, -2.0)]).result(10)
            except Exception:
                pass  # refused: what the decode side does about it is the point


class _CorruptingChannel(TcpSendChannel):
    """The bytes of every chunk change after the sender computed their checksum (a flipped bit on the wire)."""

    def send(self, chunk):
        nbytes, crc = super().send(chunk)
        return nbytes, crc ^ 0x10


def test_a_lying_or_corrupt_prefill_is_recomputed_and_the_bystander_runs_on(workers, offline):
    decode, prefill, _ = workers
    vocab = decode.engine.config.vocab_size
    long = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    liars = [_Lying(decode, first_token=vocab + 5), _Lying(decode, first_token=-3), _Lying(decode, corrupt=True)]
    try:
        for i, liar in enumerate(liars):
            victim = _prompt(300, seed=10 + i)  # a new prompt each time: a recomputed one is in the prefix cache
            bystander = _prompt(40, seed=20 + i)  # prefilled here (below the threshold), decoding meanwhile
            decode.prefill = liar
            failures = decode.receiver.stats.transfers_failed
            got = _run(decode, {"victim": (victim, GREEDY), "bystander": (bystander, long)})
            assert liar.calls == 1
            assert got["victim"] == offline(victim).token_ids  # recomputed here: never decoded from the bad KV
            assert got["bystander"] == offline(bystander, long).token_ids  # all 120 tokens: not cut
            assert decode.receiver.stats.transfers_failed == failures + 1
            decode.async_engine.check_alive()
    finally:
        decode.prefill = prefill.prefill


def test_a_peer_with_the_secret_but_not_the_capability_cannot_complete_first(workers, offline):
    """It knows the transfer's id (it even sees the request) and races the real prefill worker with a completion
    of its own token: refused; the victim's output is the offline one."""
    decode, prefill, _ = workers
    victim = _prompt(260, seed=3)
    attempts = []

    async def raced(request: PrefillRequest):
        def attack():
            control = ControlClient(request.receiver_address, resolve_secret(), timeout_s=10)
            ref = pb.TransferRef(transfer_id=request.request_id, capability=new_capability())
            attempts.append(control.call("Complete", pb.CompleteRequest(transfer=ref, first_token=7)).failure)
            attempts.append(control.call("Abort", pb.AbortRequest(transfer=ref, reason="hijack")).failure)
            renewed = control.call("RenewLease", pb.RenewLeaseRequest(transfers=[ref]))
            attempts.extend(s.failure for s in renewed.statuses)
            control.close()

        await asyncio.to_thread(attack)
        return await prefill.prefill(request)

    decode.prefill = raced
    try:
        completed = decode.receiver.stats.transfers_completed
        got = _run(decode, {"victim": (victim, GREEDY)})
    finally:
        decode.prefill = prefill.prefill
    assert attempts == [pb.UNKNOWN_TRANSFER] * 3
    assert got["victim"] == offline(victim).token_ids
    assert decode.receiver.stats.transfers_completed == completed + 1  # through the real prefill worker


def test_two_requests_under_one_client_id_both_come_out_right(workers, offline):
    decode, _, _ = workers
    prompts = [_prompt(300, seed=4), _prompt(50, seed=5), _prompt(220, seed=6)]
    long = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)

    async def same_id():
        async def one(prompt):
            tokens, ids = [], set()
            request = EngineRequest(request_id="client-7", prompt_token_ids=prompt, params=long)
            async for out in decode.generate(request):
                ids.add(out.request_id)
                finished = out.finished
                for delta in out.deltas:
                    tokens += delta.token_ids
            assert finished and ids == {"client-7"}  # the client's id is echoed; the engine used its own
            return tokens

        got = await asyncio.gather(*(one(p) for p in prompts))
        assert await decode.wait_idle()
        return got

    got = asyncio.run(same_id())
    assert got == [offline(p, long).token_ids for p in prompts]


@pytest.mark.parametrize("case", ["max_tokens_1", "first_token_stops"])
def test_one_token_disaggregated_equals_colocated_equals_offline(workers, offline, case):
    decode, _, colocated = workers
    prompt = _prompt(280, seed=8 if case == "max_tokens_1" else 9)  # not in the prefix cache yet
    if case == "max_tokens_1":
        params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    else:  # the prefill worker's token is a stop token: the request ends there
        first = offline(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)).token_ids[0]
        params = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[first])
    want = offline(prompt, params)

    async def one(worker: DecodeWorker):
        outs = [
            out
            async for out in worker.generate(EngineRequest(request_id="one", prompt_token_ids=prompt, params=params))
        ]
        assert await worker.wait_idle()
        deltas = [d for out in outs for d in out.deltas]
        return [t for d in deltas for t in d.token_ids], deltas[-1].finish_reason, outs[-1].finished

    remote_before = decode.remote_prefills
    disaggregated = asyncio.run(one(decode))
    assert decode.remote_prefills == remote_before + 1  # it did go through the prefill worker
    assert disaggregated == asyncio.run(one(colocated)) == (want.token_ids, want.finish_reason, True)
    assert len(want.token_ids) == 1
