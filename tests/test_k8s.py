"""The KubeRay manifests in k8s/: they parse; RayService/RayJob documents validate against the KubeRay CRDs' schemas,
strictly (an unknown field fails, as it does under `kubectl apply --validate=strict`); each serveConfigV2 is a Ray
Serve config whose application args are a `ServingConfig` and whose deployment overrides agree with it; and the
replicas' Ray resources pack into the pods the cluster declares, at its smallest and at its largest."""

import copy
import functools
import shlex
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema, ServeApplicationSchema, ServeDeploySchema

from glmserve.bench.serve import BenchServeConfig
from glmserve.bench.traces import NAMED_TRACES
from glmserve.cli import build_parser
from glmserve.cluster.app import autoscaling_config
from glmserve.cluster.serving_config import RoleConfig, ServingConfig

K8S = Path(__file__).resolve().parents[1] / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayJob": "ray.io_rayjobs.yaml"}
CORE_KINDS = {("v1", "PersistentVolumeClaim"), ("batch/v1", "Job"), ("v1", "Secret")}
BUILDER = "glmserve.cluster.app:build_app"
APP_DEPLOYMENTS = {"PrefillServer", "DecodeServer"}
ROLES = {"PrefillServer": "prefill", "DecodeServer": "decode"}
SERVE_PORT = 8000  # KubeRay's <name>-serve-svc targets this port
GPU = "nvidia.com/gpu"
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1 MB each


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


DOCUMENTS = {path.name: load_documents(path) for path in MANIFESTS}


def documents_of(kind: str) -> list:
    return [
        pytest.param(doc, id=f"{name}:{doc['metadata']['name']}")
        for name, docs in DOCUMENTS.items()
        for doc in docs
        if doc.get("kind") == kind
    ]


def the_rayservice(file_name: str) -> dict:
    (service,) = [d for d in DOCUMENTS[file_name] if d["kind"] == "RayService"]
    return service


def forbid_unknown_fields(schema: dict) -> dict:
    """Structural CRD schemas leave unknown fields to pruning; kubectl's strict validation rejects them, and so do
    we: every object that lists its properties (and does not ask to keep unknown ones) gets additionalProperties
    false. Maps (additionalProperties given) stay as they are."""
    if isinstance(schema, dict):
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        for value in schema.values():
            forbid_unknown_fields(value)
    elif isinstance(schema, list):
        for item in schema:
            forbid_unknown_fields(item)
    return schema


@functools.cache
def crd_validator(crd_path: Path) -> jsonschema.Draft7Validator:
    crd = yaml.load(crd_path.read_text(), Loader=YAML_LOADER)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(forbid_unknown_fields(version["schema"]["openAPIV3Schema"]))


def crd_errors(doc: dict, shared_dir: Path) -> list[str]:
    validator = crd_validator(shared_dir / "data" / "kuberay" / CRD_FILES[doc["kind"]])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def applications(rayservice: dict) -> list[dict]:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]


def overrides(app: dict) -> dict[str, dict]:
    return {d["name"]: d for d in app.get("deployments", [])}


def cpu_quantity(value: str | int | float) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def ray_container(pod_template: dict) -> dict:
    return pod_template["spec"]["containers"][0]  # KubeRay runs Ray in the first container


def ray_node_resources(group: dict) -> tuple[float, float]:
    """(CPUs, GPUs) that Ray sees on a pod of this group: rayStartParams first, else the container limits (as
    KubeRay passes them to `ray start`), else the requests."""
    resources = ray_container(group["template"]).get("resources", {})
    quantities = {**resources.get("requests", {}), **resources.get("limits", {})}
    params = group.get("rayStartParams", {})
    cpus = cpu_quantity(params.get("num-cpus", quantities.get("cpu", 0)))
    gpus = float(params.get("num-gpus", quantities.get(GPU, 0)))
    return cpus, gpus


def replica_demands(config: ServingConfig, app: dict, at_max: bool) -> list[tuple[float, float]]:
    """(CPUs, GPUs) of every replica the app runs at its smallest or largest scale; overrides win, as in Ray Serve."""
    roles: dict[str, RoleConfig | None] = {
        "PrefillServer": config.prefill,
        "DecodeServer": config.decode,
    }
    demands = []
    for name, role in roles.items():
        opts = overrides(app).get(name, {})
        if role is not None:
            scaling = role.autoscaling.model_dump() if role.autoscaling else None
            opts = {"num_replicas": role.replicas, "autoscaling_config": scaling, **opts}
            opts.setdefault("ray_actor_options", {"num_cpus": role.num_cpus, "num_gpus": role.num_gpus})
        scaling = opts.get("autoscaling_config")
        count = scaling["max_replicas" if at_max else "min_replicas"] if scaling else opts.get("num_replicas", 1)
        actor = opts.get("ray_actor_options", {})
        demands += [(actor.get("num_cpus", 0), actor.get("num_gpus", 0))] * count
    return demands


