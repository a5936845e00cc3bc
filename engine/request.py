"""What the router sends a decode worker: a tokenized prompt and its sampling parameters."""

from pydantic import BaseModel, Field

from glmserve.engine.sampling_params import SamplingParams


class EngineRequest(BaseModel):
    request_id: str
    prompt_token_ids: list[int] = Field(min_length=1)
    params: SamplingParams
