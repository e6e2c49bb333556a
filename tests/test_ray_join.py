"""Joining Ray when the cluster is not there or will not have us: a head started with `ray start` and
killed with SIGKILL (its record left behind, as after an OOM kill), a RAY_ADDRESS where nothing or
something else listens, a head refusing the token, a head of another Ray version. Every command that
joins Ray (train, generate, tune, demo) must end in seconds with one line naming the address, where it
came from and the fix. The head runs under its own RAY_TMPDIR, so the session's Ray and the machine's
/tmp/ray/ray_current_cluster are never touched. (`evaluate` does not use Ray.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from local_ray import free_port, processes_under
from medi_dist import cli
from synthetic_pools import ingest_procedural

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
TOKEN = "medi-dist-test-token-0123456789abcdef"
LIMIT_S = 15


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "RAY_TMPDIR"))}
    return {**env, **extra}


class Head:
    """A one-node cluster from `ray start --head`, token auth on, under its own temp root."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.env = _clean_env(RAY_TMPDIR=self.tmp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
        port, dash = free_port(), free_port()
        self.job_api = f"http://127.0.0.1:{dash}"
        subprocess.run(
            [
                RAY,
                "start",
                "--head",
                "--node-ip-address",
                "127.0.0.1",
                "--port",
                str(port),
                "--dashboard-port",
                str(dash),
                "--dashboard-agent-listen-port",
                str(free_port()),
                "--num-cpus",
                "1",
                "--object-store-memory",
                "80000000",
                "--disable-usage-stats",
            ],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=180,
        )
        self.address = (Path(self.tmp) / "ray" / "ray_current_cluster").read_text().strip()

    def processes(self):
        return processes_under(self.tmp)

    def kill(self) -> None:
        """SIGKILL, no `ray stop`: the record in RAY_TMPDIR/ray/ray_current_cluster stays."""
        import psutil

        # the dashboard's module processes do not name the temp dir: take every process's children too
        procs = {p for r in self.processes() for p in [r, *r.children(recursive=True)] if p.pid != os.getpid()}
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(list(procs), timeout=10)


@pytest.fixture(scope="module")
def head():
    h = Head()
    yield h
    h.kill()
    shutil.rmtree(h.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def inputs(proc_dataset, tmp_path_factory) -> dict:
    """Valid inputs that take each command up to the point where it joins Ray. The commands' modules are
    imported here: the timed calls measure the commands, not first imports (a minute on a loaded machine)."""
    import torch  # noqa: F401  (imported before the timed call, like the commands do)

    import medi_dist.demo
    import medi_dist.evaluate.downstream
    import medi_dist.evaluate.fidelity_job
    import medi_dist.generate.job
    import medi_dist.train.trainer
    import medi_dist.tune.study  # noqa: F401
    from medi_dist.metadata import ConditioningSpec
    from medi_dist.model import EMA, ConditionedUNet, ModelConfig, save_model_dir

    root = tmp_path_factory.mktemp("join")
    spec = ConditioningSpec.load(proc_dataset / "vocab.json").subset(["cancer_type", "tissue_source_site"], [])
    net = ConditionedUNet(ModelConfig.from_preset("tiny"), spec)
    save_model_dir(root / "model", net, EMA(net), extra_info={"name": "rand", "dataset": str(proc_dataset)})
    tune_real = ingest_procedural(root / "tune-real", n_types=2, n_sites=6, n_tiles=120, val=0.2)
    return {"root": root, "dataset": proc_dataset, "model": root / "model", "tune_real": tune_real}


def _args(command: str, inputs: dict, out: Path) -> list[str]:
    db = f"sqlite:///{out}/mlflow.db"
    return {
        "train": [
            "train",
            "--config",
            str(REPO / "jobs/train_small.yaml"),
            f"data.dataset={inputs['dataset']}",
            f"run.storage_path={out}/runs",
            f"run.tracking_uri={db}",
            "model.preset=tiny",
            "steps=2",
        ],
        "generate": [
            "generate",
            "--model",
            str(inputs["model"]),
            "--out",
            str(out / "gen"),
            "--mode",
            "unseen-pairs",
            "--count",
            "4",
            "--tracking-uri",
            db,
        ],
        "tune": [
            "tune",
            "--config",
            str(REPO / "jobs/tune_small.yaml"),
            f"real={inputs['tune_real']}",
            "space.ratio=[0]",
            "space.pools=[]",
            "num_samples=1",
            "seeds=[0]",
            f"storage_path={out}/runs",
            f"cache_dir={out}/cache",
            f"tracking_uri={db}",
        ],
        "demo": ["demo", "--out", str(out / "demo"), "--tiles", "96", "--train-steps", "1", "--seeds", "0"],
    }[command]


def _error_line(err: str) -> str:
    """The one line medi-dist printed; demo's progress bar (its own stderr lines) aside."""
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "stages |" not in ln]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


