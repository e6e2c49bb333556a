"""Static checks of cluster/ and jobs/: cluster/ holds only what the tests run (the two-node script
and its README), every command in cluster/README.md is one tests/test_multinode.py runs (an unknown
one fails here), no commands hide in the job YAML comments, every file the docs name exists, and
every documented environment variable is read where the table says."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def test_cluster_holds_only_tested_files():
    """Cloud launcher YAML, Kubernetes manifests and images cannot run in this project's sandbox (no
    cloud, no container registry): they were removed, not shipped untested."""
    assert sorted(p.name for p in CLUSTER.iterdir()) == ["README.md", "local_multinode.sh"]


def test_files_named_in_the_docs_exist():
    docs = [REPO / "README.md", CLUSTER / "README.md", *sorted((REPO / "jobs").glob("*.yaml"))]
    named = {m for f in docs for m in re.findall(r"\b((?:cluster|jobs|tests)/[\w./-]*\w)", f.read_text())}
    assert {"cluster/local_multinode.sh", "jobs/train_cluster.yaml"} <= named
    import yaml

    excluded = {e.strip("/") for e in yaml.safe_load((REPO / "jobs/runtime_env.yaml").read_text())["excludes"]}
    missing = sorted(n for n in named - excluded if not (REPO / n).exists())  # excludes may be absent
    assert not missing, missing


def test_local_multinode_script():
    script = CLUSTER / "local_multinode.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "export RAY_AUTH_MODE=token" in text
    assert "--node-ip-address 127.0.0.1" in text and "--dashboard-host 127.0.0.1" in text
    assert re.search(r"^\s*stop\)", text, re.M) and '"$RAY" stop' not in text  # stop ends this cluster only


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
    assert "MEDI_DIST_SHARDS_URI" not in readme


# --- every command in cluster/README.md: run by a test, or an error ---------------------------------


def _cluster_doc_commands() -> list[list[str]]:
    """argv of every command in cluster/README.md's bash blocks; `a && b` is two."""
    import shlex

    out = []
    for block in re.findall(r"```bash\n(.*?)```", (CLUSTER / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            while argv:
                cut = argv.index("&&") if "&&" in argv else len(argv)
                out.append(argv[:cut])
                argv = argv[cut + 1 :]
    return out


def _check_command(argv: list[str]) -> str:
    """Where a test runs the command; anything else fails."""
    env = {}
    while argv and re.fullmatch(r"[A-Z_]+=.*", argv[0]):
        k, v = argv.pop(0).split("=", 1)
        env[k] = v
    if argv[:1] == ["cluster/local_multinode.sh"] and argv[1:] in (["start"], ["status"], ["stop"]):
        assert env == {"RAY": ".venv/bin/ray"} and ".venv" in (REPO / "Makefile").read_text()
        assert re.search(rf"^\s*{argv[1]}\)", (CLUSTER / "local_multinode.sh").read_text(), re.M)
        return "tests/test_multinode.py: two_nodes, test_status_of_the_two_nodes"
    if argv == ["export", "RAY_AUTH_MODE=token"] and not env:
        return "tests/test_multinode.py: every job is submitted with RAY_AUTH_MODE=token"
    raise AssertionError(f"{' '.join(argv)}: a command in cluster/README.md that no test runs")


def test_every_cluster_readme_command_is_run_by_a_test():
    cmds = _cluster_doc_commands()
    assert [c[-1] for c in cmds] == ["start", "status", "RAY_AUTH_MODE=token", "stop"], cmds
    for argv in cmds:
        _check_command(list(argv))
    multinode = (REPO / "tests/test_multinode.py").read_text()
    for sub in ("start", "status", "stop"):
        assert f'"cluster/local_multinode.sh"), "{sub}"]' in multinode, sub
    assert '"RAY_AUTH_MODE": "token"' in multinode
    for bad in (["kubectl", "apply", "-f", "x.yaml"], ["ray", "up", "cluster.yaml"], ["docker", "build", "."]):
        with pytest.raises(AssertionError, match="no test runs"):
            _check_command(bad)
    with pytest.raises(AssertionError, match="no test runs"):
        _check_command(["RAY=.venv/bin/ray", "cluster/local_multinode.sh", "restart"])


def test_no_commands_hide_in_job_comments():
    """Commands live in cluster/README.md (checked above) and the README; the YAML files point there."""
    for f in sorted(REPO.glob("jobs/*.yaml")):
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
    import medi_dist

    code = "".join(p.read_text() for p in Path(medi_dist.__file__).parent.rglob("*.py"))
    for key in re.findall(r"`(MEDI_DIST_\w+)`", table):
        assert key in code, f"{key} is documented but nothing in medi_dist reads it"
