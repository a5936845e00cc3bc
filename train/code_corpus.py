"""The training corpus of glm5-tiny: Python source found on this machine, tokenized and saved as token arrays.

    python -m glmserve.train.code_corpus --out .data

Training files are the standard library's `*.py` files plus a capped share of each installed package in
site-packages; evaluation files are the standard library's held-out files. Both roots use the tokenizer's rule
(`train_tokenizer.is_heldout` on the path relative to the root), so no held-out file is trained on, and
site-packages files that are near-copies of held-out files (forks, backports) are dropped. Files are
tokenized with the packaged tokenizer and joined into one stream, each followed by `<|endoftext|>`; the streams are
saved as compressed uint16 arrays (`.npz`) with a `corpus.json` that says what went in. Tokenize once here and carry
the arrays to a machine whose Python (and so whose standard library) differs.
"""

from __future__ import annotations

import argparse
import logging
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel
from tqdm import tqdm

from glmserve.model.default_checkpoint import PACKAGED
from glmserve.model.tokenizer import Tokenizer

from .train_tokenizer import EOS_TOKEN, corpus_files, is_heldout, stdlib_root

log = logging.getLogger(__name__)

TRAIN_FILE = "train.npz"
HELDOUT_FILE = "heldout.npz"
INFO_FILE = "corpus.json"
# Larger files are mostly generated tables (unicode data, parser tables), not code people write.
MAX_FILE_BYTES = 200_000
# Per top-level package in site-packages, so a few huge packages (torch, transformers, sympy) do not dominate.
PACKAGE_BYTES = 2_000_000
ENCODE_BATCH = 64
# Site-packages files that share this much of their long lines with held-out files are near-copies of them
# (setuptools/_distutils forks distutils, importlib_metadata backports importlib.metadata): they are dropped.
OVERLAP_LIMIT = 0.2
LONG_LINE = 30


class CorpusInfo(BaseModel):
    """What `corpus.json` records about the saved token streams."""

    tokenizer: str
    eos_token_id: int
    train_files: int
    train_tokens: int
    heldout_files: int
    heldout_tokens: int
    stdlib_root: str
    site_packages_root: str | None
    site_packages_files: int
    site_packages_near_copies_dropped: int


def site_packages_root() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def site_packages_files(root: Path, heldout: bool = False, package_bytes: int = PACKAGE_BYTES) -> list[Path]:
    """Relative paths of site-packages `*.py` files in the chosen split: per top-level package, files in sorted order
    until the package's share of `package_bytes` is used; files over MAX_FILE_BYTES are skipped."""
    by_package: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if not path.is_file() or is_heldout(rel) != heldout:
            continue
        by_package.setdefault(rel.parts[0], []).append(rel)
    chosen = []
    for files in by_package.values():
        used = 0
        for rel in files:
            size = (root / rel).stat().st_size
            if size > MAX_FILE_BYTES:
                continue
            if used + size > package_bytes:
                break
            used += size
            chosen.append(rel)
    return chosen


def _long_lines(text: str) -> list[str]:
    return [line for line in map(str.strip, text.splitlines()) if len(line) >= LONG_LINE]


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        log.debug("skipping unreadable file %s", path)
        return None


def drop_near_copies(root: Path, files: Sequence[Path], heldout_root: Path, heldout: Sequence[Path]) -> list[Path]:
    """`files` without those whose long lines (>= LONG_LINE characters, stripped) appear in the held-out files
    for OVERLAP_LIMIT or more of their count."""
    seen = {line for rel in heldout if (text := _read(heldout_root / rel)) is not None for line in _long_lines(text)}
    kept = []
    for rel in files:
        lines = _long_lines(_read(root / rel) or "")
        if not lines or sum(line in seen for line in lines) < OVERLAP_LIMIT * len(lines):
            kept.append(rel)
    return kept


