"""A replica's API with the batch endpoints, without Ray: the embedded model behind a colocated decode worker, the
OpenAI server, `create_app` and `attach_batch_api`, served by uvicorn (lifespan on, so the batch runner starts and
stops with it as it does under Ray Serve).

In a thread of the test (`serving`), or as a process of its own to be killed (`python tests/batch_server.py --store
DIR --port P`)."""

import argparse
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from glmserve.api.app import create_app
from glmserve.api.openai_server import OpenAIServer
from glmserve.batch.options import BatchOptions
from glmserve.batch.routes import attach_batch_api
from glmserve.decode.server import DecodeWorker
from glmserve.engine.engine_args import EngineArgs
from glmserve.model.default_checkpoint import default_checkpoint
from glmserve.model.tokenizer import Tokenizer

KV_BUDGET = 256 << 20
MAX_MODEL_LEN = 4096  # the embedded model's
MODEL = "glm5-tiny"


def build(options: BatchOptions):
    worker = DecodeWorker(EngineArgs(kv_cache_memory_bytes=KV_BUDGET))
    server = OpenAIServer(worker, Tokenizer.from_pretrained(default_checkpoint()), MODEL, max_model_len=MAX_MODEL_LEN)
    app = create_app(server)
    runner = attach_batch_api(app, server, options)
    return app, worker, runner


@contextlib.contextmanager
def serving(options: BatchOptions, port: int) -> Iterator[tuple[str, object]]:
    app, worker, runner = build(options)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    http = uvicorn.Server(config)
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not http.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", runner
    finally:
        http.should_exit = True
        thread.join(timeout=30)
        worker.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True, type=Path)
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--max-concurrency", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = BatchOptions(store=str(args.store), max_concurrency=args.max_concurrency, poll_s=0.2)
    app, worker, _ = build(options)
    try:
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", lifespan="on")
    finally:
        worker.shutdown()


if __name__ == "__main__":
    main()
