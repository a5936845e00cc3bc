"""The checkpoint's tokenizer: a `tokenizers.Tokenizer` from `tokenizer.json`, its stop tokens and chat template."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from tokenizers import Tokenizer as RustTokenizer

from .chat_template import ChatTemplate, load_chat_template

log = logging.getLogger(__name__)


class _AddedToken(BaseModel):
    model_config = ConfigDict(extra="ignore")

    content: str


class _TokenizerConfigFile(BaseModel):
    """The fields of `tokenizer_config.json` used here; a token may be written as a string or as an object."""

    model_config = ConfigDict(extra="ignore")

    eos_token: str | _AddedToken | None = None
    pad_token: str | _AddedToken | None = None
    bos_token: str | _AddedToken | None = None
    unk_token: str | _AddedToken | None = None
    model_max_length: int | None = None


class _EosField(BaseModel):
    """`eos_token_id` as `config.json` and `generation_config.json` write it: one id, a list, or absent."""

    model_config = ConfigDict(extra="ignore")

    eos_token_id: int | list[int] | None = None


def _read_json_model(path: Path, model: type[BaseModel]) -> Any:
    if not path.is_file():
        return model()
    try:
        return model.model_validate_json(path.read_bytes())
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _content(token: str | _AddedToken | None) -> str | None:
    return token.content if isinstance(token, _AddedToken) else token


class Tokenizer:
    """Text <-> token ids for one checkpoint, plus its stop tokens and chat template."""

    def __init__(
        self,
        tokenizer: RustTokenizer,
        eos_token_ids: Sequence[int],
        special_tokens_map: dict[str, str] | None = None,
        chat_template: ChatTemplate | None = None,
        model_max_length: int | None = None,
    ):
        self._tokenizer = tokenizer
        self.eos_token_ids: list[int] = list(eos_token_ids)
        self.special_tokens_map: dict[str, str] = dict(special_tokens_map or {})
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.special_token_ids: frozenset[int] = frozenset(
            i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` from a checkpoint directory; stop ids come from generation_config.json's
        `eos_token_id`, else config.json's, else tokenizer_config.json's `eos_token`."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json")
        tokenizer = RustTokenizer.from_file(str(tokenizer_file))
        config = _read_json_model(path / "tokenizer_config.json", _TokenizerConfigFile)
        special_tokens_map = {
            name: content
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (content := _content(getattr(config, name))) is not None
        }

        eos_ids: list[int] = []
        for name in ("generation_config.json", "config.json"):
            field = _read_json_model(path / name, _EosField).eos_token_id
            if field is not None:
                eos_ids = [field] if isinstance(field, int) else list(field)
                break
        if not eos_ids and "eos_token" in special_tokens_map:
            eos_id = tokenizer.token_to_id(special_tokens_map["eos_token"])
            eos_ids = [] if eos_id is None else [eos_id]
        if not eos_ids:
            log.warning("%s names no eos token; generation stops only on length or stop strings", path)

        source = load_chat_template(path)
        template = None if source is None else ChatTemplate(source, special_tokens_map)
        return cls(tokenizer, eos_ids, special_tokens_map, template, config.model_max_length)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def pad_token_id(self) -> int | None:
        pad = self.special_tokens_map.get("pad_token")
        return None if pad is None else self._tokenizer.token_to_id(pad)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in the text (as a rendered chat has) become their ids."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)

    def apply_chat_template(
        self,
        messages: Sequence[Any],
        tools: Sequence[Any] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text for `messages` (see `ChatTemplate.render` for the keyword arguments)."""
        if self.chat_template is None:
            raise ValueError("this checkpoint has no chat template")
        return self.chat_template.render(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, **template_kwargs
        )

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_token_ids={self.eos_token_ids})"
