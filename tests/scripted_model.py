"""A real glm5-tiny-shaped checkpoint whose greedy output is scripted: every block's output projections are zero,
so the last hidden state is the current token's embedding, and lm_head maps chosen tokens to chosen successors.

Served by the real engine, it lets end-to-end tests demand exact outputs: reasoning that ends in </think>, a GLM
tool call, plain text.
"""

import shutil
from pathlib import Path

import torch

from glmserve.model.config import GlmConfig
from glmserve.model.default_checkpoint import PACKAGED, random_init_
from glmserve.model.glm import GlmForCausalLM
from glmserve.model.tokenizer import Tokenizer
from glmserve.model.weights import save_weights

THINK_CHAIN = "<think>I should call the forecast tool.</think>"
TOOL_CHAIN = (
    '</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris, "FR"</arg_value></tool_call><|observation|>'
)
TEXT_CHAIN = "Once upon a time lived my python<|endoftext|>"  # follows the token "Once"


def successor_pairs(tokenizer: Tokenizer, chains: list[str]) -> dict[int, int]:
    pairs: dict[int, int] = {}
    for chain in chains:
        ids = tokenizer.encode(chain)
        for a, b in zip(ids, ids[1:], strict=False):
            if pairs.setdefault(a, b) != b:
                raise ValueError(f"token {tokenizer.decode([a])!r} would need two successors")
    return pairs


def make_scripted_checkpoint(path: Path, chains: tuple[str, ...] = (THINK_CHAIN, TOOL_CHAIN, TEXT_CHAIN)) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(PACKAGED / name, path / name)
    tokenizer = Tokenizer.from_pretrained(path)
    model = GlmForCausalLM(GlmConfig.from_pretrained(path))
    random_init_(model, seed=5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()  # every block adds nothing: the residual stream stays the token embedding
        embed = model.model.embed_tokens.weight
        embed.copy_(torch.randn(embed.shape, generator=torch.Generator().manual_seed(0)))
        head = model.lm_head.weight
        head.zero_()
        for a, b in successor_pairs(tokenizer, list(chains)).items():
            head[b] += embed[a] / embed[a].norm()
        # The MTP layer passes the next token's embedding through, so it drafts that token's successor: the
        # script's continuation, always accepted under greedy decoding.
        hidden = embed.shape[1]
        model.mtp.eh_proj.weight.copy_(torch.cat((torch.eye(hidden), torch.zeros(hidden, hidden)), dim=1))
    save_weights(model, path, dtype=torch.float32)
    return path
