"""Static checks of cluster/: the AWS launcher YAML passes Ray's own schema validation (no cloud
calls), the Kubernetes manifests are well-formed, private (ClusterIP only) and token-authenticated."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
AWS = CLUSTER / "aws-gpu.yaml"
K8S_FILES = sorted((CLUSTER / "kuberay").glob("*.yaml")) + sorted((CLUSTER / "mlflow").glob("*.yaml"))


def _aws() -> dict:
    return yaml.safe_load(AWS.read_text())


def _validate(cfg: dict) -> dict:
    # prepare_config only merges the provider's packaged defaults.yaml; validate_config checks
    # ray-schema.json and the node-type invariants. Neither talks to AWS (bootstrap_config would).
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def _docs() -> list[tuple[Path, dict]]:
    out = []
    for f in K8S_FILES:
        out += [(f, d) for d in yaml.safe_load_all(f.read_text()) if d is not None]
    return out


def _ray_specs() -> list[tuple[str, dict]]:
    specs = []
    for f, d in _docs():
        if d["kind"] == "RayCluster":
            specs.append((f.name, d["spec"]))
        elif d["kind"] == "RayJob":
            specs.append((f.name, d["spec"]["rayClusterSpec"]))
    return specs


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


# --- AWS cluster launcher -------------------------------------------------------------------------


def test_aws_config_passes_ray_validation():
    prepared = _validate(_aws())
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_aws_validation_is_not_vacuous():
    cfg = _aws()
    cfg["available_node_types"]["head"]["not_a_field"] = 1
    with pytest.raises(jsonschema.ValidationError):
        _validate(cfg)


def test_aws_gpu_workers_and_setup():
    cfg = _aws()
    types = cfg["available_node_types"]
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    gpu = [k for k, v in workers.items() if re.match(r"(g5|p4d|p5)\.", v["node_config"]["InstanceType"])]
    assert gpu, "no g5/p4d/p5 worker type"
    for k in gpu:
        assert 0 <= workers[k]["min_workers"] <= workers[k]["max_workers"] <= cfg["max_workers"]
    assert any("pip install" in c and "medi-dist" in c for c in cfg["setup_commands"])
    assert ray.__version__ in cfg["docker"]["image"] and "py311" in cfg["docker"]["image"]


def test_aws_token_auth_and_private_dashboard():
    cfg = _aws()
    text = AWS.read_text()
    head = " ".join(cfg["head_start_ray_commands"])
    workers = " ".join(cfg["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head
    assert "RAY_AUTH_MODE=token ray start --address" in workers
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    # The token reaches the nodes as a file synced from the user's machine, never inline.
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert not re.search(r"RAY_AUTH_TOKEN\s*[=:]\s*\S", text)
    # Every node type names its security group, so Ray never creates its default one
    # (which opens SSH to 0.0.0.0/0); and nothing here opens anything to the world.
    for name, t in cfg["available_node_types"].items():
        assert t["node_config"].get("SecurityGroupIds"), name
    assert "0.0.0.0/0" not in str(cfg)  # (comments may mention it)
    assert "IpPermissions" not in str(cfg["provider"].get("security_group", {}))


# --- Kubernetes manifests -------------------------------------------------------------------------


def test_manifests_parse_with_required_fields():
    assert {f.name for f in K8S_FILES} >= {"raycluster.yaml", "rayjob.yaml", "mlflow.yaml", "postgres.yaml"}
    docs = _docs()
    assert docs
    for f, d in docs:
        assert isinstance(d, dict), f
        for key in ("apiVersion", "kind", "metadata"):
            assert d.get(key), f"{f.name}: {d.get('kind')} lacks {key}"
        assert d["metadata"].get("name"), f"{f.name}: {d['kind']} has no metadata.name"


def test_no_public_exposure():
    for f, d in _docs():
        assert d["kind"] not in ("Ingress", "Route", "Gateway"), f"{f.name} exposes {d['kind']}"
        if d["kind"] == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP", f"{f.name}: {d['metadata']['name']}"
    for name, spec in _ray_specs():
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", name
        assert spec["headGroupSpec"].get("enableIngress") is not True, name


def test_no_secret_values_in_manifests():
    for f, d in _docs():
        assert d["kind"] != "Secret", f"{f.name}: secrets are created with kubectl, not committed"
    for f in K8S_FILES:
        for m in re.finditer(r"(RAY_AUTH_TOKEN|POSTGRES_PASSWORD|auth_token)\s*[:=]\s*(\S+)", f.read_text()):
            assert m.group(2).startswith(("valueFrom", "{", '"$(')), f"{f.name}: {m.group(0)}"


def test_kuberay_gpu_group_and_token_auth():
    specs = _ray_specs()
    assert {n for n, _ in specs} == {"raycluster.yaml", "rayjob.yaml"}
    for name, spec in specs:
        assert spec["rayVersion"] == ray.__version__, name
        auth = spec.get("authOptions", {})
        assert auth.get("mode") == "token" and auth.get("secretName"), name
        gpu_groups = [
            g
            for g in spec["workerGroupSpecs"]
            if any(
                int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1
                for c in _containers(g["template"])
            )
        ]
        assert gpu_groups, f"{name}: no worker group with nvidia.com/gpu limits"
        for g in gpu_groups:
            assert g["minReplicas"] <= g["maxReplicas"]
        for tmpl in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
            for c in _containers(tmpl):
                assert ray.__version__ in c["image"] or c["image"].startswith("REGISTRY/"), c["image"]


def test_rayjob_entrypoint_and_object_storage():
    (job,) = [d for _, d in _docs() if d["kind"] == "RayJob"]
    assert job["spec"]["entrypoint"] == "medi-dist train --config jobs/train_cluster.yaml"
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"]
    (cm,) = [d for _, d in _docs() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "medi-dist-env"]
    assert cm["data"]["MLFLOW_TRACKING_URI"].startswith("http://mlflow")
    # Only variables something reads, each listed in cluster/README.md's table (the one place).
    table = (CLUSTER / "README.md").read_text().split("### Environment variables", 1)[1]
    for key in cm["data"]:
        assert f"`{key}`" in table, f"{key} is set in the ConfigMap but not documented as read"
    import medi_dist

    code = "".join(p.read_text() for p in Path(medi_dist.__file__).parent.rglob("*.py"))
    for key in re.findall(r"`(MEDI_DIST_\w+)`", table):
        assert key in code, f"{key} is documented but nothing in medi_dist reads it"
    for tmpl in [job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]] + [
        g["template"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    ]:
        for c in _containers(tmpl):
            assert {"configMapRef": {"name": "medi-dist-env"}} in c.get("envFrom", [])


def test_mlflow_server_postgres_and_s3():
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in _docs()}
    dep = docs[("Deployment", "mlflow")]
    (c,) = _containers(dep["spec"]["template"])
    args = " ".join(c["command"] + c["args"])
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in args
    assert "--artifacts-destination=s3://" in args and "--host=0.0.0.0" in args
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"
    assert docs[("Service", "mlflow")]["spec"]["type"] == "ClusterIP"
    assert ("StatefulSet", "mlflow-postgres") in docs


def test_local_multinode_script():
    script = CLUSTER / "local_multinode.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "export RAY_AUTH_MODE=token" in text
    assert "--node-ip-address 127.0.0.1" in text and "--dashboard-host 127.0.0.1" in text
    assert re.search(r"^\s*stop\)", text, re.M)


def test_train_cluster_config_loads_and_names_one_bucket_layout():
    """jobs/train_cluster.yaml is a valid TrainConfig whose dataset, checkpoints and model all live
    under the object-storage prefix cluster/README.md documents."""
    from medi_dist.config_loader import load_config
    from medi_dist.train.config import TrainConfig

    cfg = load_config(TrainConfig, str(CLUSTER.parent / "jobs/train_cluster.yaml"), [])
    prefix = "s3://BUCKET/medi-dist/"
    assert cfg.data.dataset.startswith(prefix + "datasets/")
    assert cfg.run.storage_path == prefix + "runs" and cfg.run.output.startswith(prefix + "models/")
    readme = (CLUSTER / "README.md").read_text()
    for part in ("datasets/<name>", "runs", "models/<run>"):
        assert f"`{prefix}{part}`" in readme
    assert "MEDI_DIST_SHARDS_URI" not in readme + (CLUSTER / "kuberay/common.yaml").read_text()
