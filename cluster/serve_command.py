"""`glmserve serve`: start (or join) Ray, deploy the app from a ServingConfig, serve until Ctrl-C."""

import argparse
import logging
import signal
import threading

from .serving_config import ServingConfig

log = logging.getLogger(__name__)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="ServingConfig YAML; flags below override it")
    parser.add_argument("--model", help="checkpoint directory (default: the embedded glm5-tiny)")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--prefill-replicas", type=int, help="0 = colocated: decode workers prefill everything")
    parser.add_argument("--decode-replicas", type=int)
    parser.add_argument("--device", help="cpu, cuda or auto")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--served-model-name")
    parser.add_argument("--num-speculative-tokens", type=int)
    parser.add_argument("--tensor-parallel-size", type=int, help="ranks per decode replica that split attention")
    parser.add_argument("--expert-parallel-size", type=int, help="ranks per decode replica that split the experts")
    parser.add_argument("--prefill-tensor-parallel-size", type=int, help="ranks per prefill replica (attention)")
    parser.add_argument("--prefill-expert-parallel-size", type=int, help="ranks per prefill replica (experts)")


def config_from_args(args: argparse.Namespace) -> ServingConfig:
    data = ServingConfig.from_yaml(args.config).model_dump() if args.config else ServingConfig().model_dump()
    overrides = {
        ("engine", "model"): args.model,
        ("engine", "device"): args.device,
        ("engine", "num_speculative_tokens"): args.num_speculative_tokens,
        ("engine", "tensor_parallel_size"): args.tensor_parallel_size,
        ("engine", "expert_parallel_size"): args.expert_parallel_size,
        ("prefill", "replicas"): args.prefill_replicas,
        ("prefill_engine", "tensor_parallel_size"): args.prefill_tensor_parallel_size,
        ("prefill_engine", "expert_parallel_size"): args.prefill_expert_parallel_size,
        ("decode", "replicas"): args.decode_replicas,
        ("host",): args.host,
        ("port",): args.port,
        ("api_key",): args.api_key,
        ("served_model_name",): args.served_model_name,
    }
    for path, value in overrides.items():
        if value is not None:
            target = data
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
    return ServingConfig.model_validate(data)


def run_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from .app import build_app, ray_init_kwargs

    config = config_from_args(args)
    ray.init(**ray_init_kwargs())
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build_app(config), name="glmserve", route_prefix="/")
        roles = f"{config.prefill.replicas} prefill + {config.decode.replicas} decode replica(s)"
        print(f"glmserve: serving {config.model_name} ({roles}) at http://{config.host}:{config.port}/v1", flush=True)
        stop.wait()
    finally:
        log.info("shutting down")
        serve.shutdown()
        ray.shutdown()
    return 0
