"""KV transfer service, sender and receiver in one process over loopback tcp (spawned peers: test_kvtransfer_processes).

Every check compares the pools against a reference built token by token in Python from the block-table rule
(token t -> block dst[t // block_size], slot t % block_size), independent of the service's index arithmetic.
"""

import asyncio
import time

import pytest
import torch

from glmserve.kvtransfer import (
    Completion,
    FailureKind,
    KVLayout,
    KVReceiver,
    KVSender,
    LeaseExpired,
    TransferAborted,
    TransferFailed,
    new_capability,
)
from glmserve.kvtransfer.paged_rows import read_rows, write_rows

pytestmark = pytest.mark.timeout(60)

LAYOUT = KVLayout(num_layers=4, block_size=4, latent_dim=8, index_dim=3, index_layers=(0, 2), dtype=torch.bfloat16)
NUM_BLOCKS = 12
SENTINEL = -7.0  # what "someone else's data" looks like; must survive anything not addressed to it
CAP = new_capability()  # the capability of every test transfer (the decode worker draws one per transfer)
WAIT_S = 10.0


def make_pools(layout: KVLayout = LAYOUT, num_blocks: int = NUM_BLOCKS, fill: float | None = SENTINEL):
    def pool(dim: int) -> torch.Tensor:
        shape = (num_blocks, layout.block_size, dim)
        if fill is None:
            return torch.randn(shape).to(layout.dtype)
        return torch.full(shape, fill, dtype=layout.dtype)

    return [pool(layout.latent_dim) for _ in range(layout.num_layers)], {
        i: pool(layout.index_dim) for i in layout.index_layers
    }


def random_rows(num_tokens: int, seed: int = 0, layout: KVLayout = LAYOUT):
    g = torch.Generator().manual_seed(seed)
    latent = {
        layer: torch.randn(num_tokens, layout.latent_dim, generator=g).to(layout.dtype)
        for layer in range(layout.num_layers)
    }
    index = {
        layer: torch.randn(num_tokens, layout.index_dim, generator=g).to(layout.dtype) for layer in layout.index_layers
    }
    return latent, index


