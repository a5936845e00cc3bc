"""cuda_ipc's pool to pool copy: the kernel against a token-by-token reference (on the GPU, or on CPU under
TRITON_INTERPRET), the receiver's copy path in one process, and (GPU) the transport between two processes: rows read
from the sender's pools land bit-exact, an abort leaves the destination blocks alone once it returns, the benchmark.

Every check draws fresh random pools (random bits, so any misplaced byte shows) and shuffled block tables.
"""

import pytest
import torch
from test_kvtransfer_processes import (
    SENTINEL,
    WAIT_S,
    SenderProcess,
    assert_landed_exactly,
    make_receiver,
    transfer_to_completion,
    wait_for,
)

from glmserve.bench.kvtransfer import bench_cuda_ipc
from glmserve.kvtransfer import (
    Completion,
    KVLayout,
    KVReceiver,
    KVSender,
    TransferAborted,
    TransferFailed,
)
from glmserve.kvtransfer.frames import FrameHeader
from glmserve.kvtransfer.incoming_transfer import IncomingTransfer
from glmserve.kvtransfer.layout import RowKind
from glmserve.kvtransfer.pool_copy import copy_runs, plan_runs

pytestmark = pytest.mark.timeout(120)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
COUNTS = [1, 63, 64, 65, 127, 129]


