"""The Ray Serve application, built from one `ServingConfig`: `DecodeServer` replicas that serve the OpenAI API,
orchestrate and decode (the app's HTTP ingress), and `PrefillServer` replicas for long prompts (zero of them =
colocated).

`serve run glmserve.cluster.app:build_app` and KubeRay's serveConfigV2 use `build_app` with the config's fields as
args; `glmserve serve` calls it with a ServingConfig.

The KV transfer's cluster secret is settled when the app is built: the config's `kv_transfer.secret`, else
`GLMSERVE_KV_SECRET` (a Kubernetes Secret, see k8s/), else one drawn now. Both roles get it in their deployment's
config and, for the rank actors of parallel replicas (which inherit it), in their runtime environment.
"""

import asyncio
import contextlib
import logging
import os

import ray
import torch
from pydantic import SecretStr
from ray import serve
from ray.serve.config import BackpressureConfig, RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from glmserve.api.app import create_app
from glmserve.api.openai_server import OpenAIServer, RequestLimits
from glmserve.api.quota import Quotas
from glmserve.batch.routes import attach_batch_api
from glmserve.decode.server import DecodeWorker
from glmserve.engine.admission import Admission
from glmserve.engine.remote import PrefillRequest, PrefillResult
from glmserve.engine.request import EngineRequest
from glmserve.kvtransfer.auth import ENV_VAR as KV_SECRET_ENV
from glmserve.kvtransfer.auth import ClusterSecret
from glmserve.model.default_checkpoint import default_checkpoint
from glmserve.model.tokenizer import Tokenizer
from glmserve.prefill.worker import PrefillWorker

from . import serve_env, stats_board
from .parallel_engine import ParallelEngine, parallel_config
from .prefill_ranks import ParallelPrefillWorker
from .serving_config import Autoscaling, RoleConfig, ServingConfig

log = logging.getLogger(__name__)
STATS_PERIOD_S = 1.0
QUOTA_SHARE_PERIOD_S = 5.0
BACKPRESSURE_RETRY_AFTER_S = 1.0
POLICIES = {
    "prefill": "glmserve.cluster.autoscaling:PrefillSLOPolicy",
    "decode": "glmserve.cluster.autoscaling:DecodeSLOPolicy",
}


def _limit_threads(role: RoleConfig) -> None:
    # CPU replicas share the host's cores; without this each would start one torch thread per core.
    if role.num_gpus == 0:
        torch.set_num_threads(max(1, int(role.num_cpus)))


def _leave_board(replica: str, posting: asyncio.Task) -> None:
    """From a replica's __del__: stop posting and take it off the stats board (fire and forget; never raises)."""
    with contextlib.suppress(Exception):  # Serve may call __del__ off the loop the task runs on
        posting.get_loop().call_soon_threadsafe(posting.cancel)
    with contextlib.suppress(Exception):
        stats_board.get_or_create(serve.get_replica_context().app_name).forget.remote(replica)