def expected_pool(before: torch.Tensor, block_table, start: int, rows: torch.Tensor) -> torch.Tensor:
    """Reference: place rows one token at a time."""
    bs = before.shape[1]
    want = before.clone()
    for i in range(rows.shape[0]):
        t = start + i
        want[block_table[t // bs], t % bs] = rows[i]
    return want


def expected_rows(pool: torch.Tensor, block_table, start: int, count: int) -> torch.Tensor:
    """Reference: read rows one token at a time."""
    bs = pool.shape[1]
    return torch.stack([pool[block_table[t // bs], t % bs] for t in range(start, start + count)])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.fixture
def receiver():
    latent, index_keys = make_pools()
    with KVReceiver(LAYOUT, latent, index_keys, transports=("tcp",)) as recv:
        yield recv


@pytest.fixture
def sender(receiver):
    with KVSender.connect(receiver.address, LAYOUT, chunk_bytes=48) as snd:  # 3 bf16 latent rows per chunk
        yield snd


def snapshot(receiver):
    return [p.clone() for p in receiver.latent], {i: p.clone() for i, p in receiver.index_keys.items()}


@pytest.mark.parametrize("first, count", [(0, 4), (5, 9), (3, 1), (6, 14), (8, 8), (1, 2)])
def test_paged_rows_match_token_by_token_reference(first, count):
    pool = torch.randn(NUM_BLOCKS, 4, 8).to(torch.bfloat16)
    table = torch.randperm(NUM_BLOCKS)
    rows = torch.randn(count, 8).to(torch.bfloat16)
    want = expected_pool(pool, table.tolist(), first, rows)
    write_rows(pool, table, first, rows)
    assert same_bits(pool, want)
    assert same_bits(read_rows(pool, table, first, count), rows)


@pytest.mark.parametrize("source", ["rows", "pools"])
def test_tcp_transfer_is_bit_exact_with_offset_partial_blocks_and_layers_out_of_order(receiver, source):
    start, n = 5, 9  # tokens 5..13: partial first block, one whole block, partial last block
    dst = [9, 3, 0, 7]  # block table of the sequence on the decode side (block 9 is prefix-cached, untouched)
    before = snapshot(receiver)
    future = receiver.register("req-1", dst, num_tokens=n, start_token=start, lease_s=WAIT_S, capability=CAP)
    src_table = None
    if source == "rows":
        latent_rows, index_rows = random_rows(n)
        pools = None
    else:  # the sender reads from its own pools through its own block table
        pools = make_pools(fill=None)
        src_table = [2, 11, 4, 8]
        latent_rows = {i: expected_rows(p, src_table, start, n) for i, p in enumerate(pools[0])}
        index_rows = {i: expected_rows(p, src_table, start, n) for i, p in pools[1].items()}
    sender = KVSender.connect(receiver.address, LAYOUT, pools=pools, chunk_bytes=48)  # 3 latent rows per chunk
    transfer = sender.open_transfer("req-1", CAP, src_block_ids=src_table)
    assert (transfer.start_token, transfer.num_tokens) == (start, n)
    for layer in [3, 0, 2, 1]:
        if source == "rows":
            transfer.send_layer(layer, latent_rows[layer], index_rows.get(layer))
        else:
            transfer.send_layer(layer)
    hidden = torch.randn(16).to(torch.bfloat16)
    transfer.complete(42, -0.25, [(42, -0.25), (7, -1.5)], hidden).result(WAIT_S)

    completion = future.result(WAIT_S)
    assert (completion.first_token, completion.logprob, completion.top_logprobs) == (
        42,
        -0.25,
        [(42, -0.25), (7, -1.5)],
    )
    assert same_bits(completion.hidden, hidden)
    for layer in range(LAYOUT.num_layers):
        assert same_bits(receiver.latent[layer], expected_pool(before[0][layer], dst, start, latent_rows[layer]))
    for layer in LAYOUT.index_layers:
        assert same_bits(receiver.index_keys[layer], expected_pool(before[1][layer], dst, start, index_rows[layer]))
    row_bytes = (4 * LAYOUT.latent_dim + 2 * LAYOUT.index_dim) * 2
    assert receiver.stats.bytes_received == n * row_bytes == sender.stats.bytes_sent
    assert receiver.stats.transfers_completed == 1 and receiver.stats.transfers_failed == 0
    sender.close()


def test_two_transfers_interleave_on_one_session(receiver, sender):
    tables = {"a": [1, 2, 3], "b": [4, 5]}
    futures = {
        tid: receiver.register(tid, table, num_tokens=len(table) * 4 - 1, capability=CAP)
        for tid, table in tables.items()
    }
    transfers = {tid: sender.open_transfer(tid, CAP) for tid in tables}
    rows = {tid: random_rows(t.num_tokens, seed=i) for i, (tid, t) in enumerate(transfers.items())}
    for layer in range(LAYOUT.num_layers):
        for tid, transfer in transfers.items():
            transfer.send_layer(layer, rows[tid][0][layer], rows[tid][1].get(layer))
    for tid, transfer in transfers.items():
        transfer.complete(1, 0.0).result(WAIT_S)
        futures[tid].result(WAIT_S)
    for tid, table in tables.items():
        bs = LAYOUT.block_size
        for layer in range(LAYOUT.num_layers):
            got = receiver.latent[layer][table].reshape(-1, LAYOUT.latent_dim)[: len(table) * bs - 1]
            assert same_bits(got, rows[tid][0][layer])


def test_completion_waits_until_every_layer_landed(receiver, sender):
    future = receiver.register("req", [0, 1], num_tokens=6, lease_s=1.0, capability=CAP)
    transfer = sender.open_transfer("req", CAP)
    latent_rows, index_rows = random_rows(6)
    for layer in range(LAYOUT.num_layers - 1):  # the last layer never comes
        transfer.send_layer(layer, latent_rows[layer], index_rows.get(layer))
    transfer.complete(3, -0.1).result(WAIT_S)
    time.sleep(0.3)
    assert not future.done()
    with pytest.raises(LeaseExpired):  # the sender stopped renewing at complete; the missing layer never landed
        future.result(WAIT_S)


def test_lease_expires_when_no_sender_opens_the_transfer(receiver):
    began = time.monotonic()
    future = receiver.register("orphan", [0], num_tokens=2, lease_s=0.3, capability=CAP)
    with pytest.raises(LeaseExpired, match="open it"):
        future.result(WAIT_S)
    assert time.monotonic() - began < 0.3 + 0.5
    assert receiver.stats.failures_by_kind[FailureKind.LEASE_EXPIRED.value] == 1


def test_renewal_keeps_a_short_lease_alive_while_the_sender_works(receiver, sender):
    future = receiver.register("slow", [0, 1], num_tokens=8, lease_s=0.4, capability=CAP)
    transfer = sender.open_transfer("slow", CAP)
    latent_rows, index_rows = random_rows(8)
    for layer in range(LAYOUT.num_layers):  # 1.2 s of "prefill", three leases long
        time.sleep(0.3)
        transfer.send_layer(layer, latent_rows[layer], index_rows.get(layer))
    transfer.complete(0, 0.0).result(WAIT_S)
    assert future.result(WAIT_S).first_token == 0


def test_a_transfer_idle_for_a_lease_is_left_to_expire(receiver, sender):
    lease_s = 0.4
    future = receiver.register("hung", [0, 1], num_tokens=8, lease_s=lease_s, capability=CAP)
    transfer = sender.open_transfer("hung", CAP)
    for _ in range(12):  # 1.2 s of prefill steps with no layer ready yet: keepalive holds the lease
        time.sleep(0.1)
        transfer.keepalive()
    assert not future.done()
    idle_since = time.monotonic()  # the prefill hangs; its process (and the renewal thread) lives on
    with pytest.raises(LeaseExpired):
        future.result(WAIT_S)
    assert time.monotonic() - idle_since < 2 * lease_s + 1.0  # renewals stop after one idle lease (+ poll slack)
    with pytest.raises(LeaseExpired):
        transfer.complete(0, 0.0).result(WAIT_S)


def test_abort_by_sender_fails_both_ends(receiver, sender):
    before = snapshot(receiver)
    future = receiver.register("req", [2, 3], num_tokens=8, capability=CAP)
    transfer = sender.open_transfer("req", CAP)
    transfer.abort("prefill worker is draining")
    with pytest.raises(TransferAborted, match="draining"):
        future.result(WAIT_S)
    latent_rows, index_rows = random_rows(8)
    with pytest.raises(TransferAborted):
        transfer.send_layer(0, latent_rows[0], index_rows[0])
    with pytest.raises(TransferAborted):
        transfer.complete(0, 0.0).result(WAIT_S)
    assert all(same_bits(a, b) for a, b in zip(receiver.latent, before[0], strict=True))


def test_abort_by_receiver_drops_late_data_into_reused_blocks(receiver, sender):
    future = receiver.register(
        "req", [2, 3], num_tokens=8, lease_s=30.0, capability=CAP
    )  # sender renews every 10 s: it won't know
    transfer = sender.open_transfer("req", CAP)
    assert receiver.abort("req", "client disconnected")
    with pytest.raises(TransferAborted, match="client disconnected"):
        future.result(WAIT_S)
    for pool in receiver.latent:  # the decode worker frees blocks 2 and 3 and another request fills them
        pool[2:4] = 1.5
    reused = snapshot(receiver)
    latent_rows, index_rows = random_rows(8)
    for layer in range(LAYOUT.num_layers):
        transfer.send_layer(layer, latent_rows[layer], index_rows.get(layer))
    with pytest.raises(TransferAborted, match="client disconnected"):
        transfer.complete(0, 0.0).result(WAIT_S)  # completion runs after every queued chunk went out
    assert receiver.stats.chunks_dropped > 0
    assert all(same_bits(a, b) for a, b in zip(receiver.latent, reused[0], strict=True))
    assert all(same_bits(receiver.index_keys[i], reused[1][i]) for i in LAYOUT.index_layers)


def test_receiver_close_fails_pending_transfers():
    latent, index_keys = make_pools()
    receiver = KVReceiver(LAYOUT, latent, index_keys, transports=("tcp",))
    future = receiver.register("req", [0], num_tokens=1, capability=CAP)
    receiver.close()
    with pytest.raises(TransferFailed) as info:
        future.result(WAIT_S)
    assert info.value.kind is FailureKind.CLOSED


def test_usable_from_asyncio(receiver, sender):
    async def decode_side():
        future = receiver.register("req", [5, 6], num_tokens=7, capability=CAP)
        latent_rows, index_rows = random_rows(7)

        def prefill_side():
            transfer = sender.open_transfer("req", CAP)
            for layer in range(LAYOUT.num_layers):
                transfer.send_layer(layer, latent_rows[layer], index_rows.get(layer))
            return transfer.complete(9, -0.5)

        done = await asyncio.to_thread(prefill_side)
        await asyncio.wait_for(asyncio.wrap_future(done), WAIT_S)
        return await asyncio.wait_for(asyncio.wrap_future(future), WAIT_S)

    completion = asyncio.run(decode_side())
    assert isinstance(completion, Completion) and completion.first_token == 9


def test_bad_requests_are_refused(receiver, sender):
    with pytest.raises(ValueError, match="cannot hold"):
        receiver.register("short", [0], num_tokens=5, capability=CAP)
    with pytest.raises(ValueError, match="lie in"):
        receiver.register("oob", [0, NUM_BLOCKS], num_tokens=8, capability=CAP)
    receiver.register("dup", [0], num_tokens=1, capability=CAP)
    with pytest.raises(ValueError, match="already"):
        receiver.register("dup", [0], num_tokens=1, capability=CAP)
    with pytest.raises(TransferFailed) as info:
        sender.open_transfer("never-registered", CAP)
    assert info.value.kind is FailureKind.UNKNOWN_TRANSFER
    transfer = sender.open_transfer("dup", CAP)
    with pytest.raises(ValueError, match="want"):
        transfer.send_layer(
            0, torch.zeros(2, LAYOUT.latent_dim, dtype=LAYOUT.dtype), torch.zeros(1, 3, dtype=LAYOUT.dtype)
        )
    with pytest.raises(ValueError, match="index_rows"):
        transfer.send_layer(0, torch.zeros(1, LAYOUT.latent_dim, dtype=LAYOUT.dtype))


def test_handshake_refuses_a_different_layout(receiver):
    other = KVLayout(LAYOUT.num_layers, LAYOUT.block_size, 16, LAYOUT.index_dim, LAYOUT.index_layers, LAYOUT.dtype)
    with pytest.raises(ConnectionError, match="latent_dim"):
        KVSender.connect(receiver.address, other)
    with pytest.raises(ConnectionError, match="not offered"):
        KVSender.connect(receiver.address, LAYOUT, transport="nccl")