def tokenize_files(tokenizer: Tokenizer, root: Path, files: Sequence[Path], desc: str) -> np.ndarray:
    """One uint16 stream: each readable UTF-8 file's tokens followed by the end-of-text token."""
    eos = tokenizer.token_to_id(EOS_TOKEN)
    if eos is None or tokenizer.vocab_size > np.iinfo(np.uint16).max + 1:
        raise ValueError("the tokenizer needs an end-of-text token and at most 65536 ids")
    chunks = []
    with tqdm(total=len(files), desc=desc, unit="file") as bar:
        for start in range(0, len(files), ENCODE_BATCH):
            texts = [text for rel in files[start : start + ENCODE_BATCH] if (text := _read(root / rel)) is not None]
            for ids in tokenizer.encode_batch(texts):
                chunks.append(np.asarray(ids + [eos], dtype=np.uint16))
            bar.update(len(files[start : start + ENCODE_BATCH]))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint16)


def build(out: Path, site_packages: bool = True, package_bytes: int = PACKAGE_BYTES) -> CorpusInfo:
    """Tokenize the corpus into `out` (train.npz, heldout.npz, corpus.json) and return what was written."""
    tokenizer = Tokenizer.from_pretrained(PACKAGED)
    std_root = stdlib_root()
    std_train, std_heldout = corpus_files(std_root), corpus_files(std_root, heldout=True)
    train = [tokenize_files(tokenizer, std_root, std_train, "stdlib (train)")]
    sp_root, sp_files, dropped = site_packages_root(), [], 0
    if site_packages:
        candidates = site_packages_files(sp_root, package_bytes=package_bytes)
        sp_files = drop_near_copies(sp_root, candidates, std_root, std_heldout)
        dropped = len(candidates) - len(sp_files)
        train.append(tokenize_files(tokenizer, sp_root, sp_files, "site-packages (train)"))
    train_tokens = np.concatenate(train)
    heldout_tokens = tokenize_files(tokenizer, std_root, std_heldout, "stdlib (held out)")

    out.mkdir(parents=True, exist_ok=True)
    save_tokens(out, "train", train_tokens)
    save_tokens(out, "heldout", heldout_tokens)
    info = CorpusInfo(
        tokenizer=str(PACKAGED / "tokenizer.json"),
        eos_token_id=tokenizer.token_to_id(EOS_TOKEN),
        train_files=len(std_train) + len(sp_files),
        train_tokens=len(train_tokens),
        heldout_files=len(std_heldout),
        heldout_tokens=len(heldout_tokens),
        stdlib_root=str(std_root),
        site_packages_root=str(sp_root) if site_packages else None,
        site_packages_files=len(sp_files),
        site_packages_near_copies_dropped=dropped,
    )
    (out / INFO_FILE).write_text(info.model_dump_json(indent=2) + "\n")
    return info


def load_info(data: Path) -> CorpusInfo:
    return CorpusInfo.model_validate_json((data / INFO_FILE).read_text())


def _split_file(data: Path, split: str) -> Path:
    names = {"train": TRAIN_FILE, "heldout": HELDOUT_FILE}
    if split not in names:
        raise ValueError(f"split must be one of {sorted(names)}, got {split!r}")
    return data / names[split]


def save_tokens(data: Path, split: str, tokens: np.ndarray) -> None:
    np.savez_compressed(_split_file(data, split), tokens=tokens.astype(np.uint16))  # code tokens compress ~3x


def load_tokens(data: Path, split: str) -> np.ndarray:
    """The saved uint16 stream of `split` ("train" or "heldout")."""
    with np.load(_split_file(data, split)) as arrays:
        return arrays["tokens"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for train.npz, heldout.npz, corpus.json")
    parser.add_argument("--no-site-packages", action="store_true", help="train on the standard library alone")
    parser.add_argument("--package-bytes", type=int, default=PACKAGE_BYTES, help="source bytes per package")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    info = build(args.out, site_packages=not args.no_site_packages, package_bytes=args.package_bytes)
    log.info("wrote %s: %s", args.out, info.model_dump())


if __name__ == "__main__":
    main()