async def _post_stats_forever(replica: str, stats) -> None:
    board = stats_board.get_or_create(serve.get_replica_context().app_name)
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
        engine, transport = config.prefill_engine_args, config.kv_transfer.transport
        if parallel_config(engine) is not None:  # the engine runs on rank actors that this replica drives
            self.worker = ParallelPrefillWorker(engine, transport, use_gpu=config.prefill.num_gpus > 0)
        else:
            self.worker = PrefillWorker(engine, transport, secret=_kv_secret(config))
        self.backlog = Admission()  # no limits here (decode admits); it measures what waits and how fast it clears
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._stats_task = asyncio.get_event_loop().create_task(_post_stats_forever(self.replica, self._stats))

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        ticket = self.backlog.reserve()
        ticket.admit_prompt(len(request.prompt_token_ids))
        try:
            result = await self.worker.prefill(request)
            ticket.first_token()
            return result
        finally:
            ticket.release()

    def _stats(self) -> dict[str, float]:
        return {**self.worker.stats(), **self.backlog.stats()}

    def record_routing_stats(self) -> dict[str, float]:
        return self.worker.stats()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What `PrefillSLOPolicy` sizes this role by."""
        return {k: v for k, v in self._stats().items() if k != "role"}

    def check_health(self) -> None:
        """Serve replaces a replica whose engine died (e.g. one of its rank actors)."""
        self.worker.async_engine.check_alive()

    def __del__(self) -> None:
        self.worker.shutdown()
        _leave_board(self.replica, self._stats_task)


@serve.deployment(name="DecodeServer")
@serve.ingress()
class DecodeServer:
    """A decode replica that is also the HTTP ingress: Serve's proxy sends each request straight to the replica
    `LeastLoadedRouter` picks, and the OpenAI layer runs beside the engine, with no actor hop between them. A client
    that disconnects cancels the request's task here, which aborts it in the engine and frees its blocks."""

    def __init__(self, config: ServingConfig, prefill: DeploymentHandle | None = None):
        _limit_threads(config.decode)
        # tensor/expert parallel: the engine runs on rank actors (a GPU, or a CPU, each) that this replica drives
        self.parallel_engine = None
        if parallel_config(config.engine) is not None:
            self.parallel_engine = ParallelEngine(config.engine, use_gpu=config.decode.num_gpus > 0)
        loopback = config.host in ("127.0.0.1", "localhost")
        receiver = None
        transport = config.kv_transfer.transport
        if self.parallel_engine is not None and prefill is not None:
            # every rank holds a full copy of the KV cache, so each runs a receiver (on its own node's address)
            receiver = self.parallel_engine.open_receivers("127.0.0.1" if loopback else None, transport)
        self.worker = DecodeWorker(
            config.engine,
            prefill=(lambda request: prefill.prefill.remote(request)) if prefill is not None else None,
            local_prefill_threshold=config.local_prefill_threshold,
            lease_s=config.kv_transfer.lease_s,
            timeout_s=config.kv_transfer.timeout_s,
            on_failure=config.kv_transfer.on_failure,
            host="127.0.0.1" if loopback else ray.util.get_node_ip_address(),
            engine=self.parallel_engine,
            receiver=receiver,
            transport=transport,
            secret=_kv_secret(config),
        )
        model_config = self.worker.engine.config
        self.config = config
        max_model_len = config.engine.max_model_len or model_config.max_position_embeddings
        api = config.api
        self.server = OpenAIServer(
            self.worker,
            # its own tokenizer: the engine thread detokenizes with the engine's at the same time
            Tokenizer.from_pretrained(config.engine.model or default_checkpoint()),
            config.model_name,
            max_model_len=max_model_len,
            limits=RequestLimits(
                max_stop_strings=api.max_stop_strings,
                max_stop_string_chars=api.max_stop_string_chars,
                max_stop_token_ids=api.max_stop_token_ids,
            ),
            admission=Admission(config.admission),
            quotas=Quotas(config.api_keys),
        )
        self.max_body_bytes = api.max_body_bytes or max(1 << 20, 16 * max_model_len)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.board = stats_board.get_or_create(serve.get_replica_context().app_name)
        loop = asyncio.get_event_loop()
        self._stats_task = loop.create_task(_post_stats_forever(self.replica, self._stats))
        if config.api_keys:
            self._share_task = loop.create_task(self._follow_decode_replicas())
        self._itl_seen = self.server.metrics.itl_totals()

    def _stats(self) -> dict[str, float]:
        return {**self.worker.stats(), **self.server.admission.stats(), **self.server.metrics.samples()}

    async def _follow_decode_replicas(self) -> None:
        """Quotas are split over the decode replicas serving: keep this replica's share current."""
        while True:
            try:
                snapshot = await self.board.snapshot.remote()
                self.server.quotas.set_replicas(
                    sum(1 for r in snapshot if r != self.replica and _is_decode(r, snapshot)) + 1
                )
            except Exception:  # the board may be restarting: keep the last share
                log.debug("replica count refresh failed", exc_info=True)
            await asyncio.sleep(QUOTA_SHARE_PERIOD_S)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What `DecodeSLOPolicy` sizes this role by; TPOT is the mean inter-token gap since the last call."""
        total, count = self.server.metrics.itl_totals()
        seen_total, seen_count = self._itl_seen
        self._itl_seen = total, count
        stats = {**self.worker.stats(), **self.server.admission.stats()}
        return {
            "kv_cache_usage": stats["kv_cache_usage"],
            "num_requests_running": stats["num_requests_running"],
            "num_requests_waiting": stats["num_requests_waiting"],
            "queued_prompt_tokens": stats["queued_prompt_tokens"],
            "prefill_tokens_per_s": stats["prefill_tokens_per_s"],
            "tpot_s": (total - seen_total) / (count - seen_count) if count > seen_count else 0.0,
            "max_num_seqs": self.config.engine.max_num_seqs,
        }

    async def _replica_stats(self) -> dict[str, dict[str, float]]:
        # every replica's last post, and this one's as of now
        return {**await self.board.snapshot.remote(), self.replica: self._stats()}

    def __serve_build_asgi_app__(self):
        api = self.config.api
        app = create_app(
            self.server,
            self.config.api_key_table,
            self._replica_stats,
            max_body_bytes=self.max_body_bytes,
            metrics_need_api_key=api.metrics_need_api_key,
            openapi=api.openapi,
        )
        attach_batch_api(app, self.server, self.config.batch)  # /v1/files, /v1/batches and their runner
        return app

    async def generate(self, request: EngineRequest):
        """The engine without the API, for DeploymentHandle callers (`glmserve bench router`'s direct path)."""
        async for out in self.worker.generate(request):
            yield out

    def record_routing_stats(self) -> dict[str, float]:
        return self.worker.stats()

    async def wait_idle(self, timeout: float = 10.0) -> bool:
        return await self.worker.wait_idle(timeout)

    def check_health(self) -> None:
        """Serve replaces a replica whose engine died (e.g. one of its rank actors)."""
        self.worker.async_engine.check_alive()

    def __del__(self) -> None:
        """Serve calls this once the replica has drained (or at shutdown): what is still open ends with a retryable
        error and frees its blocks (`AsyncEngine.shutdown`)."""
        self.server.admission.draining = True
        self.worker.shutdown()
        if self.parallel_engine is not None:
            self.parallel_engine.shutdown()
        _leave_board(self.replica, self._stats_task)


def _kv_secret(config: ServingConfig) -> str | None:
    secret = config.kv_transfer.secret
    return secret.get_secret_value() if secret is not None else None


def _with_kv_secret(config: ServingConfig) -> ServingConfig:
    """The config with its cluster secret settled (the config's, else the environment's, else a new one)."""
    if config.kv_transfer.secret is not None:
        return config
    secret = os.environ.get(KV_SECRET_ENV) or ClusterSecret.generate()
    transfer = config.kv_transfer.model_copy(update={"secret": SecretStr(secret)})
    return config.model_copy(update={"kv_transfer": transfer})


def _is_decode(replica: str, snapshot: dict[str, dict[str, float]]) -> bool:
    return snapshot[replica].get("role") == "decode" and not replica.startswith("autoscaler:")


def _options(role_name: str, config: ServingConfig, num_gpus: float | None = None) -> dict:
    role: RoleConfig = getattr(config, role_name)
    env = {**serve_env.replica_env(), KV_SECRET_ENV: _kv_secret(config)}  # rank actors inherit it
    options: dict = {
        "ray_actor_options": {
            "num_cpus": role.num_cpus,
            "num_gpus": role.num_gpus if num_gpus is None else num_gpus,
            "runtime_env": {"env_vars": env},
        },
        "max_ongoing_requests": role.max_ongoing_requests,
        "max_queued_requests": role.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=BACKPRESSURE_RETRY_AFTER_S),
        "graceful_shutdown_timeout_s": role.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": 1.0,
    }
    if role.autoscaling is not None:
        options["autoscaling_config"] = autoscaling_config(role_name, role.autoscaling, config)
    else:
        options["num_replicas"] = role.replicas
    return options


