"""Security (issue 7): weights only as safetensors, no unpickling of untrusted files, YAML only through
safe_load, no tar extraction to disk, and servers bound to 127.0.0.1 unless configured otherwise.

Each payload here would create a marker file if it ever ran; the tests assert it never does.
Ray token auth and private (ClusterIP) services in cluster/ are checked in test_cluster_configs.py.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from medi_dist.config_loader import ConfigError, load_config
from medi_dist.metadata import ConditioningSpec, ContinuousSpec, Vocab
from medi_dist.model import EMA, ConditionedUNet, ModelConfig, ModelDirError, load_model_dir, save_model_dir
from medi_dist.model.model_dir import sha256_file
from medi_dist.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from medi_dist.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ("medi_dist", "benchmarks", "jobs", "cluster", "tests")


class Payload:
    """Unpickling this runs a shell command (the classic malicious-pickle pattern)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    spec = ConditioningSpec(
        [Vocab("cancer_type", ["A", "B"]), Vocab("tissue_source_site", ["S0", "S1"])],
        [ContinuousSpec("age", 50.0, 10.0)],
    )
    torch.manual_seed(0)
    m = ConditionedUNet(ModelConfig.from_preset("tiny"), spec)
    d = tmp_path_factory.mktemp("models") / "model"
    save_model_dir(d, m, EMA(m))
    return d


def _fix_checksums(d: Path, name: str) -> None:
    """Make checksums.json agree with a replaced file: an attacker who can write the file can do this too."""
    sums = json.loads((d / "checksums.json").read_text())
    sums[name] = sha256_file(d / name)
    (d / "checksums.json").write_text(json.dumps(sums))


# ---- weights -------------------------------------------------------------------------------------


def test_model_dir_holds_only_safetensors_and_loads_without_unpickling(model_dir, monkeypatch):
    suffixes = {p.suffix for p in model_dir.iterdir()}
    assert suffixes <= {".safetensors", ".json"}, suffixes  # no .pt / .bin / .pkl / .ckpt
    import pickle

    def refuse(*a, **k):
        raise AssertionError("loading a model directory must not unpickle anything")

    for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(mod, name, refuse)
    model, _, spec = load_model_dir(model_dir, weights="ema")
    assert spec.categorical_names == ["cancer_type", "tissue_source_site"] and model.weights_kind == "ema"


