"""Ray Serve settings for a short request path (measured in docs/benchmarks.md, "Router overhead (CPU)"); they are
Ray Serve's own "throughput optimized" switches.

Replicas run our code on their own event loop rather than a separate thread, and handles route on the caller's
event loop rather than a router thread: a thread hop less each way, per request (every replica method of ours is
async or cheap, and engines step in threads of their own). The HTTP proxy also talks to replicas over gRPC instead
of Ray actor calls, and answers a request whose replica died before answering with a 503 in OpenAI's shape. Values
already in the environment win.
"""

import os

REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
PROXY_ENV = {
    "RAY_SERVE_PROXY_USE_GRPC": "1",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    # a request whose replica died before answering gets an OpenAI-shaped 503 with Retry-After (proxy_errors.py)
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "glmserve.cluster.proxy_errors:proxy_middlewares",
}


def replica_env() -> dict[str, str]:
    """For a deployment's runtime_env, so it reaches replicas on any cluster (unless a config override replaces the
    deployment's ray_actor_options)."""
    return {key: os.environ.get(key, value) for key, value in REPLICA_ENV.items()}


def set_proxy_env() -> None:
    """Serve starts the proxy, not us: it inherits the environment of a Ray started from this process, so set this
    before `ray.init`. (On an existing cluster, set PROXY_ENV on its nodes.)"""
    for key, value in PROXY_ENV.items():
        os.environ.setdefault(key, value)