def autoscaling_config(role_name: str, auto: Autoscaling, config: ServingConfig) -> dict:
    """Ray Serve's autoscaling_config for one role (a manifest's `deployments:` override must equal it)."""
    serve_config = auto.model_dump(exclude={"policy", "target_kv_cache_usage"})
    if auto.policy == "slo":
        if role_name == "prefill":
            kwargs = {"slo_ttft_s": config.slo_ttft_ms / 1000}
        else:  # colocated, decode replicas prefill too: their TTFT counts
            kwargs = {
                "slo_tpot_s": config.slo_tpot_ms / 1000,
                "target_kv_cache_usage": auto.target_kv_cache_usage,
                "slo_ttft_s": None if config.has_prefill else config.slo_ttft_ms / 1000,
            }
        serve_config["policy"] = {"policy_function": POLICIES[role_name], "policy_kwargs": kwargs}
    return serve_config


def build_app(config: ServingConfig) -> serve.Application:
    """The whole application from one config (Ray Serve application builder)."""
    if not isinstance(config, ServingConfig):
        config = ServingConfig.model_validate(config)
    config = _with_kv_secret(config)
    prefill = None
    if config.has_prefill:
        prefill = PrefillServer.options(
            request_router_config=RequestRouterConfig(
                request_router_class="glmserve.cluster.routers:PrefixAffinityRouter",
                request_routing_stats_period_s=1,
            ),
            **_options("prefill", config, num_gpus=0 if parallel_config(config.prefill_engine_args) else None),
        ).bind(config)
    return DecodeServer.options(
        request_router_config=RequestRouterConfig(
            request_router_class="glmserve.cluster.routers:LeastLoadedRouter",
            request_routing_stats_period_s=1,
        ),
        # a tensor/expert-parallel replica's GPUs are its ranks' (one each), not its own
        **_options("decode", config, num_gpus=0 if parallel_config(config.engine) else None),
    ).bind(config, prefill)


def ray_init_kwargs() -> dict:
    """Local Ray without the dashboard (fast start, nothing listening beyond Serve), or RAY_ADDRESS's cluster."""
    if os.environ.get("RAY_ADDRESS"):
        return {"address": os.environ["RAY_ADDRESS"]}
    serve_env.set_proxy_env()
    return {"include_dashboard": False, "log_to_driver": False}
