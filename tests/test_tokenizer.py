import json
import random

import pytest

from glmserve.engine.detokenizer import IncrementalDetokenizer
from glmserve.model.default_checkpoint import PACKAGED
from glmserve.model.tokenizer import Tokenizer
from glmserve.train import train_tokenizer

CHECKPOINT = PACKAGED

TEXTS = [
    "",
    "hello world",
    "def f(x):\n    return x ** 2  # square\r\n\tpass\n\n\n",
    "héllo wörld, ça va? Ångström ñ ß",
    "中文分词测试，日本語のテキスト、한국어 텍스트",
    "emoji 🎉🚀 family 👨‍👩‍👧‍👦 flags 🇯🇵🇫🇷 skin 👍🏽 keycap 1️⃣",
    "combining e\u0301 a\u0308 zero\u200bwidth \u00a0nbsp \ufeffbom",
    "control \x00\x01\x7f bell\x07 and a literal \ufffd replacement char",
    "mixed <|user|> special <think>inside</think> text<|endoftext|>",
    "   leading and trailing spaces   ",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝕏 and 4-byte 𐍈 gothic",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained(CHECKPOINT)


def random_text(rng: random.Random, length: int) -> str:
    """Text mixing ASCII, accented Latin, CJK, emoji and other planes (no surrogates, which UTF-8 cannot hold)."""
    ranges = [(0x20, 0x7E), (0x0A, 0x0A), (0xC0, 0x17F), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F), (0x10000, 0x1034F)]
    chars = []
    for _ in range(length):
        lo, hi = rng.choice(ranges)
        chars.append(chr(rng.randint(lo, hi)))
    return "".join(chars)


def test_vocab_size_matches_config(tokenizer):
    config = json.loads((CHECKPOINT / "config.json").read_text())
    assert tokenizer.vocab_size == config["vocab_size"] == 8192
    ids = {tokenizer.token_to_id(tokenizer.id_to_token(i)) for i in range(tokenizer.vocab_size)}
    assert ids == set(range(8192))
    assert tokenizer.id_to_token(8192) is None


def test_special_tokens_are_single_tokens_with_expected_ids(tokenizer):
    first = tokenizer.vocab_size - len(train_tokenizer.SPECIAL_TOKENS)  # they follow the BPE vocabulary, as in GLM
    for offset, token in enumerate(train_tokenizer.SPECIAL_TOKENS):
        token_id = first + offset
        assert tokenizer.token_to_id(token) == token_id
        assert tokenizer.encode(token) == [token_id]
        assert tokenizer.encode(f"a{token}b")[1:-1] == [token_id]  # never split, whatever surrounds it
        assert tokenizer.decode([token_id]) == token
    control = {tokenizer.token_to_id(t) for t in train_tokenizer.SPECIAL_TOKENS} - {
        tokenizer.token_to_id(t) for t in train_tokenizer.MARKUP_TOKENS
    }
    assert tokenizer.special_token_ids == control
    assert tokenizer.decode(tokenizer.encode("x<|user|>y"), skip_special_tokens=True) == "xy"
    # reasoning and tool-call tags survive skip_special_tokens: the API's parsers read them
    markup = "<think>a</think><tool_call>f<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>"
    assert tokenizer.decode(tokenizer.encode(markup), skip_special_tokens=True) == markup


