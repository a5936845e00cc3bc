"""The API over a real decode worker (the embedded model, colocated or with a prefill worker) behind uvicorn, in this
process, so that tests can look at the worker's state while clients talk to it."""

import contextlib
import threading
import time
from collections.abc import Iterator

import uvicorn
from server_process import free_port

from glmserve.api.app import create_app
from glmserve.api.openai_server import OpenAIServer
from glmserve.decode.server import DecodeWorker
from glmserve.engine.engine_args import EngineArgs
from glmserve.model.default_checkpoint import default_checkpoint
from glmserve.model.tokenizer import Tokenizer
from glmserve.prefill.worker import PrefillWorker

KV_BUDGET = 256 << 20
MAX_MODEL_LEN = 4096  # the embedded model's
BODY_LIMIT = 4 << 20
MODEL_NAME = "glm5-tiny"


@contextlib.contextmanager
def serving(
    prefill: PrefillWorker | None = None, server_options: dict | None = None, **app_options
) -> Iterator[tuple[str, DecodeWorker, OpenAIServer]]:
    """Yields the base URL, the decode worker and the API server. `server_options` go to `OpenAIServer` (admission,
    quotas), `app_options` to `create_app` (api_keys, ...)."""
    args = EngineArgs(kv_cache_memory_bytes=KV_BUDGET)
    if prefill is None:
        worker = DecodeWorker(args)
    else:  # disaggregated: prompts of 100 tokens and more go through the prefill worker
        worker = DecodeWorker(args, prefill=prefill.prefill, local_prefill_threshold=100)
    server = OpenAIServer(
        worker,
        Tokenizer.from_pretrained(default_checkpoint()),
        MODEL_NAME,
        max_model_len=MAX_MODEL_LEN,
        **(server_options or {}),
    )
    app = create_app(server, max_body_bytes=BODY_LIMIT, **app_options)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    http = uvicorn.Server(config)
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not http.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", worker, server
    finally:
        http.should_exit = True
        thread.join(timeout=10)
        worker.shutdown()
