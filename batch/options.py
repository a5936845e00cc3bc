"""`BatchOptions`: where the Files and Batches store lives and how hard batch work may press on a replica. It is the
`batch` field of `ServingConfig` (YAML `batch: {store: /data/batch}`)."""

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

STORE_ENV = "GLMSERVE_BATCH_STORE"


def default_store() -> Path:
    """`$GLMSERVE_BATCH_STORE`, else `~/.cache/glmserve/batch`."""
    return Path(os.environ.get(STORE_ENV) or Path.home() / ".cache" / "glmserve" / "batch")


class BatchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True  # serve /v1/files and /v1/batches and run batches on this replica
    store: str | None = None  # a directory: batch.sqlite3 and files/ (default: `default_store()`)
    # Priority below online requests: at most `max_concurrency` batch lines in flight while the replica has no online
    # request (nor had one in the last `idle_s`), at most `busy_concurrency` while it has.
    max_concurrency: int = Field(8, ge=1, le=1024)
    busy_concurrency: int = Field(1, ge=0, le=1024)  # 0: batch work waits whenever online requests run
    idle_s: float = Field(1.0, ge=0)
    lease_s: float = Field(30.0, gt=0)  # a replica that stops renewing its claim on a batch for this long loses it
    poll_s: float = Field(1.0, gt=0)  # how often a runner looks for work and for a cancel
    retries: int = Field(2, ge=0, le=10)  # per line, after a 429/503 (the replica was overloaded or restarting)
    # bounds on what one client can make the store hold
    max_file_bytes: int = Field(200 << 20, gt=0)  # OpenAI's limit for a batch input file
    max_lines: int = Field(50_000, gt=0)  # requests per batch, as OpenAI
    max_active_batches: int = Field(100, gt=0)  # batches not yet finished, over all clients

    @property
    def store_path(self) -> Path:
        return Path(self.store) if self.store else default_store()