def test_stop_and_pad_ids_in_config(tokenizer):
    config = json.loads((CHECKPOINT / "config.json").read_text())
    endoftext, user, observation = (tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>"))
    assert config["eos_token_id"] == [endoftext, user, observation]
    assert config["pad_token_id"] == endoftext == tokenizer.pad_token_id
    assert config["bos_token_id"] is None
    assert tokenizer.eos_token_ids == config["eos_token_id"]


def test_eos_falls_back_to_tokenizer_config(tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((CHECKPOINT / name).read_bytes())
    assert Tokenizer.from_pretrained(tmp_path).eos_token_ids == [8175]
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 8179}')
    assert Tokenizer.from_pretrained(tmp_path).eos_token_ids == [8179]


def test_round_trip(tokenizer):
    rng = random.Random(0)
    texts = TEXTS + [random_text(rng, rng.randint(1, 300)) for _ in range(50)]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_matches_transformers(tokenizer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(CHECKPOINT)
    assert len(hf) == tokenizer.vocab_size
    assert hf.eos_token_id == tokenizer.eos_token_ids[0] and hf.pad_token_id == tokenizer.pad_token_id
    assert sorted(hf.all_special_ids) == sorted(tokenizer.special_token_ids)
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tokenizer.encode(text)


@pytest.mark.slow
def test_code_compresses(tokenizer):
    """A tokenizer trained on Python source should need far fewer tokens than bytes on held-out Python."""
    root = train_tokenizer.stdlib_root()
    heldout = train_tokenizer.corpus_files(root, heldout=True)[:20]
    text = "".join((root / p).read_text(encoding="utf-8", errors="replace") for p in heldout)
    assert len(text.encode()) / len(tokenizer.encode(text)) > 3.0


@pytest.mark.slow
def test_heldout_rule():
    root = train_tokenizer.stdlib_root()
    train, heldout = train_tokenizer.corpus_files(root), train_tokenizer.corpus_files(root, heldout=True)
    assert train == sorted(train) and not set(train) & set(heldout)
    assert 0.05 < len(heldout) / (len(train) + len(heldout)) < 0.15
    # the rule reads only the relative path, so it holds wherever Python is installed
    assert all(train_tokenizer.is_heldout(str(p)) for p in heldout)
    assert not any(train_tokenizer.is_heldout(p.as_posix()) for p in train)


def test_training_is_deterministic():
    root = train_tokenizer.stdlib_root()
    files = train_tokenizer.corpus_files(root)[:8]

    def train_once() -> str:
        texts = train_tokenizer.read_texts(root, files, progress=False)
        tokenizer = train_tokenizer.train(texts, len(files), vocab_size=600, progress=False)
        return tokenizer.to_str()

    first, second = train_once(), train_once()
    assert first == second
    assert len(json.loads(first)["model"]["vocab"]) == 600 - len(train_tokenizer.SPECIAL_TOKENS)


def test_committed_tokenizer_is_modest():
    assert (CHECKPOINT / "tokenizer.json").stat().st_size < 2_000_000


def stream(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> list[str]:
    """Feed ids in random chunks of 1-3; returns every delta, the flush last."""
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        chunk = ids[i : i + n]
        deltas.append(detok.add(chunk[0] if n == 1 else chunk))
        i += n
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_incremental_detokenizer_matches_full_decode(tokenizer, skip_special_tokens):
    rng = random.Random(1)
    texts = TEXTS + [random_text(rng, rng.randint(1, 200)) for _ in range(30)]
    for text in texts:
        ids = tokenizer.encode(text)
        deltas = stream(IncrementalDetokenizer(tokenizer, skip_special_tokens), ids, rng)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if "\ufffd" not in text:
            assert not any("\ufffd" in d for d in deltas)  # a split character is held back, never replaced


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_incremental_detokenizer_on_random_ids(tokenizer, skip_special_tokens):
    """Arbitrary ids spell invalid UTF-8 and specials mid-character; the deltas still add up to decode(ids)."""
    rng = random.Random(2)
    for _ in range(40):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 60))]
        deltas = stream(IncrementalDetokenizer(tokenizer, skip_special_tokens), ids, rng)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_incremental_detokenizer_holds_split_character(tokenizer):
    # a 4-byte emoji the tokenizer spells with several byte tokens
    ids = tokenizer.encode("🦩")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.add(i) for i in ids] == [""] * (len(ids) - 1) + ["🦩"]
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.add(ids[:-1]) == "" and detok.flush() == tokenizer.decode(ids[:-1])


def test_incremental_detokenizer_work_per_token_is_bounded(tokenizer):
    """Each step decodes a short window, not the whole sequence: total decoded ids grow linearly."""
    rng = random.Random(3)
    ids = tokenizer.encode(random_text(rng, 3000))
    counting = CountingDecoder(tokenizer)
    detok = IncrementalDetokenizer(counting)
    text = "".join(detok.add(i) for i in ids) + detok.flush()
    assert text == tokenizer.decode(ids)
    assert counting.decoded_ids < 12 * len(ids)


class CountingDecoder:
    """A tokenizer stand-in that counts the ids it is asked to decode."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.decoded_ids = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        self.decoded_ids += len(ids)
        return self.tokenizer.decode(ids, skip_special_tokens)
