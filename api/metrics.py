"""Prometheus metrics, named as vLLM names them so dashboards carry over.

Latencies are measured where users feel them, in the API layer of whichever replica served the request.
Engine-side gauges and counters (running, waiting, KV use, prefix cache, KV transfer) are reported by each worker
replica and exported with a `replica` label. Replicas also report their API series (`Metrics.samples`), so any one
of them can answer /metrics with the totals over all.
"""

import json
from collections import defaultdict
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

Stats = Mapping[str, Mapping[str, float]]  # replica -> its latest stats

PREFIX = "glmserve:"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)

# worker stat key -> (metric name, kind, help)
WORKER_METRICS = {
    "num_requests_running": ("num_requests_running", "gauge", "Requests in the running batch"),
    "num_requests_waiting": ("num_requests_waiting", "gauge", "Requests waiting to be scheduled"),
    "kv_cache_usage": ("kv_cache_usage_perc", "gauge", "Fraction of KV blocks in use (0-1)"),
    "prefix_cache_queries": ("prefix_cache_queries", "counter", "Prompt tokens looked up in the prefix cache"),
    "prefix_cache_hits": ("prefix_cache_hits", "counter", "Prompt tokens served from the prefix cache"),
    "kv_transfer_bytes": ("kv_transfer_bytes", "counter", "Bytes of KV cache received over the transfer service"),
    "kv_transfer_seconds": ("kv_transfer_seconds", "counter", "Seconds spent in KV transfers"),
    "kv_transfer_failures": ("kv_transfer_failures", "counter", "KV transfers that failed (lease, abort, peer lost)"),
    "num_preemptions": ("num_preemptions", "counter", "Sequences preempted for lack of KV blocks"),
    "spec_decode_num_draft_tokens": ("spec_decode_num_draft_tokens", "counter", "Draft tokens judged"),
    "spec_decode_num_accepted_tokens": ("spec_decode_num_accepted_tokens", "counter", "Draft tokens accepted"),
    "num_requests_admitted": ("num_requests_admitted", "gauge", "Sequences admitted and not yet ended"),
    "queued_prompt_tokens": ("queued_prompt_tokens", "gauge", "Prompt tokens admitted, before their first token"),
    "prefill_tokens_per_s": ("prefill_tokens_per_s", "gauge", "Measured rate at which the prompt backlog clears"),
    # posted by the autoscaling policies (replica label "autoscaler:<deployment>")
    "autoscaling_desired_replicas": ("autoscaling_desired_replicas", "gauge", "Replicas the SLO policy asks for"),
    "autoscaling_current_replicas": ("autoscaling_current_replicas", "gauge", "Replicas when it decided"),
}
AUTOSCALING_SIGNAL_PREFIX = "autoscaling_signal_"  # + signal name: replicas that signal alone would need
SPEC_PREFIXES = {"spec_decode_accepted_pos": "accepted", "spec_decode_drafted_pos": "drafted"}


API_KEY_PREFIX = "api:"  # marks API series among a replica's stats


def _api_key(family: str, sample_name: str, labels: Mapping[str, str]) -> str:
    return API_KEY_PREFIX + json.dumps([family, sample_name, labels], sort_keys=True)


class _ApiTotals:
    """The API series summed over replicas (each replica's `Metrics.samples`); this process's alone without them."""

    def __init__(self, own: CollectorRegistry, replicas: Stats | None):
        self.own = own
        self.replicas = replicas

    def collect(self) -> Iterator[Metric]:
        if self.replicas is None:
            yield from self.own.collect()
            return
        totals: dict[str, dict[str, float]] = defaultdict(dict)  # family -> key -> value summed over replicas
        for stats in self.replicas.values():
            for key, value in stats.items():
                if key.startswith(API_KEY_PREFIX):
                    family = json.loads(key.removeprefix(API_KEY_PREFIX))[0]
                    totals[family][key] = totals[family].get(key, 0.0) + value
        for family in self.own.collect():
            merged = Metric(family.name, family.documentation, family.type, family.unit)
            for key, value in totals[family.name].items():
                _, sample_name, labels = json.loads(key.removeprefix(API_KEY_PREFIX))
                merged.add_sample(sample_name, labels, value)
            yield merged


