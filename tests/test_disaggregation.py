"""Disaggregated serving on Ray Serve: prefill and decode replicas exchanging KV over the transfer service.

Greedy output is the same token for token whether a prompt is prefilled by a prefill replica, by the decode
replica itself (short prompt, or colocated mode), or by the offline engine, `max_tokens: 1` included; a prefill
replica killed mid-transfer ends in a local recompute (or, under the fail policy, a clear 503), never a hang or a
leaked block; a request caught by a dying decode replica gets an OpenAI-shaped 503 with Retry-After.
"""

import threading
import time

import httpx
import pytest
import ray
import torch
from ray import serve
from server_process import free_port

from glmserve import LLM, SamplingParams
from glmserve.cluster import serve_env
from glmserve.cluster.app import build_app
from glmserve.cluster.serving_config import ServingConfig

pytestmark = pytest.mark.slow
NEW_TOKENS = 12


def _config(prefill_replicas: int, **kv) -> ServingConfig:
    config = ServingConfig(local_prefill_threshold=64)
    config.prefill.replicas = prefill_replicas
    for key, value in kv.items():
        setattr(config.kv_transfer, key, value)
    return config


@pytest.fixture(scope="module")
def apps():
    """Three apps in one local Ray: disaggregated (recompute on failure), disaggregated (fail), colocated."""
    serve_env.set_proxy_env()  # as `glmserve serve` does: the proxy's 503 for a request whose replica died
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    configs = {
        "disagg": _config(1, lease_s=10),
        "failfast": _config(1, lease_s=10, on_failure="fail"),
        "coloc": _config(0),
    }
    for name, config in configs.items():
        serve.run(build_app(config), name=name, route_prefix=f"/{name}")
    yield {name: f"http://127.0.0.1:{port}/{name}" for name in configs}
    serve.shutdown()
    ray.shutdown()


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 8000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _complete(base: str, prompt: list[int], max_tokens: int = NEW_TOKENS, timeout: float = 120) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "logprobs": 1}
    return httpx.post(f"{base}/v1/completions", json=body, timeout=timeout)


def _tokens(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["logprobs"]["tokens"]


def _metric(base: str, name: str, role: str) -> float:
    total = 0.0
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(f"glmserve:{name}") and f'role="{role}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_disaggregated_equals_colocated_equals_offline(apps):
    prompts = [_prompt(n, seed=n) for n in (20, 63, 64, 200, 700)]  # below and above the threshold of 64
    llm = LLM()
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    offline = [
        [tok.decode([t]) for t in o.outputs[0].token_ids]
        for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    ]
    for prompt, want in zip(prompts, offline, strict=True):
        assert _tokens(_complete(apps["disagg"], prompt)) == want
        assert _tokens(_complete(apps["coloc"], prompt)) == want
    for prompt, want in zip(prompts, offline, strict=True):  # one token: the prefill replica's, and nothing more
        assert _tokens(_complete(apps["disagg"], prompt, max_tokens=1)) == want[:1]
        assert _tokens(_complete(apps["coloc"], prompt, max_tokens=1)) == want[:1]
    time.sleep(1.5)  # workers post their counters once a second
    assert _metric(apps["disagg"], "kv_transfer_bytes_total", "decode") > 0, "no prompt went through a prefill replica"
    assert _metric(apps["disagg"], "kv_cache_usage_perc", "decode") == 0


def _kill_prefill_replica(app: str) -> None:
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if f"{app}#PrefillServer" in actor["name"]:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=False)
            return
    raise AssertionError("no prefill replica found")


def _request_then_kill(base: str, app: str, prompt: list[int]) -> httpx.Response:
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=_complete(base, prompt, timeout=60)))
    thread.start()
    time.sleep(0.4)  # the prefill of ~3,900 tokens takes seconds on CPU: this lands mid-transfer
    _kill_prefill_replica(app)
    thread.join(timeout=60)
    assert not thread.is_alive(), "the request hung after its prefill replica died"
    return result["r"]


def test_prefill_replica_killed_midway_recomputes_locally(apps):
    prompt = _prompt(3900, seed=1)
    want = LLM().generate(
        {"prompt_token_ids": prompt},
        SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
        use_tqdm=False,
    )
    tok = LLM().get_tokenizer()
    assert _tokens(_request_then_kill(apps["disagg"], "disagg", prompt)) == [
        tok.decode([t]) for t in want[0].outputs[0].token_ids
    ]
    time.sleep(1.5)
    assert _metric(apps["disagg"], "kv_transfer_failures_total", "decode") >= 1
    assert _metric(apps["disagg"], "kv_cache_usage_perc", "decode") == 0
    assert _metric(apps["coloc"], "kv_transfer_failures_total", "decode") == 0  # each app reports its own replicas


def test_prefill_replica_killed_midway_fails_clearly_under_fail_policy(apps):
    r = _request_then_kill(apps["failfast"], "failfast", _prompt(3900, seed=2))
    assert r.status_code == 503
    assert "did not arrive" in r.json()["error"]["message"]
    assert r.headers["retry-after"]
    time.sleep(1.5)
    assert _metric(apps["failfast"], "kv_cache_usage_perc", "decode") == 0


def _kill_decode_replica(app: str) -> None:
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if f"{app}#DecodeServer" in actor["name"]:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=False)
            return
    raise AssertionError("no decode replica found")


def test_a_request_caught_by_a_dying_decode_replica_gets_a_retryable_503(apps):
    """Last in the module: the colocated app's only decode replica dies mid-request (Serve then replaces it)."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=_complete(apps["coloc"], _prompt(100, 3), 3000)))
    thread.start()
    time.sleep(2.0)  # generating
    _kill_decode_replica("coloc")
    thread.join(timeout=60)
    assert not thread.is_alive()
    r = result["r"]
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "service_unavailable_error"