def test_pickle_disguised_as_safetensors_never_runs(model_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    marker = tmp_path / "PWNED"
    torch.save({"state": Payload(marker)}, d / "model.safetensors")  # a pickle under the trusted name
    _fix_checksums(d, "model.safetensors")
    with pytest.raises(Exception, match=r"(?i)header|deserializ|safetensor"):
        load_model_dir(d, weights="raw")
    assert not marker.exists()


def test_failed_model_save_keeps_the_old_directory(model_dir, tmp_path, monkeypatch):
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    before = {p.name: sha256_file(p) for p in d.iterdir()}

    def disk_full(self, path):
        raise OSError(28, "No space left on device", str(path))

    model, _, _ = load_model_dir(d, weights="raw")
    monkeypatch.setattr(ConditioningSpec, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_model_dir(d, model)
    assert {p.name: sha256_file(p) for p in d.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary directory left
    (d / "checksums.json").unlink()
    with pytest.raises(ModelDirError, match=r"checksums\.json is missing; refusing to load unverified weights"):
        load_model_dir(d)


def test_malicious_trainer_state_is_refused(tmp_path):
    ckpt = tmp_path / "checkpoint"
    w = {"w": torch.zeros(2)}
    save_checkpoint(ckpt, w, w, {"step": 3, "rng": torch.get_rng_state()}, {"step": 3})
    assert load_checkpoint(ckpt)[2]["step"] == 3
    marker = tmp_path / "PWNED"
    torch.save({"step": 3, "optimizer": Payload(marker)}, ckpt / "trainer_state.pt")
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt is missing or fails its sha256 check"):
        load_checkpoint(ckpt)
    _fix_checksums(ckpt, "trainer_state.pt")  # past the checksum: weights_only=True must stop it
    with pytest.raises(Exception, match=r"(?i)weights.only|unsupported global|posix\.system|os\.system"):
        load_checkpoint(ckpt)
    assert not marker.exists()


# ---- YAML ----------------------------------------------------------------------------------------


def test_yaml_python_tags_are_refused(tmp_path):
    marker = tmp_path / "PWNED"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'steps: !!python/object/apply:os.system ["touch {marker}"]\n')
    refused = rf"{re.escape(str(bad))} is not valid YAML: could not determine a constructor"
    with pytest.raises(ConfigError, match=refused):
        load_config(TrainConfig, bad)
    with pytest.raises(ConfigError, match=r"override 'steps=.*': the value is not valid YAML"):
        load_config(TrainConfig, None, [f'steps=!!python/object/apply:os.system ["touch {marker}"]'])
    assert not marker.exists()


# ---- the source tree -----------------------------------------------------------------------------


def _python_files():
    for top in CODE_DIRS:
        yield from sorted((REPO / top).rglob("*.py"))


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "?")  # `f().eval()` is not the builtin eval
    return ".".join(reversed(parts))


SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.BaseLoader", "yaml.CSafeLoader", "yaml.CBaseLoader"}
UNSAFE_CALLS = {
    "pickle.load": "unpickles",
    "pickle.loads": "unpickles",
    "pickle.Unpickler": "unpickles",
    "cPickle.load": "unpickles",
    "dill.load": "unpickles",
    "dill.loads": "unpickles",
    "joblib.load": "unpickles",
    "pd.read_pickle": "unpickles",
    "pandas.read_pickle": "unpickles",
    "torch.jit.load": "loads code",
    "yaml.load": "use yaml.safe_load",
    "yaml.load_all": "use yaml.safe_load_all",
    "yaml.unsafe_load": "unsafe",
    "yaml.full_load": "use yaml.safe_load",
    "eval": "evaluates strings",
    "exec": "executes strings",
}


def test_no_unsafe_deserialisation_or_extraction_in_the_source():
    """torch.load only with weights_only=True; no pickle/unsafe YAML/eval; np.load never with
    allow_pickle=True; no tar/zip extraction to disk (extract/extractall), so a member named
    '../x' or '/x' can never be written anywhere."""
    problems, torch_loads = [], 0
    for f in _python_files():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if not isinstance(node, ast.Call):
                continue
            name, where = _dotted(node.func), f"{f.relative_to(REPO)}:{node.lineno}"
            kw = {k.arg: k.value for k in node.keywords}
            if name == "torch.load":
                torch_loads += 1
                flag = kw.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            elif name == "yaml.load" and _dotted(kw.get("Loader", ast.Constant(None))) in SAFE_YAML_LOADERS:
                continue  # the safe loaders build only plain scalars, lists and dicts
            elif name in UNSAFE_CALLS:
                problems.append(f"{where}: {name} ({UNSAFE_CALLS[name]})")
            elif name.endswith((".extractall", ".extract")) and not name.endswith(".str.extract"):  # pandas regex
                problems.append(f"{where}: {name} writes archive members to disk")
            elif name.endswith("np.load") or name.endswith("numpy.load"):
                flag = kw.get("allow_pickle")
                if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                    problems.append(f"{where}: np.load with allow_pickle")
            elif name == "subprocess.run" or name.startswith("subprocess."):
                flag = kw.get("shell")
                if isinstance(flag, ast.Constant) and flag.value is True:
                    problems.append(f"{where}: subprocess with shell=True")
    assert not problems, "\n".join(problems)
    assert torch_loads >= 1  # the scan does see the checkpoint loader


def test_servers_bind_to_localhost_by_default():
    """Nothing we ship binds 0.0.0.0; Ray's dashboard defaults to 127.0.0.1 for our plain ray.init() calls,
    and the launch scripts pass 127.0.0.1 explicitly."""
    import inspect

    import ray

    assert inspect.signature(ray.init).parameters["dashboard_host"].default == "127.0.0.1"
    allowed: set[tuple[str, str]] = set()
    found = []
    files = [
        p
        for top in ("medi_dist", "benchmarks", "jobs", "cluster", ".ci")
        for p in (REPO / top).rglob("*")
        if p.is_file() and p.suffix in ("", ".py", ".sh", ".yaml", ".yml", ".toml", ".cfg", ".txt")
    ]
    files += [REPO / "Makefile", REPO / "pyproject.toml"]
    for f in files:
        for line in f.read_text(errors="replace").splitlines():
            code = line.split("#", 1)[0].strip()
            if re.search(r"0\.0\.0\.0(?!/)|\bhost\s*=\s*['\"]?(?:0\.0\.0\.0|::)['\"]?", code):
                found.append((str(f.relative_to(REPO)), code))
    assert set(found) <= allowed, found
    # every ray.init in the package leaves the dashboard host at its default (or sets it to localhost)
    for f in (REPO / "medi_dist").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and _dotted(node.func) == "ray.init":
                host = {k.arg: k.value for k in node.keywords}.get("dashboard_host")
                assert host is None or (isinstance(host, ast.Constant) and host.value in ("127.0.0.1", "localhost")), f
    script = (REPO / "cluster" / "local_multinode.sh").read_text()
    assert "--dashboard-host 127.0.0.1" in script
