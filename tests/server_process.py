"""Run `glmserve serve` as a user would, in a subprocess, for end-to-end tests."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(*args: str, timeout: float = 180.0) -> Iterator[str]:
    """Start `glmserve serve ARGS --port P`, wait until it answers, yield its base URL, stop it with Ctrl-C."""
    port = free_port()
    log = open(os.environ.get("GLMSERVE_TEST_SERVER_LOG", os.devnull), "a")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "glmserve.cli", "serve", "--port", str(port), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"glmserve serve exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:  # open with or without API keys
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("glmserve serve did not come up")
            time.sleep(0.5)
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
