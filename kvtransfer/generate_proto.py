"""Regenerate `kv_transfer_pb2.py` and `kv_transfer_pb2_grpc.py` from `kv_transfer.proto` with grpcio-tools.

Run `python -m glmserve.kvtransfer.generate_proto`. The proto is compiled under the virtual path
`glmserve/kvtransfer/` so the generated gRPC module imports its messages as `glmserve.kvtransfer.kv_transfer_pb2`
(a bare `import kv_transfer_pb2` would only work with this folder on sys.path).
"""

import logging
import shutil
import tempfile
from pathlib import Path

from grpc_tools import protoc

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
PROTO = "kv_transfer.proto"
VIRTUAL_DIR = "glmserve/kvtransfer"


def generate() -> None:
    include = Path(protoc.__file__).resolve().parent / "_proto"  # well-known types shipped with grpcio-tools
    with tempfile.TemporaryDirectory() as out:
        args = [
            "protoc",
            f"-I{VIRTUAL_DIR}={HERE}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"{VIRTUAL_DIR}/{PROTO}",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {HERE / PROTO}")
        for name in ("kv_transfer_pb2.py", "kv_transfer_pb2_grpc.py"):
            shutil.copyfile(Path(out) / VIRTUAL_DIR / name, HERE / name)
            log.info("wrote %s", HERE / name)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    generate()
