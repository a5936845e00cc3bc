"""Throughput of one KV transfer between two processes, with the bytes checked bit for bit afterwards.

The receiver runs here, the sender in a spawned process; both hold GLM-5.2-shaped pools (latent 576, index keys 128,
64-token blocks, bf16) with shuffled block tables, and the sender reads its rows straight from its pools. A small
transfer first warms both ends up (kernel compilation, connections, allocators). Two clocks, best of a few runs:
end to end, from the go signal to the receiver's future resolving (open and completion RPCs included), and the data
plane, from the first chunk's arrival to every row in the pools (copies synchronized). `bench_cuda_ipc` also times a
plain device-to-device copy of the same bytes, the ceiling, and gives both as fractions of it.

    python -m glmserve.bench.kvtransfer --transport tcp --gib 1 --json kvtransfer-tcp.json
"""

import argparse
import logging
import math
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from glmserve.bench.report import write_report
from glmserve.kvtransfer.layout import KVLayout
from glmserve.kvtransfer.receiver import KVReceiver
from glmserve.kvtransfer.sender import KVSender

log = logging.getLogger(__name__)

LAYOUT = KVLayout(
    num_layers=8, block_size=64, latent_dim=576, index_dim=128, index_layers=(0, 1, 2, 6), dtype=torch.bfloat16
)
_SEED = 1234
_WARMUP_TOKENS = 200  # past a whole block and a partial one: the copy kernel compiles for the shapes timed later
_TIMEOUT_S = 300.0
_REPEATS = 3  # best of: a sub-millisecond data plane is at the mercy of one scheduling hiccup
_DETAIL_KEYS = ("runs", "sender")  # every run's times and the sender's report: the JSON's `extra`, not its row


def bench_tcp(total_bytes: int = 1 << 30, chunk_bytes: int | None = None) -> dict:
    """Loopback tcp between two CPU processes."""
    return bench_transfer("tcp", total_bytes, device="cpu", chunk_bytes=chunk_bytes)


def bench_cuda_ipc(total_bytes: int = 1 << 30, device: str = "cuda:0") -> dict:
    """Two processes on one GPU; adds the device-to-device copy ceiling measured in the same run."""
    result = bench_transfer("cuda_ipc", total_bytes, device=device)
    ceiling = copy_ceiling_gb_s(result["bytes"], torch.device(device))
    result["copy_ceiling_gb_s"] = ceiling
    result["fraction_of_ceiling"] = result["gb_s"] / ceiling
    result["data_fraction_of_ceiling"] = result["data_gb_s"] / ceiling
    log.info(
        "copy ceiling %.1f GB/s: end to end %.1f%%, data plane %.1f%% of it",
        ceiling,
        100 * result["fraction_of_ceiling"],
        100 * result["data_fraction_of_ceiling"],
    )
    return result


def bench_transfer(
    transport: str,
    total_bytes: int,
    device: str = "cpu",
    layout: KVLayout = LAYOUT,
    chunk_bytes: int | None = None,
    repeats: int = _REPEATS,
) -> dict:
    """Move `total_bytes` (rounded to whole tokens) of KV from a spawned sender into pools here, `repeats` times into
    the same blocks; returns the best time of each clock, every run's, and the last run's bytes checked."""
    num_tokens = max(1, total_bytes // layout.bytes_per_token)
    num_blocks = math.ceil(num_tokens / layout.block_size) + 1  # one spare: the tables are shuffled
    latent, index_keys = _pools(layout, num_blocks, torch.device(device), seed=None)
    dst_blocks = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(_SEED + 1))
    ctx = mp.get_context("spawn")
    ready, go, results = ctx.Event(), ctx.Queue(), ctx.Queue()
    with KVReceiver(layout, latent, index_keys, transports=(transport,)) as receiver:
        args = (receiver.address, transport, layout, num_blocks, device, chunk_bytes, ready, go, results)
        proc = ctx.Process(target=_sender_process, args=args, daemon=True)
        proc.start()
        try:
            if not ready.wait(_TIMEOUT_S):
                raise TimeoutError(f"the sender did not connect: {_drain(results)}")
            _timed_transfer(receiver, "warmup", dst_blocks, min(num_tokens, _WARMUP_TOKENS), go, results)
            runs = [
                _timed_transfer(receiver, f"bench-{i}", dst_blocks, num_tokens, go, results) for i in range(repeats)
            ]
            go.put(None)
        finally:
            proc.join(timeout=10.0)
            if proc.is_alive():
                proc.kill()
    nbytes = num_tokens * layout.bytes_per_token
    exact = _matches_source(layout, latent, index_keys, dst_blocks, num_tokens, num_blocks)
    seconds, data_seconds = min(run[0] for run in runs), min(run[1] for run in runs)
    result = {
        "transport": transport,
        "device": device,
        "bytes": nbytes,
        "tokens": num_tokens,
        "seconds": seconds,
        "gb_s": nbytes / seconds / 1e9,
        "data_seconds": data_seconds,
        "data_gb_s": nbytes / data_seconds / 1e9,
        "exact": exact,
        "repeats": repeats,
        "runs": [{"seconds": run[0], "data_seconds": run[1]} for run in runs],
        "sender": runs[-1][2],
    }
    log.info(
        "%s: %.3f GB in %.3f s = %.2f GB/s end to end; data plane %.4f s = %.2f GB/s (exact: %s)",
        transport,
        nbytes / 1e9,
        seconds,
        result["gb_s"],
        data_seconds,
        result["data_gb_s"],
        exact,
    )
    return result


