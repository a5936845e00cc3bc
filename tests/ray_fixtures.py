"""What the Ray tests share: one local Ray per test module, and the check that a parallel replica's ranks agree."""

from collections.abc import Iterator

import ray
from ray import serve

from glmserve.cluster.parallel_engine import ParallelEngine


def local_ray() -> Iterator[None]:
    """Body of a module-scoped fixture: a local Ray of 8 logical CPUs for the module, Serve shut down after it."""
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    serve.shutdown()
    ray.shutdown()


def assert_ranks_agree_and_idle(engine: ParallelEngine) -> None:
    reports = engine.rank_reports()
    assert len({r.digest for r in reports}) == 1, "the ranks' outputs differ"
    assert all(r.idle for r in reports), "a rank still holds KV blocks"
