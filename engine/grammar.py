"""Structured output on llguidance: grammars compiled once per spec, a matcher per sequence, token bitmasks.

`GrammarCompiler.compile(spec)` turns a `StructuredOutputParams` into a `Grammar` (llguidance's grammar text,
checked against the tokenizer), cached by spec; a spec the library cannot compile raises `InvalidRequest` naming
`structured_outputs`. It is thread-safe, so the API layer can compile a request's grammar on its own threads before
the engine sees it, and the engine finds it cached. Each sequence gets a `GrammarMatcher` (a copy of the grammar's
start state, ~10 us): it fills a row of an int32 bitmask (bit t of word t // 32: token t may come next), advances
with every token the sequence keeps, and can fill the row it would have after a few more tokens (drafts), rolling
back afterwards, so speculative verification masks each position by the state after the drafts before it.

The tokenizer is given to llguidance token by token: the checkpoint's special tokens (eos, role markers) are never
text, so a JSON string cannot contain them; GLM's non-special added tokens (`<think>`, `</think>`, `<tool_call>`,
`<arg_key>`, ...) are their text, as the detokenizer and the API's parsers see them.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from typing import Any

import llguidance
import torch

from glmserve.model.tokenizer import Tokenizer

from .structured_outputs import StructuredOutputParams
from .validation import InvalidRequest

log = logging.getLogger(__name__)
PARAM = "structured_outputs"
CACHE_SIZE = 512  # compiled grammars kept (each a few hundred KB at most for the schemas requests send)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a BPE vocabulary writes for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class _Vocabulary:
    """What llguidance's `TokenizerWrapper` reads: every token's bytes, the special ids, and a tokenize call."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        rust = tokenizer._tokenizer
        added = rust.get_added_tokens_decoder()
        decoder = _byte_decoder()
        byte_level = all(c in decoder for c in (rust.id_to_token(i) or "" for i in range(min(256, vocab_size))))
        self.tokens: list[bytes] = []
        special = set(tokenizer.special_token_ids)
        for i in range(vocab_size):
            piece = rust.id_to_token(i)
            if i in added:
                self.tokens.append(added[i].content.encode())
            elif piece is None:  # rows of a padded embedding: no token, never allowed
                self.tokens.append(f"<[{i}]>".encode())
                special.add(i)
            elif byte_level and all(c in decoder for c in piece):
                self.tokens.append(bytes(decoder[c] for c in piece))
            else:
                self.tokens.append(tokenizer.decode([i]).encode())
        self.special_token_ids = sorted(special)
        self.eos_token_id = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
        self.bos_token_id = None
        self._rust = rust

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._rust.encode(text, add_special_tokens=False).ids


class Grammar:
    """A compiled grammar: its start state, never advanced itself."""

    def __init__(self, start: llguidance.LLMatcher, words: int):
        self._start = start
        self.words = words

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._start.deep_copy(), self.words)


class GrammarMatcher:
    """One sequence's place in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, words: int):
        self._m = matcher
        self.words = words

    def accept(self, token: int) -> bool:
        """Advance by a token the sequence keeps; False if the grammar does not allow it."""
        return self._m.consume_token(token)

    @property
    def is_stopped(self) -> bool:
        """The grammar is complete and allows nothing more (but eos): the sequence is done."""
        return self._m.is_stopped()

    @property
    def is_error(self) -> bool:
        return self._m.is_error()

    def fill(self, row: torch.Tensor, after: list[int] | tuple[int, ...] = ()) -> None:
        """Write the allowed next tokens into `row` (int32 [words], contiguous, CPU), as the state would be after
        consuming `after` too (drafts not yet verified; the matcher is rolled back). A row no state can reach (the
        grammar rejects `after`, or allows nothing) is left all ones: it is never sampled from, and a row of -inf
        would only make NaN."""
        m = self._m
        n = len(after)
        if n and (m.validate_tokens(list(after)) < n or not m.consume_tokens(list(after))):
            row.fill_(-1)
            return
        try:
            m.unsafe_compute_mask_ptr(row.data_ptr(), self.words * 4)
        finally:
            if n:
                m.rollback(n)
        if not bool(row.any()):
            row.fill_(-1)


class GrammarCompiler:
    """Compiles structured-output specs for one tokenizer; thread-safe, with an LRU cache."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int | None = None, cache_size: int = CACHE_SIZE):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size or tokenizer.vocab_size
        self.words = (self.vocab_size + 31) // 32
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._limits = llguidance.LLParserLimits(verbose_errors=False)

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:  # built on first use (~30 ms for 8K tokens): most engines never need it
                vocab = _Vocabulary(self.tokenizer, self.vocab_size)
                self._ll_tokenizer = llguidance.LLTokenizer(
                    llguidance.TokenizerWrapper(vocab), n_vocab=self.vocab_size, eos_token=self.tokenizer.eos_token_ids
                )
            return self._ll_tokenizer

    def compile(self, spec: StructuredOutputParams) -> Grammar:
        key = spec.cache_key()
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
                return grammar
        grammar = self._compile(spec)  # outside the lock: the library drops the GIL while it builds
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _compile(self, spec: StructuredOutputParams) -> Grammar:
        text = llguidance_grammar(spec)
        matcher = llguidance.LLMatcher(self.ll_tokenizer, text, log_level=0, limits=self._limits)
        if matcher.is_error():
            raise InvalidRequest(f"the {spec.kind} cannot be compiled: {_first_line(matcher.get_error())}", PARAM)
        return Grammar(matcher, self.words)


