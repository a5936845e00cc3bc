"""The Ray Serve application, built from one `ServingConfig`: an OpenAI-compatible `Ingress`, `DecodeServer`
replicas that orchestrate and decode, and `PrefillServer` replicas for long prompts (zero of them = colocated).

`serve run glmserve.cluster.app:build_app` and KubeRay's serveConfigV2 use `build_app` with the config's fields as
args; `glmserve serve` calls it with a ServingConfig.
"""

import asyncio
import logging
import os

import ray
import torch
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from glmserve.api.app import create_app
from glmserve.api.openai_server import OpenAIServer
from glmserve.decode.request import EngineRequest
from glmserve.decode.server import DecodeWorker
from glmserve.model.config import GlmConfig
from glmserve.model.default_checkpoint import default_checkpoint
from glmserve.model.tokenizer import Tokenizer
from glmserve.prefill.request import PrefillRequest, PrefillResult
from glmserve.prefill.worker import PrefillWorker

from . import stats_board
from .serving_config import RoleConfig, ServingConfig

log = logging.getLogger(__name__)
STATS_PERIOD_S = 1.0


def _limit_threads(role: RoleConfig) -> None:
    # CPU replicas share the host's cores; without this each would start one torch thread per core.
    if role.num_gpus == 0:
        torch.set_num_threads(max(1, int(role.num_cpus)))


async def _post_stats_forever(replica: str, stats) -> None:
    board = stats_board.get_or_create()
    while True:
        try:
            await board.post.remote(replica, stats())
        except Exception:  # the board may be restarting; metrics must never take a worker down
            log.debug("stats post failed", exc_info=True)
        await asyncio.sleep(STATS_PERIOD_S)


@serve.deployment(name="PrefillServer")
class PrefillServer:
    def __init__(self, config: ServingConfig):
        _limit_threads(config.prefill)
        self.worker = PrefillWorker(config.engine, config.kv_transfer.transport)
        replica = serve.get_replica_context().replica_id.unique_id
        self._stats_task = asyncio.get_event_loop().create_task(_post_stats_forever(replica, self.worker.stats))

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        return await self.worker.prefill(request)

    def record_routing_stats(self) -> dict[str, float]:
        return self.worker.stats()

    def __del__(self) -> None:
        self.worker.shutdown()


@serve.deployment(name="DecodeServer")
class DecodeServer:
    def __init__(self, config: ServingConfig, prefill: DeploymentHandle | None = None):
        _limit_threads(config.decode)
        self.worker = DecodeWorker(
            config.engine,
            prefill=(lambda request: prefill.prefill.remote(request)) if prefill is not None else None,
            local_prefill_threshold=config.local_prefill_threshold,
            lease_s=config.kv_transfer.lease_s,
            timeout_s=config.kv_transfer.timeout_s,
            on_failure=config.kv_transfer.on_failure,
            host=ray.util.get_node_ip_address() if config.host not in ("127.0.0.1", "localhost") else "127.0.0.1",
        )
        replica = serve.get_replica_context().replica_id.unique_id
        self._stats_task = asyncio.get_event_loop().create_task(_post_stats_forever(replica, self.worker.stats))

    async def generate(self, request: EngineRequest):
        async for out in self.worker.generate(request):
            yield out

    def record_routing_stats(self) -> dict[str, float]:
        return self.worker.stats()

    async def wait_idle(self, timeout: float = 10.0) -> bool:
        return await self.worker.wait_idle(timeout)

    def __del__(self) -> None:
        self.worker.shutdown()


class _DecodeClient:
    """The ingress's EngineClient: a streaming call to a decode replica, cancelled if the consumer leaves."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle.options(stream=True)

    async def generate(self, request: EngineRequest):
        response = self.handle.generate.remote(request)
        try:
            async for out in response:
                yield out
        finally:
            response.cancel()  # no-op when finished; aborts the request (and frees its blocks) otherwise


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    def __init__(self, config: ServingConfig, decode: DeploymentHandle):
        path = config.engine.model or default_checkpoint()
        model_config = GlmConfig.from_pretrained(path)
        self.config = config
        self.server = OpenAIServer(
            _DecodeClient(decode),
            Tokenizer.from_pretrained(path),
            config.model_name,
            max_model_len=config.engine.max_model_len or model_config.max_position_embeddings,
            vocab_size=model_config.vocab_size,
        )
        self.board = stats_board.get_or_create()

    async def _worker_stats(self):
        return await self.board.snapshot.remote()

    def __serve_build_asgi_app__(self):
        return create_app(self.server, self.config.api_key, self._worker_stats)


def _options(role: RoleConfig) -> dict:
    options: dict = {
        "ray_actor_options": {"num_cpus": role.num_cpus, "num_gpus": role.num_gpus},
        "max_ongoing_requests": role.max_ongoing_requests,
    }
    if role.autoscaling is not None:
        options["autoscaling_config"] = role.autoscaling.model_dump()
    else:
        options["num_replicas"] = role.replicas
    return options


def build_app(config: ServingConfig) -> serve.Application:
    """The whole application from one config (Ray Serve application builder)."""
    if not isinstance(config, ServingConfig):
        config = ServingConfig.model_validate(config)
    prefill = None
    if config.prefill.replicas > 0 or config.prefill.autoscaling is not None:
        prefill = PrefillServer.options(
            request_router_config=RequestRouterConfig(
                request_router_class="glmserve.cluster.routers:PrefixAffinityRouter",
                request_routing_stats_period_s=1,
            ),
            **_options(config.prefill),
        ).bind(config)
    decode = DecodeServer.options(
        request_router_config=RequestRouterConfig(
            request_router_class="glmserve.cluster.routers:LeastLoadedRouter",
            request_routing_stats_period_s=1,
        ),
        **_options(config.decode),
    ).bind(config, prefill)
    return Ingress.options(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024).bind(config, decode)


def ray_init_kwargs() -> dict:
    """Local Ray without the dashboard (fast start, nothing listening beyond Serve), or RAY_ADDRESS's cluster."""
    if os.environ.get("RAY_ADDRESS"):
        return {"address": os.environ["RAY_ADDRESS"]}
    return {"include_dashboard": False, "log_to_driver": False}
