"""Train the byte-level BPE tokenizer of the embedded glm5-tiny checkpoint on the Python standard library.

    python -m glmserve.train.train_tokenizer --out DIR

The corpus is every `*.py` file under the standard library (site-packages excluded), read in sorted order. A file
whose relative path hashes to 0 mod 10 is held out for evaluation (`is_heldout`); model training reuses the rule.
The BPE vocabulary fills `vocab_size - len(SPECIAL_TOKENS)` ids; the GLM special tokens follow it, in GLM's order,
as GLM-5 places them after its BPE vocabulary. Training is deterministic: same Python, same files, same output.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePath

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from glmserve.model.default_checkpoint import PACKAGED

log = logging.getLogger(__name__)

DEFAULT_OUT = PACKAGED
VOCAB_SIZE = 8192
MODEL_MAX_LENGTH = 4096

# GLM's special tokens in GLM's relative id order (GLM-5.2: <|endoftext|> 154820, <|user|> 154827, ...).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
)
EOS_TOKEN = "<|endoftext|>"
# Markup the model writes as text: reasoning and tool-call tags. They stay single tokens but are not "special", so
# decoding with skip_special_tokens keeps them for the reasoning and tool-call parsers (as GLM's own tokenizer does).
MARKUP_TOKENS = frozenset(
    ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
    + ("<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>")
)
STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")  # GLM-5.2's eos_token_id order

# GPT-4 style split (GLM's tokenizer uses the same one): letters, 1-3 digit numbers, punctuation runs, whitespace.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def is_heldout(path: str | PurePath) -> bool:
    """True for evaluation files: the path relative to its corpus root (e.g. `json/decoder.py`) hashes to 0 mod 10.

    A stable hash of the relative POSIX path, so the split does not depend on where Python is installed.
    """
    key = PurePath(path).as_posix().encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % 10 == 0


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path | None = None, heldout: bool = False) -> list[Path]:
    """Sorted relative paths of the `*.py` files under `root` (default: the stdlib) in the chosen split."""
    root = stdlib_root() if root is None else root
    relative = sorted(p.relative_to(root) for p in root.rglob("*.py") if p.is_file())
    relative = [p for p in relative if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    return [p for p in relative if is_heldout(p) == heldout]


def read_texts(root: Path, files: Sequence[Path], progress: bool = True) -> Iterator[str]:
    """File contents in order; files that are not valid UTF-8 are skipped (a few stdlib tests are latin-1)."""
    for rel in tqdm(files, desc="reading corpus", unit="file", disable=not progress):
        try:
            yield (root / rel).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            log.debug("skipping non-UTF-8 file %s", rel)


def train(
    texts: Iterator[str],
    num_files: int,
    vocab_size: int = VOCAB_SIZE,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    progress: bool = True,
) -> Tokenizer:
    """A byte-level BPE with exactly `vocab_size` ids: BPE tokens first, then `special_tokens`."""
    bpe_size = vocab_size - len(special_tokens)
    if bpe_size < 256:
        raise ValueError(f"vocab_size {vocab_size} leaves no room beyond the 256 byte tokens and the special tokens")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so any text encodes
        show_progress=progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=num_files)
    if tokenizer.get_vocab_size() != bpe_size:
        raise RuntimeError(f"corpus too small: BPE reached {tokenizer.get_vocab_size()} of {bpe_size} tokens")
    for token in special_tokens:  # one at a time: ids follow the order given
        if token in MARKUP_TOKENS:
            tokenizer.add_tokens([AddedToken(token, special=False, normalized=False)])
        else:
            tokenizer.add_special_tokens([token])
    return tokenizer


def tokenizer_config(tokenizer: Tokenizer, model_max_length: int = MODEL_MAX_LENGTH) -> dict:
    """`tokenizer_config.json` as a Hub checkpoint writes it, so `transformers.AutoTokenizer` loads the directory."""
    added = {
        str(token_id): {
            "content": token.content,
            "lstrip": token.lstrip,
            "normalized": token.normalized,
            "rstrip": token.rstrip,
            "single_word": token.single_word,
            "special": token.special,
        }
        for token_id, token in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    specials = [t["content"] for t in added.values() if t["special"] and t["content"] != EOS_TOKEN]
    return {
        "added_tokens_decoder": added,
        "additional_special_tokens": specials,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def save(tokenizer: Tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = json.dumps(tokenizer_config(tokenizer), indent=2, ensure_ascii=False)
    (out / "tokenizer_config.json").write_text(config + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for tokenizer.json and its config")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    parser.add_argument("--root", type=Path, default=None, help="corpus root (default: the standard library)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    root = stdlib_root() if args.root is None else args.root
    files = corpus_files(root)
    log.info("training on %d files under %s (%d held out)", len(files), root, len(corpus_files(root, heldout=True)))
    tokenizer = train(read_texts(root, files), len(files), vocab_size=args.vocab_size)
    save(tokenizer, args.out)
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    log.info("wrote %s: vocab %d, special ids %s", args.out, tokenizer.get_vocab_size(), ids)
    log.info("eos_token_id %s", [ids[t] for t in STOP_TOKENS])


if __name__ == "__main__":
    main()
