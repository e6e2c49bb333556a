"""Static checks of cluster/: the AWS launcher YAML passes Ray's own schema validation (no cloud
calls), the Kubernetes manifests are well-formed, private (ClusterIP only) and token-authenticated,
and every command in cluster/README.md is either one a test runs or checked against the files it
names (the cloud ones cannot run here)."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
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


# --- every command in cluster/README.md: run by a test, or checked here -----------------------------


def _readme_submit() -> tuple[list[str], list[str]]:
    """The README's tested `ray job submit` for train (tests/test_multinode.py runs it): (the submit
    part before `--`, the medi-dist command after it)."""
    import shlex

    block = (REPO / "README.md").read_text().split("## Run on a cluster", 1)[1].split("```bash\n", 1)[1]
    lines = block.split("```", 1)[0].replace("\\\n", " ").splitlines()
    (train,) = [shlex.split(x, comments=True) for x in lines if "medi-dist train" in x]
    cut = train.index("--")
    return train[:cut], train[cut + 1 :]


def _cluster_doc_commands() -> list[tuple[str, list[str]]]:
    """(section heading, argv) of every command in cluster/README.md's bash blocks; `a && b` is two."""
    import shlex

    out, section = [], ""
    text = (CLUSTER / "README.md").read_text()
    for part in re.split(r"(^## .*$)", text, flags=re.M):
        if part.startswith("## "):
            section = part[3:].strip()
            continue
        for block in re.findall(r"```bash\n(.*?)```", part, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                argv = [a for a in shlex.split(line, comments=True) if a != "&"]
                while argv:
                    cut = argv.index("&&") if "&&" in argv else len(argv)
                    out.append((section, argv[:cut]))
                    argv = argv[cut + 1 :]
    return out


def _k8s(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in _docs() if d["kind"] == kind}


def _images() -> set[str]:
    images = set()
    for _, d in _docs():
        spec = d.get("spec", {})
        templates = [spec.get("template")]
        for rs in [spec, spec.get("rayClusterSpec", {})]:
            templates += [rs.get("headGroupSpec", {}).get("template")]
            templates += [g["template"] for g in rs.get("workerGroupSpecs", [])]
        images |= {c["image"] for t in templates if t for c in _containers(t)}
    return images


def _pins() -> tuple[str, str]:
    """(medi-dist's version, the MLflow pin) from pyproject.toml."""
    text = (REPO / "pyproject.toml").read_text()
    return re.search(r'^version = "(.+)"', text, re.M).group(1), re.search(r'"mlflow==(.+?)"', text).group(1)


def _check_docker(argv: list[str], built: list[str]) -> None:
    if argv[1] == "push":
        assert argv[2:] == built[-1:], f"pushes {argv[2:]}, built {built[-1:]}"
        return
    assert argv[1] == "build"
    tag, context = argv[argv.index("-t") + 1], argv[-1]
    dockerfile = REPO / (argv[argv.index("-f") + 1] if "-f" in argv else f"{context}/Dockerfile")
    text = dockerfile.read_text()
    built.append(tag)
    version, mlflow_pin = _pins()
    if dockerfile == CLUSTER / "Dockerfile":  # the project image every Ray pod runs
        assert context == "." and tag == f"REGISTRY/medi-dist:{version}", tag
        assert tag in _images(), f"{tag} is not the image the manifests run"
        assert f"FROM rayproject/ray:{ray.__version__}-py311" in text
        copy_dest = re.search(r"^COPY .* \. (\S+)$", text, re.M).group(1)
        assert f"WORKDIR {copy_dest}" in text and f"pip install --no-cache-dir {copy_dest}" in text
        (job,) = _k8s("RayJob").values()
        assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"] == copy_dest
        ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
        assert {".venv", ".git", "data"} <= set(ignore)
    else:  # the MLflow server image
        assert dockerfile == CLUSTER / "mlflow/Dockerfile", dockerfile
        assert tag == f"REGISTRY/medi-dist-mlflow:{mlflow_pin}" and f"mlflow:v{mlflow_pin}" in text
        assert _containers(_k8s("Deployment")["mlflow"]["spec"]["template"])[0]["image"] == tag
        assert "psycopg2" in text and "boto3" in text


def _secret_refs(name: str) -> set[str]:
    """The keys of Secret `name` that the manifests read (secretKeyRef)."""
    found = re.findall(r"secretKeyRef: \{name: ([\w-]+), key: ([\w-]+)\}", "".join(f.read_text() for f in K8S_FILES))
    return {k for n, k in found if n == name}


def _check_kubectl(argv: list[str]) -> None:
    if argv[1:] == ["create", "namespace", "medi-dist"]:
        return
    assert argv[1:3] == ["-n", "medi-dist"], argv
    verb, rest = argv[3], argv[4:]
    if verb == "create":
        assert rest[:2] == ["secret", "generic"]
        name = rest[2]
        lits = dict(a.split("=", 1)[1].split("=", 1) for a in rest[3:])
        if name == "medi-dist-ray-token":  # KubeRay's authOptions Secret: key auth_token
            assert set(lits) == {"auth_token"}
            assert {s["authOptions"]["secretName"] for _, s in _ray_specs()} == {name}
        else:
            assert name == "mlflow-db" and set(lits) == _secret_refs(name), (lits, _secret_refs(name))
            m = re.fullmatch(r"postgresql\+psycopg2://(\w+):\$\{PGPASS\}@([\w-]+):(\d+)/(\w+)", lits["uri"])
            assert m and lits["password"] == "$PGPASS", lits
            user, host, port, db = m.groups()
            svc = _k8s("Service")[host]
            assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
            (pg,) = _containers(_k8s("StatefulSet")[host]["spec"]["template"])
            env = {e["name"]: e.get("value") for e in pg["env"]}
            assert env["POSTGRES_USER"] == user and env["POSTGRES_DB"] == db
    elif verb == "apply":
        files = [rest[i + 1] for i, a in enumerate(rest) if a == "-f"]
        assert files and all(REPO / f in K8S_FILES for f in files), files
    elif verb == "get":
        assert rest[0] == "rayjob" and rest[1] in _k8s("RayJob"), rest
    elif verb == "port-forward":
        name, ports = rest[0].removeprefix("svc/"), rest[1].split(":")
        if name in _k8s("Service"):
            assert int(ports[1]) in [p["port"] for p in _k8s("Service")[name]["spec"]["ports"]]
        else:  # KubeRay names a RayCluster's head Service <name>-head-svc
            head = _k8s("RayCluster")[name.removesuffix("-head-svc")]["spec"]["headGroupSpec"]["template"]
            assert int(ports[1]) in [p["containerPort"] for p in _containers(head)[0]["ports"]]
    else:
        raise AssertionError(f"kubectl {verb}: not checked")


def _check_command(section: str, argv: list[str], built: list[str]) -> str:
    """'run' (a test runs it) or 'offline' (checked here); anything unknown fails."""
    env = {}
    while argv and re.fullmatch(r"[A-Z_]+=.*", argv[0]):
        k, v = argv.pop(0).split("=", 1)
        env[k] = v
    if not argv:
        assert set(env) == {"PGPASS"}, env  # a shell variable for the next command
        return "offline"
    submit, entry = _readme_submit()
    if argv[0] == "cluster/local_multinode.sh":
        assert env == {"RAY": ".venv/bin/ray"} and ".venv" in (REPO / "Makefile").read_text()
        assert re.search(rf"^\s*{argv[1]}\)", (CLUSTER / "local_multinode.sh").read_text(), re.M)
        return "run" if argv[1:] in (["start"], ["status"]) else "offline"  # stop = `ray stop`, see the doc
    if argv[0] == "export":
        for a in argv[1:]:
            k, v = a.split("=", 1)
            if k == "RAY_AUTH_MODE":
                assert v == "token"
            else:
                assert k == "RAY_AUTH_TOKEN", k
                m = re.fullmatch(r"\$\(kubectl (.*) \| base64 -d\)", v)
                assert m, v
                get = m.group(1).split()
                assert get[:5] == ["-n", "medi-dist", "get", "secret", "medi-dist-ray-token"], get
                assert "jsonpath={.data.auth_token}" in get[-1].replace("'", "")
        return "offline"
    if argv[:2] == ["ray", "get-auth-token"]:
        assert argv == ["ray", "get-auth-token", "--generate"]  # the README block's first command
        return "run"
    if argv[0] == "ray" and argv[1] in ("up", "dashboard", "down"):
        assert argv[2:] == ["cluster/aws-gpu.yaml"]  # validated by test_aws_config_passes_ray_validation
        return "offline"
    if argv[:3] == ["ray", "job", "submit"]:
        cut = argv.index("--")
        assert argv[:cut] == submit, f"{argv[:cut]} is not the README's tested {submit}"
        assert argv[cut + 1 : cut + 5] == entry[:4], argv[cut + 1 :]
        extra = argv[cut + 5 :]
        if section.startswith("Kubernetes"):  # the ConfigMap gives every pod the MLflow server
            assert extra == [] and _k8s("ConfigMap")["medi-dist-env"]["data"]["MLFLOW_TRACKING_URI"]
        else:
            assert extra == ["run.tracking_uri=http://MLFLOW_HOST:5000"], extra
        assert env in ({}, {"RAY_AUTH_MODE": "token"})
        return "run"  # the same command as the README's, which tests/test_multinode.py runs
    if argv[0] == "aws":
        assert argv[1] == "ec2" and argv[2] in ("create-security-group", "authorize-security-group-ingress")
        assert "0.0.0.0/0" not in argv
        if "--cidr" in argv:
            assert argv[argv.index("--cidr") + 1].endswith("/32") and argv[argv.index("--port") + 1] == "22"
        return "offline"
    if argv[0] == "docker":
        _check_docker(argv, built)
        return "offline"
    if argv[0] == "kubectl":
        _check_kubectl(argv)
        return "offline"
    raise AssertionError(f"{' '.join(argv)}: a command in cluster/README.md that no test runs or checks")


def test_every_cluster_readme_command_is_run_or_checked():
    cmds = _cluster_doc_commands()
    built: list[str] = []
    kinds = [(_check_command(s, list(a), built), a[:3]) for s, a in cmds]
    assert len(cmds) >= 30 and {k for k, _ in kinds} == {"run", "offline"}
    assert built == ["REGISTRY/medi-dist:0.1.0", "REGISTRY/medi-dist-mlflow:" + _pins()[1]]
    with pytest.raises(AssertionError, match="no test runs or checks"):
        _check_command("AWS", ["kubectl2", "apply"], [])
    with pytest.raises(AssertionError):  # an entrypoint other than the tested one
        _check_command("AWS", [*_readme_submit()[0], "--", "medi-dist", "train", "--config", "x.yaml"], [])


def test_no_commands_hide_in_manifest_or_job_comments():
    """Commands live in cluster/README.md (checked above) and the README; the YAML files point there."""
    for f in sorted(REPO.glob("jobs/*.yaml")) + [AWS] + K8S_FILES:
        for line in f.read_text().splitlines():
            assert not re.match(r"#\s+(\w+=\S+\s+)*(ray|medi-dist|kubectl|docker|aws) ", line), f"{f.name}: {line}"


def test_documented_variables_are_read_where_the_table_says():
    table = (CLUSTER / "README.md").read_text().split("### Environment variables", 1)[1].split("\n## ", 1)[0]
    rows = [r.split("|")[1:3] for r in table.splitlines() if r.startswith("| `")]
    checked = 0
    for names, reader in rows:
        for path in re.findall(r"`(medi_dist/[\w/]+\.py)`", reader):
            for var in re.findall(r"`([A-Z_]+)`", names):
                assert var in (REPO / path).read_text(), f"{var}: not read by {path}"
                checked += 1
    assert checked >= 3