def packs(demands: list[tuple[float, float]], nodes: list[tuple[float, float]]) -> bool:
    """First-fit decreasing, as a check that every replica finds one node with room for all it asks (an actor never
    spans nodes)."""
    free = [list(node) for node in nodes]
    for cpus, gpus in sorted(demands, key=lambda d: (d[1], d[0]), reverse=True):
        node = next((n for n in free if n[0] >= cpus and n[1] >= gpus), None)
        if node is None:
            return False
        node[0] -= cpus
        node[1] -= gpus
    return True


def cluster_nodes(cluster: dict, at_max: bool) -> list[tuple[float, float]]:
    nodes = [ray_node_resources(cluster["headGroupSpec"])]
    for group in cluster.get("workerGroupSpecs", []):
        nodes += [ray_node_resources(group)] * group["maxReplicas" if at_max else "minReplicas"]
    return nodes


def pod_templates(cluster: dict) -> Iterator[tuple[str, dict]]:
    yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]


def test_expected_manifests_exist():
    assert {"rayservice-glm5.yaml", "rayservice-tiny-cpu.yaml", "rayjob-bench.yaml"} <= set(DOCUMENTS)


@pytest.mark.parametrize("rayservice", documents_of("RayService"))
def test_every_pod_reads_the_kv_transfer_secret(rayservice):
    """Prefill and decode replicas can land on any pod: each must see the same cluster secret."""
    (secret,) = [d for d in DOCUMENTS["kv-transfer-secret.yaml"] if d["kind"] == "Secret"]
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            (env,) = [e for e in container.get("env", []) if e["name"] == "GLMSERVE_KV_SECRET"]
            ref = env["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_documents_have_known_kinds(name):
    assert DOCUMENTS[name], f"{name} holds no document"
    for doc in DOCUMENTS[name]:
        assert doc["metadata"]["name"], f"{name}: a document without a name"
        kind = (doc["apiVersion"], doc["kind"])
        assert kind in CORE_KINDS or (doc["apiVersion"] == "ray.io/v1" and doc["kind"] in CRD_FILES), kind


@pytest.mark.parametrize("doc", documents_of("RayService") + documents_of("RayJob"))
def test_validates_against_kuberay_crd(doc, shared_dir):
    errors = crd_errors(doc, shared_dir)
    assert not errors, "\n".join(errors)


def test_crd_validation_rejects_typos_and_wrong_types(shared_dir):
    doc = the_rayservice("rayservice-tiny-cpu.yaml")
    assert not crd_errors(doc, shared_dir)
    typo = copy.deepcopy(doc)
    typo["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    assert any("minReplica" in e for e in crd_errors(typo, shared_dir))
    wrong_type = copy.deepcopy(doc)
    wrong_type["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert any("rayStartParams.num-cpus" in e for e in crd_errors(wrong_type, shared_dir))


def unknown_keys(data: dict, model) -> set[str]:
    """Ray's schemas ignore unknown keys, so a misspelled option would be dropped silently: look for them here."""
    return set(data) - set(model.model_fields)


@pytest.mark.parametrize("rayservice", documents_of("RayService"))
def test_serve_config_is_a_ray_serve_config(rayservice):
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    assert not unknown_keys(config, ServeDeploySchema)
    assert config.get("http_options", {}).get("port", SERVE_PORT) == SERVE_PORT
    for app in config["applications"]:
        assert not unknown_keys(app, ServeApplicationSchema)
        for deployment in app.get("deployments", []):
            assert not unknown_keys(deployment, DeploymentSchema), deployment["name"]
            assert not unknown_keys(deployment.get("ray_actor_options", {}), RayActorOptionsSchema)
            if "autoscaling_config" in deployment:
                assert not unknown_keys(deployment["autoscaling_config"], AutoscalingConfig)
                AutoscalingConfig.model_validate(deployment["autoscaling_config"])


@pytest.mark.parametrize("rayservice", documents_of("RayService"))
def test_application_args_are_a_serving_config(rayservice):
    for app in applications(rayservice):
        assert app["import_path"] == BUILDER
        assert app["route_prefix"] == "/"
        ServingConfig.model_validate(app["args"])


@pytest.mark.parametrize("rayservice", documents_of("RayService"))
def test_deployment_overrides_agree_with_the_args(rayservice):
    for app in applications(rayservice):
        config = ServingConfig.model_validate(app["args"])
        names = [d["name"] for d in app.get("deployments", [])]
        assert len(names) == len(set(names)), names
        assert set(names) <= APP_DEPLOYMENTS, set(names) - APP_DEPLOYMENTS
        for name, role_name in ROLES.items():
            opts = overrides(app).get(name)
            if opts is None:
                continue
            role: RoleConfig = getattr(config, role_name)
            actor = opts.get("ray_actor_options")
            if actor is not None:  # replaces the code's options whole: both numbers must be there
                assert (actor.get("num_cpus"), actor.get("num_gpus")) == (role.num_cpus, role.num_gpus), name
            for key in ("max_ongoing_requests", "max_queued_requests", "graceful_shutdown_timeout_s"):
                assert opts.get(key, getattr(role, key)) == getattr(role, key), f"{name}.{key}"
            if role.autoscaling is None:
                assert "autoscaling_config" not in opts, name
                assert opts.get("num_replicas", role.replicas) == role.replicas, name
            else:
                assert "num_replicas" not in opts, name
                # an override replaces the code's autoscaling_config whole, so it must hold the policy too
                scaling = opts.get("autoscaling_config")
                if scaling is not None:
                    expected = autoscaling_config(role_name, role.autoscaling, config)
                    for key, value in expected.items():
                        assert scaling.get(key, value) == value, f"{name}.autoscaling_config.{key}"
                    assert scaling.get("policy") == expected.get("policy"), f"{name}.autoscaling_config.policy"


@pytest.mark.parametrize("rayservice", documents_of("RayService"))
def test_pods_outlive_the_replicas_drain(rayservice):
    """A pod deleted (upgrade, scale-in) must give its replicas graceful_shutdown_timeout_s before SIGKILL."""
    drain = max(
        getattr(ServingConfig.model_validate(app["args"]), role).graceful_shutdown_timeout_s
        for app in applications(rayservice)
        for role in ROLES.values()
    )
    for name, pod in pod_templates(rayservice["spec"]["rayClusterConfig"]):
        assert pod["spec"].get("terminationGracePeriodSeconds", 30) > drain, name


@pytest.mark.parametrize("rayservice", documents_of("RayService"))
def test_replicas_pack_into_the_pods(rayservice):
    cluster = rayservice["spec"]["rayClusterConfig"]
    for app in applications(rayservice):
        config = ServingConfig.model_validate(app["args"])
        for at_max in (False, True):
            demands = replica_demands(config, app, at_max)
            nodes = cluster_nodes(cluster, at_max)
            assert packs(demands, nodes), f"{'max' if at_max else 'min'} scale: {demands} do not fit {nodes}"
            # GPU pods come and go with the replicas: none sits idle at either end of the range
            assert sum(g for _, g in demands) == sum(g for _, g in nodes), f"{'max' if at_max else 'min'} scale"


@pytest.mark.parametrize("rayservice", documents_of("RayService"))
def test_gpu_requests_are_whole_and_on_workers(rayservice):
    cluster = rayservice["spec"]["rayClusterConfig"]
    for group_name, template in pod_templates(cluster):
        resources = ray_container(template).get("resources", {})
        requested, limit = resources.get("requests", {}).get(GPU), resources.get("limits", {}).get(GPU)
        assert requested is None or requested == limit, f"{group_name}: GPU requests must equal limits"
        if group_name == "head":
            assert limit is None, "the head runs no replica and needs no GPU"
    for group in cluster.get("workerGroupSpecs", []):
        cpus, gpus = ray_node_resources(group)
        assert gpus == int(gpus) and cpus > 0, group["groupName"]


def test_glm5_service_runs_prefill_and_decode_on_8_gpu_pods():
    service = the_rayservice("rayservice-glm5.yaml")
    (app,) = applications(service)
    config = ServingConfig.model_validate(app["args"])
    assert config.engine.device == "cuda" and config.engine.model
    assert config.prefill.num_gpus == config.decode.num_gpus == 8
    assert config.decode.autoscaling is not None and config.decode.autoscaling.max_replicas > 1
    gpu_pods = [ray_node_resources(g)[1] for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    assert gpu_pods == [8]


def test_tiny_service_needs_no_gpu():
    service = the_rayservice("rayservice-tiny-cpu.yaml")
    (app,) = applications(service)
    config = ServingConfig.model_validate(app["args"])
    assert config.engine.model is None and config.engine.device == "cpu"
    assert "nvidia.com" not in yaml.safe_dump(service)


@pytest.mark.parametrize("rayservice", documents_of("RayService"))
def test_checkpoint_is_mounted_wherever_the_app_runs(rayservice):
    claims = {
        d["metadata"]["name"] for docs in DOCUMENTS.values() for d in docs if d["kind"] == "PersistentVolumeClaim"
    }
    for app in applications(rayservice):
        model = ServingConfig.model_validate(app["args"]).engine.model
        if model is None:
            continue
        for group_name, template in pod_templates(rayservice["spec"]["rayClusterConfig"]):
            volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
            mounts = [
                m
                for m in ray_container(template).get("volumeMounts", [])
                if PurePosixPath(model).is_relative_to(m["mountPath"])
            ]
            assert mounts, f"{group_name}: nothing mounted at {model}"
            claim = volumes[mounts[0]["name"]].get("persistentVolumeClaim", {}).get("claimName")
            assert claim is None or claim in claims, f"{group_name}: claim {claim} is declared in no k8s/ file"


def test_ray_version_matches_the_image():
    dockerfile = (K8S / "Dockerfile").read_text()
    (base,) = [line.split("=", 1)[1] for line in dockerfile.splitlines() if line.startswith("ARG BASE_IMAGE=")]
    image_version = base.split(":")[1].split("-")[0]
    for name, docs in DOCUMENTS.items():
        for doc in docs:
            if doc["apiVersion"] == "ray.io/v1":
                spec = doc["spec"]
                cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec")
                assert cluster["rayVersion"] == image_version, name


def jobs_running(*command: str) -> list:
    """The RayJob documents whose entrypoint starts with `command` ("glmserve", "bench")."""
    return [p for p in documents_of("RayJob") if shlex.split(p.values[0]["spec"]["entrypoint"])[: len(command)]
            == list(command)]  # fmt: skip


@pytest.mark.parametrize("rayjob", jobs_running("glmserve", "bench"))
def test_bench_job_replays_a_trace_against_a_service(rayjob):
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:3] == ["glmserve", "bench", "serve"], argv
    args = build_parser().parse_args(argv[1:])  # the real command line: an unknown flag exits here
    bench = BenchServeConfig.model_validate({k: v for k, v in vars(args).items() if v is not None})
    assert bench.trace in NAMED_TRACES
    services = {d["metadata"]["name"] for docs in DOCUMENTS.values() for d in docs if d["kind"] == "RayService"}
    url = urlparse(bench.base_url)
    assert url.hostname in {f"{name}-serve-svc" for name in services}, url.hostname
    assert url.port == SERVE_PORT
    head = ray_container(rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"])
    mounts = [m["mountPath"] for m in head.get("volumeMounts", [])]
    assert any(PurePosixPath(bench.output_json).is_relative_to(m) for m in mounts), "the report would be lost"


def test_every_rayjob_runs_a_known_command():
    assert len(jobs_running("glmserve", "bench")) + len(jobs_running("glmserve", "batch")) == len(
        documents_of("RayJob")
    )
    assert jobs_running("glmserve", "batch"), "k8s/rayjob-batch.yaml"


@pytest.mark.parametrize("rayjob", jobs_running("glmserve", "batch"))
def test_batch_job_reads_and_writes_a_volume_every_pod_mounts(rayjob):
    """The real command line validates (an unknown flag exits here, a bad value fails JobConfig); its input, output,
    error file and summary lie on a declared volume that the head (the driver writes the results) and every worker
    (the engine actors read the documents) mount at the same path; the engine actors fit the workers."""
    from glmserve.batch.job import JobConfig

    argv = shlex.split(rayjob["spec"]["entrypoint"])
    config = JobConfig.from_args(build_parser().parse_args(argv[1:]))
    claims = {
        d["metadata"]["name"]: d for docs in DOCUMENTS.values() for d in docs if d["kind"] == "PersistentVolumeClaim"
    }
    cluster = rayjob["spec"]["rayClusterSpec"]
    paths = [config.input or config.documents, config.output, config.errors_path, config.summary_json]
    for group_name, template in pod_templates(cluster):
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        for path in filter(None, paths):
            mounts = [m for m in ray_container(template).get("volumeMounts", [])
                      if PurePosixPath(path).is_relative_to(m["mountPath"])]  # fmt: skip
            assert mounts, f"{group_name}: nothing mounted at {path}"
            claim = volumes[mounts[0]["name"]]["persistentVolumeClaim"]["claimName"]
            assert claim in claims, f"{group_name}: claim {claim} is declared in no k8s/ file"
            if cluster.get("workerGroupSpecs"):
                assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"], "head and workers share it"
    workers = [ray_node_resources(g) for g in cluster.get("workerGroupSpecs", []) for _ in range(g["minReplicas"])]
    actor = (config.num_cpus_per_actor, config.num_gpus_per_actor or 0)
    assert packs([actor] * config.concurrency, workers), f"{config.concurrency} actors of {actor} on {workers}"
