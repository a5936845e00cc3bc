import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton picks the interpreter when a kernel is decorated: set it before any test module imports a kernel.
    os.environ["TRITON_INTERPRET"] = "1"

SHARED = Path(os.environ.get("GLMSERVE_SHARED", Path(__file__).resolve().parents[2] / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.exists():
        pytest.fail(
            f"the shared data folder is missing at {SHARED}: these tests need it (set GLMSERVE_SHARED to its path)",
            pytrace=False,
        )
    return SHARED


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Random default weights are generated into a per-run cache unless the user points GLMSERVE_CACHE elsewhere."""
    if "GLMSERVE_CACHE" not in os.environ:
        os.environ["GLMSERVE_CACHE"] = str(tmp_path_factory.mktemp("glmserve-cache"))
    yield
