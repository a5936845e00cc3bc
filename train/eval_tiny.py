"""Evaluate a glm5-tiny checkpoint on held-out Python files (the tokenizer's and the trainer's held-out split).

    python -m glmserve.train.eval_tiny [--checkpoint DIR] [--out eval.json]

1. Held-out loss and perplexity through the reference forward (`model(input_ids)`), over non-overlapping windows
   of `--seq-len` tokens of the held-out standard-library files: sparse (each layer's `index_topk`, as served) and
   dense (top-k raised to the window, so every causal key is attended).
2. Greedy completions of held-out function headers: a top-level function's `def` line(s) and docstring are the
   prompt; the model writes up to `--max-new-tokens` tokens greedily; the body ends at the first line that dedents
   to column 0 (or at end-of-text; a line cut by the token limit is dropped). A completion passes when
   `ast.parse(prompt + body)` succeeds and the body holds at least one statement after the docstring.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from glmserve.model.default_checkpoint import PACKAGED
from glmserve.model.glm import GlmForCausalLM
from glmserve.model.loader import load_model
from glmserve.model.tokenizer import Tokenizer

from .code_corpus import tokenize_files
from .train_tokenizer import corpus_files, stdlib_root

log = logging.getLogger(__name__)


@dataclass
class FunctionPrompt:
    path: str
    name: str
    prompt: str


@dataclass
class Completion:
    path: str
    name: str
    prompt: str
    body: str
    parses: bool


@contextlib.contextmanager
def index_topk(model: GlmForCausalLM, topk: int) -> Iterator[None]:
    """Temporarily set every layer's indexer top-k (a top-k >= the context makes attention dense)."""
    layers = list(model.model.layers)
    saved = [layer.topk for layer in layers]
    for layer in layers:
        layer.topk = topk
    try:
        yield
    finally:
        for layer, k in zip(layers, saved, strict=True):
            layer.topk = k


@torch.no_grad()
def heldout_loss(model: GlmForCausalLM, tokens: np.ndarray, seq_len: int, windows: int = 0, batch: int = 8) -> float:
    """Mean next-token CE over non-overlapping windows of seq_len + 1 tokens (all of them when `windows` is 0,
    else that many, evenly spaced)."""
    total = len(tokens) // (seq_len + 1)
    picks = np.arange(total) if not windows else np.linspace(0, total - 1, min(windows, total)).round().astype(int)
    rows = torch.from_numpy(np.stack([np.asarray(tokens[i * (seq_len + 1) : (i + 1) * (seq_len + 1)]) for i in picks]))
    loss_sum = 0.0
    for chunk in tqdm(rows.long().split(batch), desc="held-out loss", unit="batch"):
        logits = model(chunk[:, :-1])
        loss_sum += F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum").item()
    return loss_sum / (len(rows) * seq_len)


def function_prompts(root: Path, files: Sequence[Path], count: int, seed: int = 0) -> list[FunctionPrompt]:
    """`count` top-level functions with a docstring and a body after it, drawn with a seeded RNG from `files`:
    each prompt is the source from the `def` line to the end of the docstring."""
    found = []
    for rel in files:
        try:
            source = (root / rel).read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        lines = source.splitlines(keepends=True)
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or len(node.body) < 2:
                continue
            if ast.get_docstring(node) is None or node.body[0].end_lineno is None:
                continue
            prompt = "".join(lines[node.lineno - 1 : node.body[0].end_lineno])
            if prompt.endswith("\n"):
                found.append(FunctionPrompt(rel.as_posix(), node.name, prompt))
    if len(found) < count:
        raise ValueError(f"only {len(found)} eligible functions in the held-out files, {count} asked for")
    return random.Random(seed).sample(found, count)


def function_body(completion: str, cut_by_limit: bool) -> str:
    """The completed body: lines up to the first one that dedents to column 0; a last line cut by the token limit
    is dropped."""
    kept = []
    for line in completion.splitlines(keepends=True):
        if line.strip() and not line[0].isspace():
            return "".join(kept)
        kept.append(line)
    body = "".join(kept)
    return body[: body.rfind("\n") + 1] if cut_by_limit else body