def _timed_transfer(receiver: KVReceiver, name: str, dst_blocks, num_tokens: int, go, results):
    """One transfer of tokens [0, num_tokens): (end-to-end seconds, data-plane seconds, the sender's report)."""
    data_before = receiver.stats.data_seconds
    future = receiver.register(name, dst_blocks, num_tokens, lease_s=30.0)
    began = time.perf_counter()
    go.put(name)
    future.result(timeout=_TIMEOUT_S)
    seconds = time.perf_counter() - began
    return seconds, receiver.stats.data_seconds - data_before, results.get(timeout=_TIMEOUT_S)


def copy_ceiling_gb_s(nbytes: int, device: torch.device, repeats: int = 5) -> float:
    """Best-of-N `dst.copy_(src)` of `nbytes` on the GPU (bytes moved / time, as the transfer is counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return nbytes / best / 1e9


def _sender_process(address, transport, layout, num_blocks, device, chunk_bytes, ready, go, results) -> None:
    """Send each transfer the parent names on `go`, until it sends None; report each one's bytes and send time."""
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    latent, index_keys = _pools(layout, num_blocks, torch.device(device), seed=_SEED)
    src_blocks = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(_SEED + 2))
    sender = KVSender.connect(address, layout, transport, pools=(latent, index_keys), chunk_bytes=chunk_bytes)
    ready.set()
    while (name := go.get()) is not None:
        sent, seconds = sender.stats.bytes_sent, sender.stats.send_seconds
        transfer = sender.open_transfer(name, src_block_ids=src_blocks)
        for layer in range(layout.num_layers):
            transfer.send_layer(layer)
        transfer.complete(first_token=0, logprob=0.0).result(timeout=_TIMEOUT_S)
        results.put({"send_seconds": sender.stats.send_seconds - seconds, "bytes_sent": sender.stats.bytes_sent - sent})
    sender.close()


def _pools(layout: KVLayout, num_blocks: int, device: torch.device, seed: int | None):
    """Pools filled with random bits from `seed` (zeros when None), generated on CPU so every device agrees."""

    def pool(dim: int, salt: int) -> torch.Tensor:
        if seed is None:
            return torch.zeros(num_blocks, layout.block_size, dim, dtype=layout.dtype, device=device)
        bits = torch.empty(num_blocks, layout.block_size, dim, dtype=torch.int16)
        bits.random_(generator=torch.Generator().manual_seed(seed + salt))
        return bits.view(layout.dtype).to(device)

    latent = [pool(layout.latent_dim, layer) for layer in range(layout.num_layers)]
    index_keys = {layer: pool(layout.index_dim, 1000 + layer) for layer in layout.index_layers}
    return latent, index_keys


def _matches_source(layout, latent, index_keys, dst_blocks, num_tokens, num_blocks) -> bool:
    """Rebuild the sender's pools and compare every transferred row's bits."""
    src_latent, src_index = _pools(layout, num_blocks, torch.device("cpu"), seed=_SEED)
    src_blocks = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(_SEED + 2))
    tokens = torch.arange(num_tokens)
    bs = layout.block_size
    src_rows = src_blocks[tokens // bs] * bs + tokens % bs
    dst_rows = dst_blocks[tokens // bs] * bs + tokens % bs
    pairs = [(latent[i], src_latent[i]) for i in range(layout.num_layers)]
    pairs += [(index_keys[i], src_index[i]) for i in layout.index_layers]
    for got, want in pairs:
        got_rows = got.view(-1, got.shape[-1])[dst_rows.to(got.device)].cpu()
        if not torch.equal(got_rows.view(torch.int16), want.view(-1, want.shape[-1])[src_rows].view(torch.int16)):
            return False
    return True


def _drain(results) -> str:
    return "" if results.empty() else str(results.get())


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transport", choices=("tcp", "nccl", "cuda_ipc"), default="tcp")
    parser.add_argument("--gib", type=float, default=1.0, help="bytes to move, GiB")
    parser.add_argument("--device", default=None, help="pools' device (default: cpu for tcp, cuda:0 otherwise)")
    parser.add_argument(
        "--json", type=Path, default=None, help="result file (default: ./kvtransfer-bench-TRANSPORT.json)"
    )


def run_bench(args: argparse.Namespace) -> dict:
    total = int(args.gib * (1 << 30))
    device = args.device or ("cpu" if args.transport == "tcp" else "cuda:0")
    if args.transport == "cuda_ipc":
        result = bench_cuda_ipc(total, device)
    else:
        result = bench_transfer(args.transport, total, device)
    out = args.json or Path(f"kvtransfer-bench-{args.transport}.json")
    row = {k: v for k, v in result.items() if k not in _DETAIL_KEYS}
    write_report(out, [row], {k: result[k] for k in _DETAIL_KEYS})
    print(f"{'transport':<10} {'device':<8} {'GiB':>6} {'seconds':>8} {'GB/s':>7} {'exact':>6}")
    print(
        f"{result['transport']:<10} {result['device']:<8} {result['bytes'] / 2**30:>6.2f} {result['seconds']:>8.3f}"
        f" {result['gb_s']:>7.2f} {result['exact']!s:>6}"
    )
    data_seconds, data_gb_s = result["data_seconds"], result["data_gb_s"]
    print(f"data plane (first chunk to every row in the pools): {data_seconds:.4f} s = {data_gb_s:.2f} GB/s")
    if "copy_ceiling_gb_s" in result:
        ceiling = result["copy_ceiling_gb_s"]
        print(
            f"device copy ceiling {ceiling:.1f} GB/s; end to end reaches {result['fraction_of_ceiling']:.1%} of it,"
            f" the data plane {result['data_fraction_of_ceiling']:.1%}"
        )
    print(f"wrote {out}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_args(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_bench(parser.parse_args())


if __name__ == "__main__":
    main()
