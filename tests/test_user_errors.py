"""What a newcomer typed wrong, and the one line medi-dist answers with: list fields given one value,
1e3 for an int, malformed or absurd generation plans, broken model directories, garbage encoder
weights, a CUDA device on a machine without one, a missing synthetic pool, and split shares that
cannot be met. Everything runs in-process on small generated inputs; no Ray cluster is started."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medi_dist import cli
from medi_dist.config_loader import ConfigError, load_config
from medi_dist.data import sources
from medi_dist.data.ingest import ingest
from medi_dist.data.procedural import ProceduralConfig
from medi_dist.data.split import SplitConfig
from medi_dist.evaluate import encoders as E
from medi_dist.generate.plan import MAX_TILES, GenerationPlan, PlanError, resolve, training_data
from medi_dist.metadata import ConditioningSpec
from medi_dist.model import EMA, ConditionedUNet, ModelConfig, save_model_dir
from medi_dist.train.config import TrainConfig
from medi_dist.tune.study import StudyConfig

TYPE, SITE = "cancer_type", "tissue_source_site"
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _main(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line(capsys, *args: str) -> str:
    rc, _, err = _main(capsys, *args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def model(proc_dataset, tmp_path_factory) -> Path:
    """An untrained tiny model recording the shared procedural dataset (plans and plumbing only)."""
    spec = ConditioningSpec.load(proc_dataset / "vocab.json").subset([TYPE, SITE], [])
    torch.manual_seed(0)
    net = ConditionedUNet(ModelConfig.from_preset("tiny"), spec)
    path = tmp_path_factory.mktemp("models") / "model"
    save_model_dir(path, net, EMA(net), extra_info={"name": "rand", "dataset": str(proc_dataset)})
    return path


# ---- 1. config overrides -------------------------------------------------------------------------


def test_list_fields_take_one_value_and_ints_take_exponents(tmp_path):
    study = load_config(StudyConfig, REPO / "jobs" / "tune_small.yaml", ["space.ratio=1", "space.pools=data/syn"])
    assert study.space.ratio == [1.0] and study.space.pools == ["data/syn"]  # not ['d', 'a', 't', ...]
    cfg = tmp_path / "train.yaml"
    cfg.write_text("steps: 1e3\ndata:\n  splits: train\nmodel:\n  conditions: cancer_type\n")
    train = load_config(TrainConfig, cfg, ["run.checkpoint_every=2e2"])
    assert (train.steps, train.run.checkpoint_every) == (1000, 200)  # YAML 1.1 reads 1e3 as text
    assert train.data.splits == ["train"] and train.model.conditions == ["cancer_type"]
    with pytest.raises(ConfigError, match=r"override 'steps=1\.5': expected int, got 1\.5"):
        load_config(TrainConfig, cfg, ["steps=1.5"])
    with pytest.raises(ConfigError, match=r"override 'steps=1\.5e0': expected int"):
        load_config(TrainConfig, cfg, ["steps=1.5e0"])


def test_errors_name_the_override_or_the_file_and_every_unknown_field(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("steps: 10\nrun:\n  num_workers: 1\n")
    with pytest.raises(ConfigError, match=r"^override 'steps=-1': steps must be positive, got -1$"):
        load_config(TrainConfig, cfg, ["steps=-1"])
    with pytest.raises(ConfigError, match=r"^override 'run\.num_workers=0': must be positive"):
        load_config(TrainConfig, cfg, ["run.num_workers=0"])
    cfg.write_text("steps: -1\n")
    with pytest.raises(ConfigError, match=rf"^{cfg}: steps must be positive"):  # the file's own value
        load_config(TrainConfig, cfg, ["run.num_workers=2"])
    cfg.write_text("stepz: 10\nrun:\n  nmae: x\n")
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, cfg, ["optim.lrr=1"])
    msg = str(e.value)
    assert f"{cfg}: unknown field(s) ['stepz']" in msg and f"{cfg}.run: unknown field(s) ['nmae']" in msg
    assert "override 'optim.lrr=1': unknown field(s) ['lrr']" in msg


# ---- 2. generation plans -------------------------------------------------------------------------


def test_plans_malformed_with_stray_rows_or_absurd_counts_are_refused(model, tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text("seed: 1\nmode: [unclosed\n")
    out = tmp_path / "out"
    gen = ("generate", "--model", str(model), "--plan", str(plan), "--out", str(out), "--dry-run")
    line = _one_line(capsys, *gen)
    assert f"plan file {plan} is not valid YAML" in line and "line 3, column 1" in line
    spec, train = ConditioningSpec.load(model / "conditioning.json"), training_data(model)
    t, s = train.types[0], train.sites[0]
    for mode in ("unseen-pairs", "balance"):
        with pytest.raises(PlanError, match=f"rows are for mode explicit; mode {mode}"):
            resolve(GenerationPlan(mode=mode, rows=[{TYPE: t, SITE: s, "count": 1}]), spec, train)
    plan.write_text("mode: unseen-pairs\ncount: 1e11\n")  # a float (or exponent text) from YAML
    line = _one_line(capsys, *gen)  # refused at once, before any per-tile task is built
    assert f"more than {MAX_TILES:,} per plan" in line and "split the plan" in line
    with pytest.raises(PlanError, match="more than"):
        resolve(GenerationPlan(rows=[{TYPE: t, SITE: s, "count": float(MAX_TILES + 1)}]), spec, train)
    line = _one_line(capsys, *gen[:3], *gen[5:], "--mode", "unseen-pairs", "--guidance-interval", "0.8", "0.2")
    assert "--guidance-interval: guidance interval 0.8 0.2: want 0 <= lo <= hi <= 1" in line
    assert not out.exists()


# ---- 3. broken model directories -----------------------------------------------------------------


def test_broken_model_directory_is_refused_before_ray_and_out(model, tmp_path, capsys):
    def broken(name: str, damage) -> Path:
        d = tmp_path / name
        shutil.copytree(model, d)
        damage(d)
        return d

    no_ema = broken("no-ema", lambda d: (d / "ema.safetensors").unlink())
    truncated = broken(
        "truncated", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000])
    )
    inc = broken("inc", lambda d: (d / "conditioning.json").unlink())
    ckpt = tmp_path / "checkpoint_000001"
    ckpt.mkdir()
    for f in ("model.safetensors", "ema.safetensors", "trainer_state.pt", "state.json", "checksums.json"):
        (ckpt / f).write_text("x")
    cases = [
        (
            no_ema,
            [],
            "is not a complete model directory (ema.safetensors missing); pass the model directory "
            "written by medi-dist train (<storage>/<run>/model)",
        ),
        (truncated, ["--weights", "raw"], "checksum mismatch for"),
        (inc, [], "is not a complete model directory (conditioning.json missing)"),
        (
            ckpt,
            [],
            "is a training checkpoint, not a model directory; pass the model directory written by medi-dist train",
        ),
    ]
    for d, extra, needle in cases:
        for dry in (["--dry-run"], []):
            out = tmp_path / f"out-{d.name}"
            line = _one_line(
                capsys,
                "generate",
                "--model",
                str(d),
                "--mode",
                "unseen-pairs",
                "--count",
                "1",
                "--out",
                str(out),
                *extra,
                *dry,
            )
            assert needle in line and str(d) in line, line
            assert not out.exists()  # not even generation.json


# ---- 4./5. encoders: garbage weights, bad specs, absent devices --------------------------------


def test_garbage_encoder_weights_are_refused_without_unpickling(tmp_path, capsys):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint at all\n" * 40)
    pickled = tmp_path / "pickled.pt"
    torch.save({"w": torch.zeros(2), "extra": Path("x")}, pickled)  # a pickle of more than tensors
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\x00" * 64)
    for spec in (
        f"openclip:ViT-B-16:{garbage}",
        f"inception:{garbage}",
        f"uni:{pickled}",
        f"timm:vit_tiny_patch16_224:{garbage}",
        f"inception:{fake}",
        f"openclip:ViT-B-16:{fake}",
    ):
        path = spec.rpartition(":")[2]
        with pytest.raises(
            ValueError,
            match=rf"^{path} is not a plain tensor state dict/safetensors file "
            r"\(refused without unpickling: [^\n]+\)",
        ) as e:
            E.get_encoder(spec)
        assert "weights_only=False" not in str(e.value) and "weights_only` set to `False" not in str(e.value)
    with pytest.raises(ValueError, match=r"GLOBAL pathlib"):  # the cause names what the pickle wanted
        E.get_encoder(f"uni:{pickled}")
    with pytest.raises(ValueError, match=r"encoder spec 'random-conv:abc': expected random-conv\[:DIM\[:SEED\]\]"):
        E.get_encoder("random-conv:abc")
    rc, _, err = _main(
        capsys,
        "evaluate",
        "fidelity",
        "--real",
        str(tmp_path),
        "--synthetic",
        str(tmp_path),
        "--encoder",
        f"inception:{garbage}",
        "--no-mlflow",
    )
    assert rc == 2 and "Traceback" not in err and "refused without unpickling" in err and len(err.splitlines()) == 1


def test_cuda_device_without_cuda_is_one_line(proc_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    line = _one_line(
        capsys,
        "evaluate",
        "fidelity",
        "--real",
        str(proc_dataset),
        "--synthetic",
        str(proc_dataset),
        "--device",
        "cuda",
        "--no-mlflow",
    )
    assert "--device cuda: CUDA is not available on this machine" in line and "use --device cpu" in line
    assert "is not a device" in _one_line(
        capsys,
        "evaluate",
        "fidelity",
        "--real",
        str(proc_dataset),
        "--synthetic",
        str(proc_dataset),
        "--device",
        "gpu",
        "--no-mlflow",
    )


# ---- 6. a missing synthetic pool -----------------------------------------------------------------


def test_missing_or_empty_pool_points_at_generate(proc_dataset, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for pool, state in ((tmp_path / "nope", "does not exist"), (empty, "is empty")):
        line = _one_line(
            capsys, "evaluate", "fidelity", "--real", str(proc_dataset), "--synthetic", str(pool), "--no-mlflow"
        )
        assert f"{pool} {state}" in line and "`medi-dist generate --out` (a synthetic pool)" in line
        assert "`medi-dist ingest` (real tiles)" in line
    (empty / "generation.json").write_text("{}")  # generate was interrupted before its dataset.json
    assert "run the same generate command again" in _one_line(
        capsys, "evaluate", "fidelity", "--real", str(proc_dataset), "--synthetic", str(empty), "--no-mlflow"
    )


# ---- 7. split shares that cannot be met ----------------------------------------------------------


def test_split_shares_far_from_the_request_are_reported(tmp_path, capsys):
    rc, out, err = _main(
        capsys,
        "ingest",
        "--source",
        "procedural",
        "--tiles",
        "300",
        "--size",
        "32",
        "--val-fraction",
        "0.2",
        "--out",
        str(tmp_path / "few"),
    )
    assert rc == 0, err
    split = json.loads((tmp_path / "few" / "split.json").read_text())
    assert split["requested_shares"] == {"train": 0.5, "holdout": 0.3, "val": 0.2}
    assert abs(split["achieved_shares"]["val"] - 0.2) > 0.1  # 3 sites per type, 3 sides: one site each
    note = split["share_note"]
    assert "val 44% (requested 20%)" in note and "3 sites per type for 3 sides" in note
    assert [ln for ln in out.splitlines() if ln.startswith("warning: split tile shares")] == [f"warning: {note}"]
    # Many sites per type: the shares are met and nothing is said.
    scan = sources.procedural(ProceduralConfig(n_types=2, n_sites=24, n_tiles=400, size=16, seed=0))
    ingest(scan, tmp_path / "many", SplitConfig(0.3, 0.0, 0), shard_mb=0.05)
    split = json.loads((tmp_path / "many" / "split.json").read_text())
    assert split["share_note"] is None and abs(split["achieved_shares"]["holdout"] - 0.3) <= 0.1


def test_second_pass_findings(tmp_path, monkeypatch):
    """A newcomer's second pass: the resume check compares the dataset as an absolute path; a model
    without cancer_type is refused at config time; plan ages read like ingest ('>89' is 90) and a
    word names its column; the fidelity reference holds out slides within every site."""
    import numpy as np
    import pandas as pd

    from medi_dist.evaluate.fidelity_job import real_reference
    from medi_dist.generate.plan import check_conditions
    from medi_dist.metadata import ContinuousSpec, Vocab
    from medi_dist.train.run_folder import training_fields

    monkeypatch.chdir(tmp_path)
    rel, absolute = (load_config(TrainConfig, None, [f"data.dataset={d}"]) for d in ("data/x", tmp_path / "data" / "x"))
    assert training_fields(rel)["data.dataset"] == training_fields(absolute)["data.dataset"]
    with pytest.raises(ConfigError, match="model.conditions must include cancer_type"):
        load_config(TrainConfig, None, ["model.conditions=[tissue_source_site]"])

    spec = ConditioningSpec([Vocab(TYPE, ["A"]), Vocab(SITE, ["S"])], [ContinuousSpec("age", 60.0, 10.0)])
    assert check_conditions(spec, {"age": ">89"}, "row 1") == {"age": 90.0}
    assert check_conditions(spec, {"age": "--"}, "row 1") == {"age": None}
    with pytest.raises(PlanError, match="row 2: age must be a number"):
        check_conditions(spec, {"age": "forty"}, "row 2")

    # 3 sites x 2 slides x 10 tiles; the stain feature is the site: every site must stay learnable.
    sites = np.repeat(["S1", "S2", "S3"], 20)
    index = pd.DataFrame(
        {
            TYPE: np.repeat(["A", "B", "C"], 20),
            SITE: sites,
            "slide_id": [f"{s}-{i // 10}" for i, s in enumerate(sites)],
            "key": [f"k{i}" for i in range(60)],
        }
    )
    onehot = (sites[:, None] == np.array(["S1", "S2", "S3"])).astype(np.float32)
    feats = {
        k: onehot + np.random.default_rng(0).normal(0, 0.01, onehot.shape) for k in ("features", "morphology", "stain")
    }
    for seed in range(4):
        assert real_reference(feats, index, seed)["site_accuracy"] == 1.0


# ---- 8. accepted nonsense, round two (issue 18) --------------------------------------------------


def test_nonsense_sizes_outputs_and_ages_are_refused(proc_dataset, tmp_path, capsys):
    """A zero resolution, 3-px tiles, a demo pointed at a dataset and an age the model never saw each
    get one line; nothing is written."""
    out = tmp_path / "tiny"
    assert "--size 3: procedural tiles must be at least 16 px" in _one_line(
        capsys, "ingest", "--tiles", "20", "--size", "3", "--out", str(out)
    )
    assert not out.exists()
    assert "model.resolution must be at least 16 px (leave it out for the preset's size), got 0" in _one_line(
        capsys, "train", f"data.dataset={proc_dataset}", "model.resolution=0"
    )
    assert "--resolution must be at least 16 px" in _one_line(
        capsys,
        "evaluate",
        "fidelity",
        "--real",
        str(proc_dataset),
        "--synthetic",
        str(proc_dataset),
        "--resolution",
        "0",
        "--no-mlflow",
    )
    before = sorted(p.name for p in proc_dataset.iterdir())
    line = _one_line(capsys, "demo", "--out", str(proc_dataset))
    assert f"--out {proc_dataset} is a dataset directory, not a demo output" in line
    assert sorted(p.name for p in proc_dataset.iterdir()) == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("x")
    assert "holds files that are not the demo's (todo.txt)" in _one_line(capsys, "demo", "--out", str(other))

    # ages outside the training split's range: refused naming the range (never clamped)
    spec = ConditioningSpec.load(proc_dataset / "vocab.json").subset([TYPE, SITE], ["age"])
    age = spec.continuous[0]
    torch.manual_seed(0)
    net = ConditionedUNet(ModelConfig.from_preset("tiny"), spec)
    aged = tmp_path / "aged"
    save_model_dir(aged, net, EMA(net), extra_info={"name": "aged", "dataset": str(proc_dataset)})
    gen = (
        "generate",
        "--model",
        str(aged),
        "--mode",
        "unseen-pairs",
        "--count",
        "1",
        "--out",
        str(tmp_path / "g"),
        "--dry-run",
        "--extra",
    )
    line = _one_line(capsys, *gen, f"age={age.max + 30:g}")
    assert f"age {age.max + 30:g} is outside the range the model was trained on ({age.min:g} to {age.max:g})" in line
    rc, _, err = _main(capsys, *gen, f"age={age.min:g}")  # the edges are in range
    assert rc == 0, err


def test_continuous_statistics_come_from_the_train_split(proc_dataset):
    """vocab.json's age mean/std/range are those of the training sites' tiles (held-out ages must not
    shift the normalisation); a vocab.json written before the range was recorded still loads."""
    import math

    import pandas as pd

    from medi_dist.metadata import ContinuousSpec

    index = pd.read_parquet(proc_dataset / "index.parquet")
    age = ConditioningSpec.load(proc_dataset / "vocab.json").continuous[0]
    train = index.loc[index["split"] == "train", "age"].dropna().astype(float)
    every = index["age"].dropna().astype(float)
    assert (age.mean, age.min, age.max) == pytest.approx((train.mean(), train.min(), train.max()))
    assert age.std == pytest.approx(train.std())  # sample std, as before
    assert abs(every.mean() - train.mean()) > 1e-6  # the holdout tiles would have moved it
    old = ConditioningSpec.from_dict(
        {"categorical": {TYPE: ["A"]}, "continuous": [{"name": "age", "mean": 60.0, "std": 10.0}]}
    )
    assert old.continuous[0] == ContinuousSpec("age", 60.0, 10.0) and old.continuous[0].min is None
    assert math.isclose(old.continuous[0].encode(70), 1.0)
