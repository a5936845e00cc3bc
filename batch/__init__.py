"""Batch jobs: the OpenAI Files and Batches API on a durable store (`attach_batch_api`, `BatchStore`,
`BatchRunner`), and `glmserve batch` on Ray Data (`batch.job`). Sits on top of `api/` and `engine/`, beside
`cluster/` (which attaches the API to its replicas). Heavy modules load on first use."""

__all__ = ["BatchOptions", "BatchRunner", "BatchStore", "attach_batch_api"]

_WHERE = {
    "BatchOptions": "options",
    "BatchRunner": "runner",
    "BatchStore": "store",
    "attach_batch_api": "routes",
}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