def random_pool(num_blocks: int, block_size: int, dim: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Random bits of a 2-byte dtype (any NaN pattern included: bits are what must arrive)."""
    bits = torch.randint(-(2**15), 2**15, (num_blocks, block_size, dim), dtype=torch.int16)
    return bits.view(dtype).to(DEVICE)


def random_bytes_pool(num_blocks: int, block_size: int, row_bytes: int) -> torch.Tensor:
    return torch.randint(0, 256, (num_blocks, block_size, row_bytes), dtype=torch.uint8).to(DEVICE)


def shuffled_table(num_blocks: int, needed: int) -> torch.Tensor:
    return torch.randperm(num_blocks)[:needed]


def reference_copy(src, src_table, dst, dst_table, first: int, count: int) -> torch.Tensor:
    """dst after token t's row moved from src block src_table[t // bs], slot t % bs, one token at a time."""
    sbs, dbs = src.shape[1], dst.shape[1]
    want = dst.cpu().clone()
    src = src.cpu()
    for t in range(first, first + count):
        want[dst_table[t // dbs], t % dbs] = src[src_table[t // sbs], t % sbs]
    return want


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))


def copy_and_check(src: torch.Tensor, dst: torch.Tensor, first: int, count: int) -> None:
    end = first + count
    src_table = shuffled_table(src.shape[0], -(-end // src.shape[1]))
    dst_table = shuffled_table(dst.shape[0], -(-end // dst.shape[1]))
    want = reference_copy(src, src_table, dst, dst_table, first, count)
    src_before = src.clone()
    runs = plan_runs(src_table.to(DEVICE), src.shape[1], dst_table.to(DEVICE), dst.shape[1], first, count)
    copy_runs(src, dst, runs)
    assert same_bits(dst, want)
    assert same_bits(src, src_before)


# -- the kernel -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("first", [0, 5, 64, 100])
@pytest.mark.parametrize("dim", [576, 128])
def test_copy_runs_matches_token_by_token_reference(first, count, dim):
    """bf16 rows of GLM latent (int32 words) and index keys, 64-token blocks, head and tail partial blocks."""
    src = random_pool(6, 64, dim)
    dst = random_pool(7, 64, dim)
    copy_and_check(src, dst, first, count)


@pytest.mark.parametrize("count", [1, 65, 129])
@pytest.mark.parametrize("row_bytes", [3, 6])
def test_copy_runs_moves_rows_no_int32_divides(row_bytes, count):
    """3-byte rows move as bytes, 6-byte rows as int16."""
    copy_and_check(random_bytes_pool(6, 64, row_bytes), random_bytes_pool(5, 64, row_bytes), 37, count)


@pytest.mark.parametrize("src_bs, dst_bs", [(64, 16), (16, 64), (48, 64)])
@pytest.mark.parametrize("first, count", [(0, 129), (37, 65), (63, 1)])
def test_copy_runs_between_different_block_sizes(src_bs, dst_bs, first, count):
    copy_and_check(random_pool(12, src_bs, 8), random_pool(12, dst_bs, 8), first, count)


def test_plan_splits_into_head_whole_blocks_and_tail():
    src_table, dst_table = torch.tensor([3, 0, 2]), torch.tensor([1, 4, 0])
    runs = plan_runs(src_table, 64, dst_table, 64, 5, 129)  # tokens 5..133: 59 + 64 + 6 rows
    assert runs.rows.tolist() == [59, 64, 6] and runs.max_rows == 64
    assert runs.src_row.tolist() == [3 * 64 + 5, 0, 2 * 64]
    assert runs.dst_row.tolist() == [64 + 5, 4 * 64, 0]


# -- the receiver's copy path, in one process -------------------------------------------------------------------------

LAYOUT = KVLayout(num_layers=3, block_size=8, latent_dim=16, index_dim=4, index_layers=(1,), dtype=torch.bfloat16)


def pools(layout: KVLayout, num_blocks: int, block_size: int):
    latent = [random_pool(num_blocks, block_size, layout.latent_dim, layout.dtype) for _ in range(layout.num_layers)]
    return latent, {i: random_pool(num_blocks, block_size, layout.index_dim, layout.dtype) for i in layout.index_layers}


def incoming(num_blocks: int, dst_table, start: int, num_tokens: int) -> IncomingTransfer:
    latent, index = pools(LAYOUT, num_blocks, LAYOUT.block_size)
    copy_stream = torch.cuda.Stream() if CUDA else None
    table = torch.tensor(dst_table, device=DEVICE)
    return IncomingTransfer("t", 1, LAYOUT, latent, index, table, start, num_tokens, 10.0, CAP, copy_stream)


def test_incoming_transfer_copies_from_the_senders_pools():
    """Sender blocks of 4 tokens, receiver blocks of 8; layers out of order, one split in two chunks."""
    start, n, dst_table, src_table = 3, 30, [5, 0, 9, 2, 7], [6, 11, 0, 9, 3, 8, 1, 10, 4]
    transfer = incoming(10, dst_table, start, n)
    before = {where: pool.clone() for where, pool in transfer.pools.items()}
    src_latent, src_index = pools(LAYOUT, 12, 4)
    src = dict(zip(transfer.pools, [*src_latent, *src_index.values()], strict=True))
    assert transfer.set_source(torch.tensor(src_table), block_size=4)
    chunks = [(2, RowKind.LATENT, 0, 13), (1, RowKind.INDEX, 0, n), (2, RowKind.LATENT, 13, n - 13)]
    chunks += [(0, RowKind.LATENT, 0, n), (1, RowKind.LATENT, 0, n)]
    for layer, kind, offset, count in chunks:
        assert transfer.copy_from(FrameHeader(1, layer, kind, offset, count), src[(layer, kind)]) is False
    assert transfer.rows_landed_at is not None
    assert transfer.complete(Completion(0, 0.0)) is True
    for where, pool in transfer.pools.items():
        assert same_bits(pool, reference_copy(src[where], src_table, before[where], dst_table, start, n))


def test_incoming_transfer_refuses_a_short_table_and_drops_copies_after_failure():
    transfer = incoming(10, [1, 2, 3], 0, 20)
    with pytest.raises(TransferFailed, match="cannot hold"):
        transfer.set_source(torch.tensor([0, 1]), block_size=8)
    src_pool = random_pool(4, 8, LAYOUT.latent_dim, LAYOUT.dtype)
    with pytest.raises(TransferFailed, match="before the sender's block table"):
        transfer.copy_from(FrameHeader(1, 0, RowKind.LATENT, 0, 20), src_pool)
    assert transfer.set_source(torch.tensor([3, 0, 1]), block_size=8)
    assert transfer.fail(TransferAborted("client went away"))
    after = transfer.pools[(0, RowKind.LATENT)].clone()
    assert transfer.copy_from(FrameHeader(1, 0, RowKind.LATENT, 0, 20), src_pool) is None
    assert same_bits(transfer.pools[(0, RowKind.LATENT)], after)


# -- the transport between two processes (GPU) ------------------------------------------------------------------------

POOL_LAYOUT = KVLayout(
    num_layers=4, block_size=64, latent_dim=576, index_dim=128, index_layers=(0, 2), dtype=torch.bfloat16
)
POOL_BLOCKS = 12
CAP = b"the test transfer's capability.."  # both processes know it
POOL_SRC = [7, 2, 11, 0, 5, 9, 3, 10]
POOL_DST = [4, 8, 1, 11, 6, 0, 9, 2]
POOL_START, POOL_TOKENS = 37, 6 * 64 + 29  # tokens 37..449: partial first and last blocks
POOL_ORDER = [3, 0, 2, 1]
POOL_SEED = 99


def seeded_pools(device: str):
    """The sender's pools: random bits from a seed both processes know."""

    def pool(dim: int, salt: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(POOL_SEED + salt)
        bits = torch.randint(
            -(2**15), 2**15, (POOL_BLOCKS, POOL_LAYOUT.block_size, dim), generator=g, dtype=torch.int16
        )
        return bits.view(POOL_LAYOUT.dtype).to(device)

    latent = [pool(POOL_LAYOUT.latent_dim, layer) for layer in range(POOL_LAYOUT.num_layers)]
    return latent, {layer: pool(POOL_LAYOUT.index_dim, 100 + layer) for layer in POOL_LAYOUT.index_layers}


def pool_sender_main(address, transport, device, plan, connected, resume, halfway, results) -> None:
    """As `sender_main`, but every layer is read by the receiver straight from this process's pools."""
    try:
        torch.cuda.set_device(torch.device(device))
        sender = KVSender.connect(address, POOL_LAYOUT, transport=transport, pools=seeded_pools(device))
        connected.set()
        resume.get()
        transfer = sender.open_transfer("req", CAP, src_block_ids=POOL_SRC)
        for i, layer in enumerate(POOL_ORDER):
            if plan != "all" and i == len(POOL_ORDER) // 2:
                halfway.set()
                resume.get()
            transfer.send_layer(layer)
        transfer.complete(5, -0.5).result(WAIT_S)
        results.put("completed")
    except TransferFailed as e:
        results.put(e.kind.value)


def pool_receiver() -> KVReceiver:
    def pool(dim: int) -> torch.Tensor:
        return torch.full((POOL_BLOCKS, POOL_LAYOUT.block_size, dim), SENTINEL, dtype=POOL_LAYOUT.dtype, device="cuda")

    latent = [pool(POOL_LAYOUT.latent_dim) for _ in range(POOL_LAYOUT.num_layers)]
    index = {i: pool(POOL_LAYOUT.index_dim) for i in POOL_LAYOUT.index_layers}
    return KVReceiver(POOL_LAYOUT, latent, index, transports=("cuda_ipc",))


def receiver_pools(receiver: KVReceiver) -> dict[tuple[int, RowKind], torch.Tensor]:
    found = {(layer, RowKind.LATENT): pool for layer, pool in enumerate(receiver.latent)}
    return found | {(layer, RowKind.INDEX): pool for layer, pool in receiver.index_keys.items()}


def layer_bytes(layers) -> int:
    dims = [POOL_LAYOUT.latent_dim + (POOL_LAYOUT.index_dim if i in POOL_LAYOUT.index_layers else 0) for i in layers]
    return POOL_TOKENS * sum(dims) * POOL_LAYOUT.dtype.itemsize


def warm_up_copy_kernel() -> None:
    """Compile the copy for the pool shapes of these tests (they specialize it) with a copy of local pools."""
    for dim in (POOL_LAYOUT.latent_dim, POOL_LAYOUT.index_dim):
        pool = random_pool(2, POOL_LAYOUT.block_size, dim)
        table = torch.tensor([1, 0], device=DEVICE)
        copy_runs(pool, pool.clone(), plan_runs(table, POOL_LAYOUT.block_size, table, POOL_LAYOUT.block_size, 5, 100))
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_cuda_ipc_rows_through_staging_are_bit_exact():
    with make_receiver("cuda_ipc", device="cuda") as receiver:
        transfer_to_completion(receiver, SenderProcess(receiver.address, "cuda_ipc", device="cuda:0"))
        assert_landed_exactly(receiver)


@pytest.mark.gpu
def test_cuda_ipc_pool_to_pool_is_bit_exact():
    with pool_receiver() as receiver:
        sender = SenderProcess(receiver.address, "cuda_ipc", "cuda:0", target=pool_sender_main)
        try:
            future = receiver.register(
                "req", POOL_DST, POOL_TOKENS, start_token=POOL_START, lease_s=WAIT_S, capability=CAP
            )
            sender.go()
            assert future.result(WAIT_S).first_token == 5
            assert sender.result() == "completed"
        finally:
            sender.stop()
        src_latent, src_index = seeded_pools("cpu")
        sources = dict(zip(receiver_pools(receiver), [*src_latent, *src_index.values()], strict=True))
        for where, pool in receiver_pools(receiver).items():
            blank = torch.full(pool.shape, SENTINEL, dtype=pool.dtype)
            want = reference_copy(sources[where], POOL_SRC, blank, POOL_DST, POOL_START, POOL_TOKENS)
            assert same_bits(pool, want), where
        stats = receiver.stats
        assert stats.bytes_received == layer_bytes(range(POOL_LAYOUT.num_layers)) and stats.chunks_dropped == 0
        assert 0 < stats.data_seconds <= stats.transfer_seconds


@pytest.mark.gpu
def test_cuda_ipc_abort_waits_for_enqueued_copies():
    """Copies queue behind a long kernel on the receiver's copy stream; abort must not return before they ran, so
    blocks given back and refilled stay as refilled."""
    with pool_receiver() as receiver:
        sender = SenderProcess(receiver.address, "cuda_ipc", "cuda:0", plan="stall", target=pool_sender_main)
        warm_up_copy_kernel()  # compiling it later could outlast the long kernel below
        try:
            future = receiver.register(
                "req", POOL_DST, POOL_TOKENS, start_token=POOL_START, lease_s=WAIT_S, capability=CAP
            )
            with torch.cuda.stream(receiver._copy_stream):
                torch.cuda._sleep(4_000_000_000)  # about two seconds of GPU clock
            sender.go()
            assert sender.halfway.wait(WAIT_S)
            wait_for(lambda: receiver.stats.bytes_received >= layer_bytes(POOL_ORDER[:2]))
            assert not receiver._copy_stream.query(), "the copies finished before the abort: nothing was tested"
            assert receiver.abort("req", "client went away")
            assert receiver._copy_stream.query()
            with pytest.raises(TransferAborted):
                future.result(WAIT_S)
            for pool in receiver_pools(receiver).values():
                pool[POOL_DST] = 2.5  # the blocks went back and another request filled them
            refilled = [pool.clone() for pool in receiver_pools(receiver).values()]
            sender.resume.put(True)  # the rest of the layers come, and are dropped
            assert sender.result() == "aborted"
            torch.cuda.synchronize()
            assert all(same_bits(a, b) for a, b in zip(receiver_pools(receiver).values(), refilled, strict=True))
            assert receiver.stats.chunks_dropped == len(
                [k for layer in POOL_ORDER[2:] for k in POOL_LAYOUT.kinds(layer)]
            )
        finally:
            sender.stop()


@pytest.mark.gpu
def test_bench_cuda_ipc_reports_both_clocks_against_the_copy_ceiling():
    result = bench_cuda_ipc(64 << 20)
    assert result["exact"] and result["bytes"] == result["sender"]["bytes_sent"]
    assert 0 < result["data_seconds"] < result["seconds"]
    assert 0 < result["fraction_of_ceiling"] < result["data_fraction_of_ceiling"]
    assert result["copy_ceiling_gb_s"] > 0