def body_parses(prompt: str, body: str) -> bool:
    """True when prompt + body is valid Python and the function has a statement after its docstring."""
    try:
        tree = ast.parse(prompt + body)
    except (SyntaxError, ValueError):
        return False
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    return len(functions) == 1 and len(functions[0].body) >= 2


@torch.no_grad()
def greedy_completion(model: GlmForCausalLM, tokenizer: Tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding with full forwards: the body text (see `function_body`)."""
    ids = tokenizer.encode(prompt)
    new: list[int] = []
    stops = set(tokenizer.eos_token_ids)
    for _ in range(max_new_tokens):
        token = int(model(torch.tensor([ids + new]))[0, -1].argmax())
        if token in stops:
            return function_body(tokenizer.decode(new), cut_by_limit=False)
        new.append(token)
        text = tokenizer.decode(new)
        if any(line.strip() and not line[0].isspace() for line in text.splitlines()):
            return function_body(text, cut_by_limit=False)
    return function_body(tokenizer.decode(new), cut_by_limit=True)


def evaluate(
    checkpoint: Path | None,
    seq_len: int = 512,
    windows: int = 0,
    functions: int = 50,
    max_new_tokens: int = 64,
    seed: int = 0,
) -> dict:
    """Held-out loss/perplexity sparse and dense, and the greedy-completion parse rate of `checkpoint`."""
    model = load_model(checkpoint)
    path = Path(checkpoint) if checkpoint is not None else PACKAGED
    tokenizer = Tokenizer.from_pretrained(path)
    root = stdlib_root()
    heldout = corpus_files(root, heldout=True)
    tokens = tokenize_files(tokenizer, root, heldout, "tokenizing held-out files")

    sparse = heldout_loss(model, tokens, seq_len, windows)
    with index_topk(model, seq_len):
        dense = heldout_loss(model, tokens, seq_len, windows)

    completions = []
    for fn in tqdm(function_prompts(root, heldout, functions, seed), desc="greedy completions", unit="function"):
        body = greedy_completion(model, tokenizer, fn.prompt, max_new_tokens)
        completions.append(Completion(fn.path, fn.name, fn.prompt, body, body_parses(fn.prompt, body)))
    passed = sum(c.parses for c in completions)
    return {
        "checkpoint": str(path),
        "heldout_files": len(heldout),
        "heldout_tokens": len(tokens),
        "seq_len": seq_len,
        "index_topk": model.config.index_topk,
        "windows": windows or len(tokens) // (seq_len + 1),
        "sparse": {"loss": sparse, "perplexity": math.exp(sparse)},
        "dense": {"loss": dense, "perplexity": math.exp(dense)},
        "sparse_over_dense_perplexity": math.exp(sparse - dense),
        "completions_parsed": passed,
        "completions": len(completions),
        "completion_samples": [asdict(c) for c in completions],
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="checkpoint directory (default: glm5-tiny)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=0, help="held-out windows to score (0: all)")
    parser.add_argument("--functions", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results (and every completion) as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = evaluate(args.checkpoint, args.seq_len, args.windows, args.functions, args.max_new_tokens, args.seed)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        (
            "held-out tokens",
            f"{result['heldout_tokens']} ({result['heldout_files']} files, {result['windows']} windows)",
        ),
        (
            f"sparse (top-{result['index_topk']}) loss / ppl",
            f"{result['sparse']['loss']:.4f} / {result['sparse']['perplexity']:.3f}",
        ),
        ("dense loss / ppl", f"{result['dense']['loss']:.4f} / {result['dense']['perplexity']:.3f}"),
        ("sparse / dense perplexity", f"{result['sparse_over_dense_perplexity']:.4f}"),
        ("greedy completions that parse", f"{result['completions_parsed']} / {result['completions']}"),
    ]
    width = max(len(name) for name, _ in rows)
    log.info(
        "evaluation at %d tokens of context:\n%s",
        result["seq_len"],
        "\n".join(f"  {name:<{width}}  {value}" for name, value in rows),
    )


if __name__ == "__main__":
    main()