COMMANDS = ["train", "generate", "tune", "demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_unreachable_ray_address(command, inputs, tmp_path, monkeypatch, capsys):
    """In-process through cli.main (the join fails before ray.init, so the session's Ray is safe):
    a closed port on RAY_ADDRESS."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh `medi-dist` process
    closed = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", closed)
    t0 = time.time()
    rc = cli.main(_args(command, inputs, tmp_path))
    line = _error_line(capsys.readouterr().err)
    assert rc == 2 and time.time() - t0 < LIMIT_S
    assert line.startswith(
        f"medi-dist {command}: error: cannot join Ray at {closed} (RAY_ADDRESS): nothing listens "
        "there (connection refused); start that cluster or correct RAY_ADDRESS"
    ), line
    assert "RAY_ADDRESS=local" in line


SET_VERSION = """
import json, sys
from ray._common.usage.usage_constants import CLUSTER_METADATA_KEY as KEY
from ray._private.ray_constants import KV_NAMESPACE_CLUSTER as NS
from ray._raylet import GcsClient
gcs = GcsClient(address=sys.argv[1])
meta = json.loads(gcs.internal_kv_get(KEY, namespace=NS))
gcs.internal_kv_put(KEY, json.dumps({**meta, "ray_version": "2.0.0"}).encode(), True, namespace=NS)
"""
# A fresh `medi-dist` process, timed after the heavy imports (torch, Ray Train, Tune: tens of seconds on a
# loaded 2-core machine, and not what this is about); each JSON argument list is one command.
DRIVER = """
import json, sys, time
import medi_dist.demo, medi_dist.generate.job, medi_dist.train.trainer, medi_dist.tune.study
import medi_dist.evaluate.downstream, medi_dist.evaluate.fidelity_job
from medi_dist.cli import main
rc = 0
for args in map(json.loads, sys.argv[1:]):
    t = time.time()
    rc = main(args) or rc
    print(f"took {args[0]} {time.time() - t:.1f}", flush=True)
sys.exit(rc)
"""


def test_check_ray_on_a_closed_port(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert cli.main(["check-ray", "--address", url]) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(
        f"medi-dist check-ray: error: `ray job submit --address {url}` would fail: nothing listens "
        "there (connection refused); start the head, or the tunnel"
    ), line


def _start(env: dict[str, str], *commands: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, *map(json.dumps, commands)],
        env=env,
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _finish(proc: subprocess.Popen, failed: int = 1) -> tuple[list[str], str]:
    """The error lines (one per failed command) and stdout; every command ended within LIMIT_S."""
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, (out, err)
    times = [float(ln.split()[2]) for ln in out.splitlines() if ln.startswith("took ")]
    assert times and max(times) < LIMIT_S, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == failed and "Traceback" not in err, err[-3000:]
    return lines, out


def test_live_head_refuses_wrong_or_missing_token_and_other_versions(head, inputs, tmp_path):
    """Real `medi-dist` processes against a live token-auth head: each ends in seconds, one line."""
    assert head.processes(), "runs before the head is killed"
    check = ["check-ray", "--address", head.job_api]  # what `ray job submit --address` would meet
    wrong = _start(
        _clean_env(RAY_ADDRESS=head.address, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-token-" + "x" * 24),
        _args("train", inputs, tmp_path),
        check,
    )
    # RAY_AUTH_MODE unset: Ray sends no token to an explicit address, whatever ~/.ray/auth_token holds
    none = _start(_clean_env(RAY_ADDRESS=head.address), _args("generate", inputs, tmp_path), check)
    (train, job), _ = _finish(wrong, failed=2)
    assert train.startswith(
        f"medi-dist train: error: cannot join Ray at {head.address} (RAY_ADDRESS): the cluster "
        "refused the token in RAY_AUTH_TOKEN: it is not the cluster's token;"
    ), train
    assert "~/.ray/auth_token" in train and "RAY_AUTH_TOKEN_PATH" in train
    assert job.startswith(
        f"medi-dist check-ray: error: `ray job submit --address {head.job_api}` would fail: the "
        "cluster refused the token in RAY_AUTH_TOKEN"
    ), job
    (generate, job), _ = _finish(none, failed=2)
    for line in (generate, job):
        assert "this client sent no token" in line and "export RAY_AUTH_MODE=token" in line, line

    # The head now says it runs another Ray: the driver's own version check refuses to join.
    subprocess.run([sys.executable, "-c", SET_VERSION, head.address], env=head.env, check=True, timeout=120)
    # the recorded cluster and the right token
    [line], out = _finish(_start(head.env, _args("tune", inputs, tmp_path), check))
    assert line.startswith(
        f"medi-dist tune: error: cannot join Ray at {head.address} (the local cluster recorded "
        f"in {head.tmp}/ray/ray_current_cluster by `ray start`): version mismatch: the cluster runs "
        "Ray 2.0.0"
    ), line
    assert "pip install ray==2.0.0" in line
    assert f"job API at {head.job_api} answers and accepts this client's token" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_dead_recorded_cluster(command, head, inputs, tmp_path, monkeypatch, capsys):
    """The head killed without `ray stop`: Ray would retry its recorded address for ~14 minutes."""
    import ray

    head.kill()
    assert not head.processes()
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setenv("RAY_TMPDIR", head.tmp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    t0 = time.time()
    rc = cli.main(_args(command, inputs, tmp_path))
    line = _error_line(capsys.readouterr().err)
    assert rc == 2 and time.time() - t0 < LIMIT_S
    record = f"{head.tmp}/ray/ray_current_cluster"
    assert line == (
        f"medi-dist {command}: error: cannot join Ray at {head.address} (the local cluster recorded in "
        f"{record} by `ray start`): nothing listens there (connection refused); its head stopped without "
        f"`ray stop`: run `ray stop` (or delete {record}) and medi-dist starts a local Ray instance of its "
        "own, or set RAY_ADDRESS=local to start one now"
    )


def test_dead_recorded_cluster_real_process(head, inputs, tmp_path):
    """The same from a fresh process (the 832 s `medi-dist train` of issue 20)."""
    head.kill()
    [train, demo], _ = _finish(
        _start(_clean_env(RAY_TMPDIR=head.tmp), _args("train", inputs, tmp_path), _args("demo", inputs, tmp_path)),
        failed=2,
    )
    for line in (train, demo):
        assert f"cannot join Ray at {head.address} (the local cluster recorded in" in line and "`ray stop`" in line
