"""CUDA graphs of pure decode steps (one new token per sequence).

A decode step is a few hundred small launches; at small batch their launch cost exceeds their work, and a graph
replays them back to back. One graph per (padded batch size, context bucket): the bucket fixes every host-side
value the launches use, namely the indexer logits width (a power of two >= the longest context) and the
block-table width, or dense attention while no context exceeds index_topk. Padding rows repeat the last real
sequence: they compute and write exactly what it does (the same values to the same slots) and are dropped.
"""

from collections.abc import Callable

import torch

from .model_runner import ModelRunner, SeqChunk, StepOutput

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)

Step = Callable[[], tuple[torch.Tensor, ...]]


def padded_batch_size(n: int, max_batch: int) -> int:
    """The captured batch size a step of `n` sequences runs at."""
    return min(next((s for s in GRAPH_BATCH_SIZES if s >= n), max_batch), max_batch)


def context_bucket(runner: ModelRunner, max_context: int) -> int:
    """The context width a step is captured for: index_topk while attention is dense, else a power of two."""
    topk = runner.config.index_topk
    if max_context <= topk:
        return topk
    return min(1 << (max_context - 1).bit_length(), runner.tables.max_blocks * runner.cache.spec.block_size)


class GraphBlockTables:
    """The block tables captured steps read: rows copied from the runner's tables before a replay, unless the same
    rows at the same width were copied last and no table changed since (most decode steps at small batch: a
    sequence adds a block every block_size tokens)."""

    def __init__(self, runner: ModelRunner, max_batch: int):
        self.source = runner.tables
        self.tensor = torch.zeros(max_batch, runner.tables.max_blocks, dtype=torch.int32, device=runner.device)
        self.copied: tuple | None = None

    def refresh(self, rows: list[int], rows_on_device: torch.Tensor, blocks: int) -> None:
        """Copy table rows `rows` (the same, on the device) into the first len(rows) rows, `blocks` wide."""
        key = (tuple(rows), blocks, self.source.version)
        if key != self.copied:
            self.tensor[: len(rows), :blocks] = self.source.table[rows_on_device, :blocks]
            self.copied = key


class CapturedStep:
    """A captured step (or, without capture, the same step run eagerly on the same static inputs)."""

    def __init__(self, step: Step, capture: bool, pool: tuple | None):
        self.step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        if not capture:
            return
        # Warm up on a side stream first (Triton compiles, cuBLAS picks its kernels): it runs the real step once,
        # writing the same KV the replay writes again.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = step()

    def run(self) -> tuple[torch.Tensor, ...]:
        if self.graph is None:
            return self.step()
        self.graph.replay()
        return self.outputs


class GraphCache(dict):
    """Captured steps by shape key. Later captures share the memory pool of earlier ones: replays never overlap."""

    def __init__(self, capture: bool):
        super().__init__()
        self.capture = capture
        self.pool: tuple | None = None

    def get_or_capture(self, key: tuple, make_step: Callable[[], Step]) -> tuple[CapturedStep, bool]:
        """The step for `key`, and whether it was captured by this call."""
        graph = self.get(key)
        if graph is not None:
            return graph, False
        graph = self[key] = CapturedStep(make_step(), self.capture, self.pool)
        if graph.graph is not None:
            self.pool = graph.graph.pool()
        return graph, True


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_batch: int, capture: bool = True):
        """`capture=False` runs the same static-input steps eagerly (CPU tests of the padding and buckets)."""
        self.runner = runner
        self.max_batch = max_batch
        self.block_size = runner.cache.spec.block_size
        device = runner.device
        self.inputs = torch.zeros(3, max_batch, dtype=torch.long, device=device)  # token, position, table row
        self.block_tables = GraphBlockTables(runner, max_batch)
        self.graphs = GraphCache(capture)

    def accepts(self, chunks: list[SeqChunk]) -> bool:
        return 0 < len(chunks) <= self.max_batch and all(len(c.token_ids) == 1 == c.num_logits for c in chunks)

    def run(self, chunks: list[SeqChunk], keep_all_hidden: bool) -> StepOutput:
        n = len(chunks)
        size = padded_batch_size(n, self.max_batch)
        width = context_bucket(self.runner, max(c.start_pos + 1 for c in chunks))
        pad = size - n
        rows = self.runner.tables.rows_for([c.block_table for c in chunks])
        rows += [rows[-1]] * pad
        host = torch.tensor([
            [c.token_ids[0] for c in chunks] + [chunks[-1].token_ids[0]] * pad,
            [c.start_pos for c in chunks] + [chunks[-1].start_pos] * pad,
            rows,
        ])  # fmt: skip
        self.inputs[:, :size].copy_(host)
        self.block_tables.refresh(rows, self.inputs[2, :size], -(-width // self.block_size))
        graph, _ = self.graphs.get_or_capture((size, width), lambda: self._step(size, width))
        logits, hidden = graph.run()
        hidden = hidden[:n].clone()
        return StepOutput(logits=logits[:n].clone(), hidden=hidden, all_hidden=hidden if keep_all_hidden else None)

    def _step(self, size: int, width: int) -> Step:
        runner = self.runner
        device = runner.device
        ids, positions = self.inputs[0, :size], self.inputs[1, :size]
        block_tables = self.block_tables.tensor[:size, : -(-width // self.block_size)]
        query_start = list(range(size + 1))
        plan = runner.index_plan(query_start, width)
        rows = torch.arange(size, device=device)
        rows32 = rows.int()

        def step() -> tuple[torch.Tensor, torch.Tensor]:
            inputs = runner.step_inputs(
                [], ids, positions, rows32, block_tables, query_start, [width] * size, width, rows, rows, plan
            )
            out = runner.execute(inputs)
            return out.logits, out.hidden

        return step
