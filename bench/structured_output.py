"""`python -m glmserve.bench.structured_output`: the two grammar libraries made for structured output, llguidance
and XGrammar, side by side on this machine with the checkpoint's tokenizer.

For each JSON schema of a small suite it measures the compile time (a fresh compiler, nothing cached; for
llguidance: building the grammar and the matcher, which is its whole compile) and, walking a valid instance token by
token, the time to compute each next-token bitmask and to accept the token. The tokenizer-info build, done once per
process, is reported apart. Both libraries get the same separators (", " and ": ", no free whitespace), so both walk
the same tokens. Then, in the engine on the embedded glm5-tiny, the time per output token of greedy decoding with
and without a JSON-schema grammar (an array of at least 200 integers, so both runs make exactly `--tpot-tokens`
tokens) at batch 1 and 8. Writes JSON (`--output-json`) beside the printed tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from glmserve.bench.report import write_report
from glmserve.model.default_checkpoint import default_checkpoint
from glmserve.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# (name, schema, a valid instance)
SCHEMAS: list[tuple[str, dict[str, Any], Any]] = [
    (
        "flat object",
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "ok": {"type": "boolean"}},
            "required": ["name", "age", "ok"],
        },
        {"name": "Ada Lovelace", "age": 36, "ok": True},
    ),
    (
        "nested + optional",
        {
            "type": "object",
            "properties": {
                "user": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer", "minimum": 1},
                        "email": {"type": "string"},
                        "address": {
                            "type": "object",
                            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                            "required": ["city"],
                        },
                    },
                    "required": ["id", "address"],
                },
                "note": {"type": "string"},
            },
            "required": ["user"],
        },
        {"user": {"id": 7, "email": "a@b.c", "address": {"city": "Paris", "zip": "75001"}}, "note": "hi"},
    ),
    (
        "array bounds",
        {
            "type": "object",
            "properties": {
                "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 4},
                "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 3},
            },
            "required": ["tags", "scores"],
        },
        {"tags": ["red", "green", "blue"], "scores": [1.5, -2, 3e3]},
    ),
    (
        "enum + anyOf",
        {
            "type": "object",
            "properties": {
                "color": {"enum": ["red", "green", "blue"]},
                "value": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 8}, {"type": "null"}]},
            },
            "required": ["color", "value"],
        },
        {"color": "green", "value": "eight"},
    ),
    (
        "string patterns",
        {
            "type": "object",
            "properties": {
                "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                "code": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
            },
            "required": ["date", "code"],
        },
        {"date": "2025-01-31", "code": "ABC12"},
    ),
    (
        "array of objects",
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 0, "maximum": 99}},
                "required": ["sku", "qty"],
            },
            "minItems": 1,
            "maxItems": 5,
        },
        [{"sku": "x-1", "qty": 3}, {"sku": "y-22", "qty": 10}, {"sku": "z", "qty": 0}],
    ),
]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Library:
    name: str

    def compile(self, schema: dict[str, Any]) -> Any: ...

    def walk(self, compiled: Any, tokens: list[int]) -> tuple[list[float], list[float]]:
        """(mask seconds, accept seconds) per token of a valid instance; the final mask (EOS only) included."""


class _Llguidance(_Library):
    name = "llguidance"

    def __init__(self, tokenizer_json: str, vocab_size: int, eos: list[int]):
        import llguidance

        self.llg = llguidance
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos)
        self.vocab_size = vocab_size

    def compile(self, schema: dict[str, Any]) -> Any:
        options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults=options)
        matcher = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def walk(self, matcher: Any, tokens: list[int]) -> tuple[list[float], list[float]]:
        mask = torch.zeros((self.vocab_size + 31) // 32, dtype=torch.int32)
        ptr, size = mask.data_ptr(), mask.numel() * 4
        masks, accepts = [], []
        for token in [*tokens, None]:
            t0 = time.perf_counter()
            matcher.unsafe_compute_mask_ptr(ptr, size)
            t1 = time.perf_counter()
            masks.append(t1 - t0)
            if token is None:
                break
            if not (int(mask[token // 32]) >> (token % 32)) & 1:
                raise AssertionError(f"llguidance masked out token {token} of a valid instance")
            ok = matcher.consume_token(token)
            accepts.append(time.perf_counter() - t1)
            assert ok, matcher.get_error()
        assert matcher.is_accepting()
        return masks, accepts


class _Xgrammar(_Library):
    name = "xgrammar"

    def __init__(self, vocab: list[str], special: set[int], vocab_size: int, eos: list[int]):
        import xgrammar

        self.xgr = xgrammar
        # special tokens are never text: an empty entry is what XGrammar takes as special
        encoded = ["" if i in special else token for i, token in enumerate(vocab)]
        self.info = xgrammar.TokenizerInfo(
            encoded, xgrammar.VocabType.BYTE_LEVEL, vocab_size=vocab_size, stop_token_ids=eos
        )
        self.vocab_size = vocab_size

    def compile(self, schema: dict[str, Any]) -> Any:
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        return compiler.compile_json_schema(schema, any_whitespace=False, separators=(", ", ": "))

    def walk(self, compiled: Any, tokens: list[int]) -> tuple[list[float], list[float]]:
        matcher = self.xgr.GrammarMatcher(compiled)
        mask = self.xgr.allocate_token_bitmask(1, self.vocab_size)
        masks, accepts = [], []
        for token in [*tokens, None]:
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(mask)
            t1 = time.perf_counter()
            masks.append(t1 - t0)
            if token is None:
                break
            if not (int(mask[0, token // 32]) >> (token % 32)) & 1:
                raise AssertionError(f"xgrammar masked out token {token} of a valid instance")
            ok = matcher.accept_token(token)
            accepts.append(time.perf_counter() - t1)
            assert ok
        assert matcher.is_completed()
        return masks, accepts


def _timed(make: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    value = make()
    return value, time.perf_counter() - t0


def run_bench(repeats: int, output_json: str | None, tpot_tokens: int = 0) -> list[dict[str, Any]]:
    checkpoint = default_checkpoint()
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    rust = tokenizer._tokenizer
    vocab_size = tokenizer.vocab_size
    vocab = [rust.id_to_token(i) for i in range(vocab_size)]
    eos = list(tokenizer.eos_token_ids)
    with open(f"{checkpoint}/tokenizer.json") as f:
        tokenizer_json = f.read()
    libraries: list[_Library] = []
    setup: dict[str, float] = {}
    lib, setup["llguidance"] = _timed(lambda: _Llguidance(tokenizer_json, vocab_size, eos))
    libraries.append(lib)
    try:  # the peer; not a glmserve dependency (`pip install xgrammar`)
        lib, setup["xgrammar"] = _timed(lambda: _Xgrammar(vocab, set(tokenizer.special_token_ids), vocab_size, eos))
        libraries.append(lib)
    except ImportError:
        log.warning("xgrammar is not installed: measuring llguidance alone (pip install xgrammar for the peer)")

    rows = []
    for name, schema, instance in SCHEMAS:
        tokens = tokenizer.encode(json.dumps(instance))
        for lib in libraries:
            compile_s, masks, accepts = [], [], []
            for _ in range(repeats):
                compiled, seconds = _timed(lambda lib=lib, schema=schema: lib.compile(schema))
                compile_s.append(seconds)
                m, a = lib.walk(compiled, tokens)
                masks += m
                accepts += a
            rows.append(
                {
                    "schema": name,
                    "library": lib.name,
                    "tokens": len(tokens),
                    "compile_ms": statistics.median(compile_s) * 1e3,
                    "mask_us_mean": statistics.fmean(masks) * 1e6,
                    "mask_us_p50": statistics.median(masks) * 1e6,
                    "mask_us_p99": _percentile(masks, 0.99) * 1e6,
                    "accept_us_mean": statistics.fmean(accepts) * 1e6,
                }
            )
    header = f"{'schema':<20} {'library':<11} {'tokens':>6} {'compile ms':>10} {'mask us':>8} {'p50':>7} {'p99':>8}"
    print(header)
    for r in rows:
        print(
            f"{r['schema']:<20} {r['library']:<11} {r['tokens']:>6} {r['compile_ms']:>10.2f} "
            f"{r['mask_us_mean']:>8.1f} {r['mask_us_p50']:>7.1f} {r['mask_us_p99']:>8.1f}"
        )
    for lib in libraries:
        mine = [r for r in rows if r["library"] == lib.name]
        print(
            f"{lib.name}: tokenizer setup {setup[lib.name] * 1e3:.1f} ms; mean over schemas: compile "
            f"{statistics.fmean(r['compile_ms'] for r in mine):.2f} ms, mask "
            f"{statistics.fmean(r['mask_us_mean'] for r in mine):.1f} us/token"
        )
    tpot = run_tpot(tpot_tokens, (1, 8)) if tpot_tokens else []
    if output_json:
        extra = {"tokenizer_setup_ms": {k: v * 1e3 for k, v in setup.items()}, "tpot": tpot}
        write_report(output_json, rows, extra)
    return rows


def run_tpot(tokens: int, batches: tuple[int, ...], rounds: int = 3) -> list[dict[str, Any]]:
    """Greedy time per output token with and without a grammar (llguidance, in the engine); each the best of
    `rounds` runs, the two alternated (a shared machine's load comes and goes)."""
    from glmserve.engine.llm import LLM
    from glmserve.engine.sampling_params import SamplingParams
    from glmserve.engine.structured_outputs import StructuredOutputParams

    llm = LLM()
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 200}
    rows = []
    for batch in batches:
        prompts = [f"values_{i} = " for i in range(batch)]
        variants = {"free": None, "json schema": StructuredOutputParams(json=schema)}
        seconds: dict[str, float] = {}
        for round_ in range(rounds + 1):  # alternated, best of `rounds` after a warm-up round (compiles the grammar)
            for name, spec in variants.items():
                params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, structured_outputs=spec)
                t0 = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False)
                elapsed = (time.perf_counter() - t0) / tokens
                assert all(len(o.outputs[0].token_ids) == tokens for o in outs)
                if round_:
                    seconds[name] = min(seconds.get(name, elapsed), elapsed)
        rows.append(
            {
                "batch": batch,
                "tpot_ms_free": seconds["free"] * 1e3,
                "tpot_ms_grammar": seconds["json schema"] * 1e3,
                "ratio": seconds["json schema"] / seconds["free"],
            }
        )
    print(f"{'batch':>5} {'TPOT free ms':>12} {'TPOT grammar ms':>15} {'ratio':>6}")
    for r in rows:
        print(f"{r['batch']:>5} {r['tpot_ms_free']:>12.2f} {r['tpot_ms_grammar']:>15.2f} {r['ratio']:>6.3f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="compiles and walks per schema and library")
    parser.add_argument("--tpot-tokens", type=int, default=64, help="tokens per request of the TPOT runs (0: skip)")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    run_bench(args.repeats, args.output_json, args.tpot_tokens)


if __name__ == "__main__":
    main()
