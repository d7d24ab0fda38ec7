"""Structure of the cluster definitions in cluster/: every file loads and has what matters (node
types, autoscaling bounds, token auth, entry points that exist and configs that validate, nothing
on 0.0.0.0 without auth in front), and the dashboards query only metrics the code exports."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from biglearn.config import load_config
from biglearn.serving import ServingConfig
from biglearn.train.config import PretrainConfig

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
RAY_VERSION = importlib.metadata.version("ray")
# Ray's own Serve metrics the serving dashboard uses; each was seen on a 2.60 metrics port
# (../shared/notes/ray-2.60.md section 4). Everything else must be ours.
RAY_SERVE_METRICS = {
    "ray_serve_num_http_requests_total",
    "ray_serve_http_request_latency_ms_bucket",
    "ray_serve_deployment_replica_healthy",
    "ray_serve_deployment_queued_queries",
    "ray_serve_replica_processing_queries",
}


def load_yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_every_cluster_file_is_checked_here():
    files = {
        p.relative_to(CLUSTER).as_posix() for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }
    assert files == {
        "aws.yaml",
        "local.py",
        "Dockerfile",
        "prometheus/kubernetes.yml",
        "prometheus/local.yml",
        "prometheus/vms.yml",
        "kuberay/rayjob-pretrain.yaml",
        "kuberay/rayservice-serve.yaml",
        "grafana/README.md",
        "grafana/biglearn-serving.json",
        "grafana/biglearn-training.json",
    }, "a new file in cluster/ needs its structure test"


# --- cluster launcher (AWS) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def aws() -> dict:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def test_aws_launcher_matches_rays_schema(aws):
    import jsonschema

    ray_dir = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    jsonschema.validate(aws, json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text()))


def test_aws_node_types_and_autoscaling_bounds(aws):
    types = aws["available_node_types"]
    assert types[aws["head_node_type"]]["resources"] == {"CPU": 0}, "the head must not take tasks or Train workers"
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    cpu_workers = [t for name, t in types.items() if name != aws["head_node_type"] and not t["resources"].get("GPU")]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == 0 and 1 <= gpu[0]["max_workers"] <= aws["max_workers"]
    assert gpu[0]["node_config"]["InstanceType"]
    assert len(cpu_workers) == 1 and cpu_workers[0]["min_workers"] == 0 and cpu_workers[0]["max_workers"] >= 1
    assert cpu_workers[0]["labels"] == {"ray-subcluster": "data"}
    assert sum(t.get("max_workers", 0) for t in types.values()) <= aws["max_workers"]


def test_aws_token_auth_on_every_node_and_project_installed(aws):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in aws[key] if "ray start" in c]
        assert starts and all(c.index("RAY_AUTH_MODE=token") < c.index("ray start") for c in starts), key
    token = next(remote for remote, local in aws["file_mounts"].items() if "auth_token" in remote)
    assert f"chmod 600 {token}" in aws["setup_commands"]
    project = next(remote for remote, local in aws["file_mounts"].items() if local == ".")
    assert any(f"pip install --quiet -e {project}'[train,serve,s3]'" in c for c in aws["setup_commands"])
    head = " ".join(aws["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in yaml.safe_dump(aws)


# --- KubeRay ---------------------------------------------------------------------------------


def ray_cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]["rayClusterConfig"]


@pytest.mark.parametrize("name", ["rayjob-pretrain.yaml", "rayservice-serve.yaml"])
def test_kuberay_auth_autoscaling_and_gpu_workers(name):
    doc = load_yaml_documents(CLUSTER / "kuberay" / name)[0]
    spec = ray_cluster_spec(doc)
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert gpu_groups, "a GPU worker group"
    for group in spec["workerGroupSpecs"]:
        assert (
            0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            and group["maxReplicas"] > group["minReplicas"]
        )
        limits, requests = (group["template"]["spec"]["containers"][0]["resources"][k] for k in ("limits", "requests"))
        assert limits == requests, "GPU and CPU requests equal to limits: the autoscaler plans with them"
    images = {
        c["image"]
        for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for c in g["template"]["spec"]["containers"]
    }
    assert len(images) == 1, "every node runs the same image (cluster/Dockerfile)"
    pods = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for pod in pods:  # what cluster/prometheus/kubernetes.yml scrapes
        assert pod["rayStartParams"]["metrics-export-port"] == "8080"
        assert {"containerPort": 8080, "name": "metrics"} in pod["template"]["spec"]["containers"][0]["ports"]


def test_rayjob_entrypoint_runs_a_job_that_exists_with_a_valid_config():
    doc = load_yaml_documents(CLUSTER / "kuberay" / "rayjob-pretrain.yaml")[0]
    assert doc["spec"]["shutdownAfterJobFinishes"] is True
    args = shlex.split(doc["spec"]["entrypoint"])
    assert args[:2] == ["python", "jobs/pretrain.py"] and (REPO / args[1]).is_file()
    config = args[args.index("--config") + 1]
    assert (REPO / config).is_file()
    overrides = [args[i + 1] for i, arg in enumerate(args) if arg == "--set"]
    cfg = load_config(PretrainConfig, REPO / config, overrides)  # unknown keys or bad values raise
    assert cfg.run.storage.startswith("s3://"), "every pod must see run.storage"
    assert cfg.cluster.max_failures >= 1 and cfg.cluster.use_gpu is True
    assert yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["working_dir"] == "/home/ray/biglearn"


def test_rayservice_runs_serve_app_with_valid_settings_and_auth_in_front():
    service, policy = load_yaml_documents(CLUSTER / "kuberay" / "rayservice-serve.yaml")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (application,) = serve_config["applications"]
    module, function = application["import_path"].split(":")
    source = REPO / (module.replace(".", "/") + ".py")
    assert function in {f.name for f in ast.parse(source.read_text()).body if isinstance(f, ast.FunctionDef)}
    settings = ServingConfig.model_validate(application["args"]["settings"])
    deployments = {d["name"]: d for d in application["deployments"]}
    assert set(deployments) == {"Gateway", "Completer"}  # the names build_app binds
    assert deployments["Completer"]["max_ongoing_requests"] >= settings.batching.max_batch_rows
    assert application["logging_config"]["enable_access_log"] is False
    assert application["args"]["export"].startswith("s3://")

    # Serve listens on the pod address; only the authenticating gateway may reach its port.
    assert serve_config["http_options"]["host"] == "0.0.0.0"
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    pod_labels = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    port = serve_config["http_options"]["port"]
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "an ingress rule without `from` admits everyone"
        if any(p["port"] == port for p in rule.get("ports", [])):
            assert rule["from"] == [{"podSelector": {"matchLabels": {"biglearn/gateway": "true"}}}]


def test_dockerfile_uses_the_installed_ray_and_installs_the_project():
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{RAY_VERSION}-py311-gpu" in text
    assert "WORKDIR /home/ray/biglearn" in text and 'pip install --no-cache-dir -e ".[train,serve,s3]"' in text


# --- metrics -----------------------------------------------------------------------------------


def test_prometheus_scrapes_ray_nodes_on_vms_kubernetes_and_one_machine():
    def jobs(name: str) -> dict:
        config = yaml.safe_load((CLUSTER / "prometheus" / name).read_text())
        return {job["job_name"]: job for job in config["scrape_configs"]}

    assert jobs("vms.yml")["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    keep = {
        tuple(r["source_labels"]): r["regex"]
        for r in jobs("kubernetes.yml")["ray-kuberay"]["relabel_configs"]
        if r.get("action") == "keep"
    }
    assert keep == {
        ("__meta_kubernetes_pod_label_ray_io_is_ray_node",): "yes",
        ("__meta_kubernetes_pod_container_port_name",): "metrics",
    }
    # `biglearn serve`'s default metrics port, on loopback where it listens.
    assert jobs("local.yml")["ray"]["static_configs"] == [{"targets": ["127.0.0.1:8080"]}]
    # Only the Kubernetes config needs a Prometheus built with Kubernetes discovery.
    for name in ("vms.yml", "local.yml"):
        assert "kubernetes_sd_configs" not in (CLUSTER / "prometheus" / name).read_text()


@pytest.mark.parametrize("name", ["vms.yml", "kubernetes.yml", "local.yml"])
def test_each_prometheus_config_loads_in_prometheus(name, tmp_path):
    """promtool (Prometheus' own checker; Debian's `prometheus` package has it) loads the config
    as shipped. Debian's build has no Kubernetes discovery, so it cannot load kubernetes.yml."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt install prometheus, or the upstream release)")
    if name == "vms.yml":  # the discovery file Ray writes; promtool checks that it parses
        (tmp_path / "sd.json").write_text('[{"labels": {"job": "ray"}, "targets": ["127.0.0.1:8080"]}]')
    config = (CLUSTER / "prometheus" / name).read_text()
    (tmp_path / name).write_text(
        config.replace("/tmp/ray/prom_metrics_service_discovery.json", str(tmp_path / "sd.json"))
    )
    check = subprocess.run([promtool, "check", "config", str(tmp_path / name)], capture_output=True, text=True)
    debian_without_kubernetes = "kubernetes_sd_configs" in check.stderr and "not found" in check.stderr
    if name == "kubernetes.yml" and debian_without_kubernetes:
        pytest.skip(f"this promtool has no Kubernetes discovery: {check.stderr.strip()[:200]}")
    assert check.returncode == 0, check.stdout + check.stderr