def _first_line(message: str) -> str:
    """The library's message, short: its first lines (later ones repeat the input back)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return " ".join(lines[:3])[:500] if lines else "unknown error"


# keywords whose value is a schema, a list of schemas, or a map of names to schemas
_SUBSCHEMA = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames", "unevaluatedItems")
_SUBSCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")


def closed_objects(schema: Any) -> Any:
    """A copy of a JSON schema in which every object schema that declares `properties` but says nothing of
    `additionalProperties` (or `patternProperties`) takes no others. Every instance of the copy is an instance of
    the original."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA:
        if key in out:
            out[key] = closed_objects(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(s) for name, s in out[key].items()}
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = closed_objects(out["additionalProperties"])
    elif "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def _json_entry(schema: dict[str, Any], spec: StructuredOutputParams) -> dict[str, Any]:
    if spec.disable_additional_properties:
        schema = closed_objects(schema)
    options: dict[str, Any] = {"whitespace_flexible": not spec.disable_any_whitespace, "lenient": not spec.strict}
    if spec.disable_any_whitespace:
        options.update(item_separator=", ", key_separator=": ")
    return {"json_schema": {**schema, "x-guidance": options}}


def _body(spec: StructuredOutputParams) -> dict[str, Any]:
    """The grammar of the constrained output, as one entry of llguidance's grammar list."""
    kind = spec.kind
    if kind == "json":
        return _json_entry(spec.json_schema, spec)
    if kind == "json_object":
        return _json_entry({"type": "object"}, spec)
    if kind == "regex":
        return {"lark_grammar": f"start: /{llguidance.regex_to_lark(spec.regex)}/"}
    if kind == "choice":
        return {"lark_grammar": "start: " + " | ".join(json.dumps(c) for c in spec.choice)}
    text = spec.grammar
    if "::=" in text:  # GBNF (llama.cpp's, what vLLM's xgrammar backend takes)
        try:
            text = llguidance.gbnf_to_lark.any_to_lark(text)
        except Exception as e:  # the converter raises its own error types
            raise InvalidRequest(f"the grammar is neither Lark nor valid GBNF: {e}", PARAM) from None
    return {"lark_grammar": text}


def llguidance_grammar(spec: StructuredOutputParams) -> str:
    """llguidance's grammar text for a spec (a JSON list of grammars, the first the start)."""
    body = _body(spec)
    if spec.reasoning_end is None:
        return json.dumps({"grammars": [body]})
    # free text up to the first reasoning_end (lazy: the shortest match), then the body
    end = llguidance.regex_to_lark(_regex_escape(spec.reasoning_end))
    top = {"lark_grammar": f"start: reasoning @body\nreasoning[lazy]: /(?s:.*){end}/"}
    return json.dumps({"grammars": [top, {"name": "body", **body}]})


def _regex_escape(text: str) -> str:
    """Literal text as a regex (Rust regex syntax: escaping `<` or `/` would be an error there)."""
    return "".join("\\" + c if c in r"\.^$|?*+()[]{}-#&~" else c for c in text)
