"""Server-sent events as OpenAI streams them: one `data: {json}` event per chunk, then `data: [DONE]`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: BaseModel | Mapping[str, Any]) -> str:
    """One event carrying a response chunk, or an error body (`APIError.body()`) when a stream fails midway."""
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json()
    else:
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"