class _WorkerStats:
    """A collector exporting the latest stats each worker replica reported."""

    def __init__(self, latest: Stats):
        self.latest = latest

    def collect(self):
        for key, (name, kind, help_text) in WORKER_METRICS.items():
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                PREFIX + name, help_text, labels=["replica", "role"]
            )
            for replica, stats in sorted(self.latest.items()):
                if key in stats:
                    family.add_metric([replica, str(stats.get("role", ""))], float(stats[key]))
            yield family
        # per draft position: acceptance rate = accepted / drafted at that position
        per_pos = CounterMetricFamily(
            PREFIX + "spec_decode_num_tokens_per_pos",
            "Draft tokens judged / accepted, by draft position",
            labels=["replica", "position", "kind"],
        )
        for replica, stats in sorted(self.latest.items()):
            for key, value in stats.items():
                for prefix, kind in SPEC_PREFIXES.items():
                    if key.startswith(prefix):
                        per_pos.add_metric([replica, key.removeprefix(prefix), kind], float(value))
        yield per_pos
        signals = GaugeMetricFamily(
            PREFIX + "autoscaling_signal_replicas",
            "Replicas each input of the autoscaling policy calls for, by signal",
            labels=["replica", "role", "signal"],
        )
        for replica, stats in sorted(self.latest.items()):
            for key, value in stats.items():
                if key.startswith(AUTOSCALING_SIGNAL_PREFIX):
                    signal = key.removeprefix(AUTOSCALING_SIGNAL_PREFIX)
                    signals.add_metric([replica, str(stats.get("role", "")), signal], float(value))
        yield signals


class Metrics:
    """The API series of one process, every one labelled with the served model's name (vLLM's `model_name`)."""

    def __init__(self, model_name: str = "") -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name

        def histogram(name: str, help_text: str) -> Histogram:
            series = Histogram(
                PREFIX + name, help_text, ["model_name"], buckets=LATENCY_BUCKETS, registry=self.registry
            )
            return series.labels(model_name=model_name)

        def counter(name: str, help_text: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, help_text, ["model_name", *labels], registry=self.registry)

        # latencies from the moment the request reached the server, as the client sees them
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token, from arrival")
        self.itl = histogram("inter_token_latency_seconds", "Time between streamed tokens")
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency, arrival to last token")
        # where the time went (vLLM's phases): waiting for blocks, prefill (local or remote), decode
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to the start of its prefill")
        self.prefill_time = histogram("request_prefill_time_seconds", "Start of its prefill to its first token")
        self.decode_time = histogram("request_decode_time_seconds", "First token to last token")
        self._requests = counter("request_success", "Finished requests by reason", ("finished_reason",))
        self._rejected = counter("request_rejected", "Requests refused before any work (429/503)", ("reason",))
        self._errors = counter("request_errors", "Requests that ended in an error, by HTTP status", ("status",))
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens").labels(model_name=model_name)
        self.generation_tokens = counter("generation_tokens", "Generated tokens").labels(model_name=model_name)

    def itl_totals(self) -> tuple[float, float]:
        """The sum and count of inter-token gaps so far (the autoscaler takes their recent mean as TPOT)."""
        values = {
            s.name: s.value
            for f in self.registry.collect()
            if f.name == PREFIX + "inter_token_latency_seconds"
            for s in f.samples
            if s.labels.get("model_name") == self.model_name
        }
        name = PREFIX + "inter_token_latency_seconds"
        return values.get(name + "_sum", 0.0), values.get(name + "_count", 0.0)

    def finished(self, reason: str) -> None:
        self._requests.labels(model_name=self.model_name, finished_reason=reason).inc()

    def rejected(self, reason: str) -> None:
        self._rejected.labels(model_name=self.model_name, reason=reason).inc()

    def errored(self, status: int) -> None:
        self._errors.labels(model_name=self.model_name, status=str(status)).inc()

    def samples(self) -> dict[str, float]:
        """This process's API series, flat, for the stats board (`_created` timestamps do not add up: left out)."""
        return {
            _api_key(family.name, s.name, s.labels): s.value
            for family in self.registry.collect()
            for s in family.samples
            if not s.name.endswith("_created")
        }

    def render(self, replicas: Stats | None = None) -> bytes:
        """The exposition text: API series (totals over `replicas` when given) and every replica's worker stats."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_ApiTotals(self.registry, replicas))
        registry.register(_WorkerStats(replicas or {}))
        return generate_latest(registry)
