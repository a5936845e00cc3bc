"""A small transformers-made checkpoint the engine can serve (weights from transformers, tokenizer from glm5-tiny),
and greedy references computed by repeated full forwards of glmserve's reference model."""

import shutil
from pathlib import Path

import torch
from hf_models import make_hf_model

from glmserve.decode.server import DecodeWorker
from glmserve.engine.request import EngineRequest
from glmserve.engine.sampling_params import SamplingParams
from glmserve.model import load_model
from glmserve.model.default_checkpoint import PACKAGED


def make_engine_checkpoint(path: Path, seed: int = 11, **overrides) -> Path:
    make_hf_model(path, seed=seed, **overrides)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(PACKAGED / name, path / name)
    return path


def random_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


async def generate_tokens(worker: DecodeWorker, rid: str, prompt: list[int], params: SamplingParams) -> list[int]:
    """The token ids a decode worker streams for one request."""
    tokens = []
    async for out in worker.generate(EngineRequest(request_id=rid, prompt_token_ids=prompt, params=params)):
        for delta in out.deltas:
            tokens += delta.token_ids
    return tokens


class GreedyReference:
    """Greedy continuations and their logprobs by full forwards of the reference model (no cache)."""

    def __init__(self, path: Path):
        self.model = load_model(path)

    def continue_(self, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
        ids, logprobs = list(prompt), []
        with torch.no_grad():
            for _ in range(n):
                row = self.model(torch.tensor([ids]))[0, -1].float().log_softmax(-1)
                token = int(row.argmax())
                ids.append(token)
                logprobs.append(float(row[token]))
        return ids[len(prompt) :], logprobs