def exported_metrics() -> set[str]:
    """Prometheus sample names of the metrics our code defines (Ray adds `ray_`; counters get
    `_total`, histograms `_bucket`/`_sum`/`_count`)."""
    names = set()
    for call in ast.walk(ast.parse((REPO / "biglearn" / "serve" / "app.py").read_text())):
        if isinstance(call, ast.Call) and getattr(call.func, "id", "") in {"Counter", "Gauge", "Histogram"}:
            base, kind = "ray_" + call.args[0].value, call.func.id
            names |= (
                {f"{base}_total"}
                if kind == "Counter"
                else {base}
                if kind == "Gauge"
                else {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
            )
    progress = ast.parse((REPO / "biglearn" / "train" / "progress.py").read_text())
    (train_metrics,) = [
        n.value for n in progress.body if isinstance(n, ast.Assign) and n.targets[0].id == "TRAIN_METRICS"
    ]
    names |= {"ray_" + key.value for key in train_metrics.keys}  # gauges
    return names


def dashboard_metrics(path: Path) -> set[str]:
    dashboard = json.loads(path.read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queries += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return {name for query in queries for name in re.findall(r"\bray_[a-z0-9_]+", query)}


@pytest.mark.parametrize(
    "name, family", [("biglearn-training.json", "ray_biglearn_train_"), ("biglearn-serving.json", "ray_biglearn_")]
)
def test_dashboards_query_only_exported_metrics(name, family):
    queried = dashboard_metrics(CLUSTER / "grafana" / name)
    unknown = queried - exported_metrics() - RAY_SERVE_METRICS
    assert not unknown, f"{name} queries metrics nothing exports: {sorted(unknown)}"
    assert any(metric.startswith(family) for metric in queried)


def test_training_dashboard_shows_loss_throughput_and_mfu():
    queried = dashboard_metrics(CLUSTER / "grafana" / "biglearn-training.json")
    assert {
        "ray_biglearn_train_loss",
        "ray_biglearn_train_samples_per_second",
        "ray_biglearn_train_tflops_per_second",
        "ray_biglearn_train_mfu",
    } <= queried
