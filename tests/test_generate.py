"""Generation plans, the Ray Data generation job (determinism across workers, resume), read-back
through the data layer, and the dataset-level fidelity stage (FD, conditional accuracy, MLflow)."""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medi_dist.data.shards import verify_shards
from medi_dist.data.stream import StreamConfig, tile_stream
from medi_dist.evaluate.command import add_fidelity_parser
from medi_dist.evaluate.fidelity_job import FidelityConfig, evaluate_fidelity, read_tiles
from medi_dist.generate.command import add_generate_parser
from medi_dist.generate.job import GenerateConfig, build_tasks, generate
from medi_dist.generate.plan import GenerationPlan, PlanError, resolve, training_data
from medi_dist.generate.tile_list import task_tiles, tile_seed
from medi_dist.generate.writer import SamplingSettings
from medi_dist.metadata import ConditioningSpec, UnknownValueError
from medi_dist.model import EMA, ConditionedUNet, ModelConfig, save_model_dir

TYPE, SITE = "cancer_type", "tissue_source_site"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two busy cores: two torch threads in this process run ~4x slower than one (measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model_dir(path: Path, dataset: Path, columns=(TYPE, SITE), continuous=(), **info) -> Path:
    """An untrained tiny 16-px model whose directory records `dataset` and `info` (e.g. the
    mlflow_run_id that trained it; plans and plumbing only)."""
    spec = ConditioningSpec.load(dataset / "vocab.json").subset(list(columns), list(continuous))
    torch.manual_seed(0)
    model = ConditionedUNet(ModelConfig.from_preset("tiny"), spec)
    save_model_dir(path, model, EMA(model), extra_info={"name": "rand", "dataset": str(dataset), **info})
    return path


@pytest.fixture(scope="module")
def rand_model(proc_dataset, tmp_path_factory) -> Path:
    return _model_dir(tmp_path_factory.mktemp("models") / "rand", proc_dataset)


@pytest.fixture(scope="module")
def train_pairs(proc_dataset) -> Counter:
    idx = pd.read_parquet(proc_dataset / "index.parquet")
    idx = idx[idx["split"] == "train"]
    return Counter(zip(idx[TYPE], idx[SITE]))


def _spec(model: Path) -> ConditioningSpec:
    return ConditioningSpec.load(model / "conditioning.json")


# ---------------------------------------------------------------- plans


def test_unseen_pairs_and_balance_plans(rand_model, train_pairs):
    spec, train = _spec(rand_model), training_data(rand_model)
    assert train.pairs == train_pairs  # read from the dataset the model directory records
    types, sites = sorted({t for t, _ in train_pairs}), sorted({s for _, s in train_pairs})
    rows = resolve(GenerationPlan(mode="unseen-pairs", count=3), spec, train)
    assert [(r.conditions[TYPE], r.conditions[SITE]) for r in rows] == [(t, s) for t in types for s in sites]
    assert all(r.count == 3 and r.seen == ((r.conditions[TYPE], r.conditions[SITE]) in train_pairs) for r in rows)
    assert sum(r.seen for r in rows) == len(train_pairs) and sum(not r.seen for r in rows) > 0
    # balance: each seen pair topped up to the target; unseen pairs only when asked
    target = max(train_pairs.values()) + 5
    bal = resolve(GenerationPlan(mode="balance", target=target), spec, train)
    assert {(r.conditions[TYPE], r.conditions[SITE]): r.count for r in bal} == {
        p: target - n for p, n in train_pairs.items()
    }
    bal_u = resolve(GenerationPlan(mode="balance", target=target, include_unseen=True, types=types[:2]), spec, train)
    assert len(bal_u) == 2 * len(sites) and all(r.count == target for r in bal_u if not r.seen)


def test_site_nulled_plans(rand_model, proc_dataset, tmp_path):
    """The class-only arm from the same network: type rows, no site, tiles recorded with Unknown site."""
    spec, train = _spec(rand_model), training_data(rand_model)
    rows = resolve(GenerationPlan(rows=[{TYPE: t, "count": 2} for t in train.types], null_site=True), spec, train)
    assert [r.conditions for r in rows] == [{TYPE: t} for t in train.types] and all(r.seen for r in rows)
    with pytest.raises(PlanError, match="drop tissue_source_site"):
        resolve(
            GenerationPlan(rows=[{TYPE: train.types[0], SITE: train.sites[0], "count": 1}], null_site=True), spec, train
        )
    with pytest.raises(PlanError, match="null_site is for explicit rows"):
        resolve(GenerationPlan(mode="unseen-pairs", null_site=True), spec, train)
    no_drop = ConditionedUNet(ModelConfig.from_preset("tiny", default_cond_dropout=0.0), spec)
    save_model_dir(tmp_path / "nd", no_drop, EMA(no_drop), extra_info={"name": "nd", "dataset": str(proc_dataset)})
    with pytest.raises(PlanError, match="trained with site dropout"):
        build_tasks(
            GenerateConfig(
                model=str(tmp_path / "nd"),
                out=str(tmp_path / "o"),
                plan=GenerationPlan(rows=[{TYPE: train.types[0], "count": 1}], null_site=True),
            )
        )


def test_plan_validation_errors(rand_model, proc_dataset, train_pairs, tmp_path):
    spec, train = _spec(rand_model), training_data(rand_model)
    t, s = next(iter(train_pairs))
    row = lambda **kw: GenerationPlan(rows=[{TYPE: t, SITE: s, "count": 2, **kw}])  # noqa: E731
    with pytest.raises(UnknownValueError, match=r"row 1: unknown cancer_type 'NOPE'; this model was trained on \(4\)"):
        resolve(row(cancer_type="NOPE"), spec, train)
    with pytest.raises(
        UnknownValueError,
        match="unknown tissue_source_site 'ZZ9'; this model was trained on \\(4\\): " + ", ".join(train.sites) + "$",
    ):
        resolve(GenerationPlan(mode="unseen-pairs", sites=[s, "ZZ9"]), spec, train)
    held = sorted(set(spec.vocab(SITE).values) - set(train.sites))[0]  # in the vocabulary, never trained
    with pytest.raises(
        UnknownValueError, match=f"{held}.*no training tiles.*trained values \\(4\\): " + ", ".join(train.sites)
    ):
        resolve(row(tissue_source_site=held), spec, train)
    with pytest.raises(PlanError, match="count -1 is negative"):
        resolve(row(count=-1), spec, train)
    with pytest.raises(PlanError, match="count -2 is negative"):
        resolve(GenerationPlan(mode="unseen-pairs", count=-2), spec, train)
    with pytest.raises(UnknownValueError, match="not condition columns"):
        resolve(row(site="B1"), spec, train)  # typo for tissue_source_site
    with pytest.raises(PlanError, match="mode must be one of"):
        resolve(GenerationPlan(mode="union"), spec, train)
    with pytest.raises(PlanError, match="no tiles"):
        resolve(row(count=0), spec, train)
    with pytest.raises(PlanError, match="unknown plan field"):
        GenerationPlan.from_dict({"mode": "explicit", "rowz": []})
    # A model also conditioned on sex: generated tiles need a sex (the vocabulary has no Unknown).
    sex_model = _model_dir(tmp_path / "sex", proc_dataset, (TYPE, SITE, "sex"), ("age",))
    with pytest.raises(PlanError, match="conditioned on sex"):
        resolve(GenerationPlan(mode="unseen-pairs"), _spec(sex_model), train)
    rows = resolve(
        GenerationPlan(
            mode="unseen-pairs", count=1, types=[t], sites=[s], extra={"sex": ["female", "male"], "age": 60}
        ),
        _spec(sex_model),
        train,
    )
    assert [r.conditions["sex"] for r in rows] == ["female", "male"] and rows[0].conditions["age"] == 60.0
    bal = resolve(
        GenerationPlan(
            mode="balance", target=train_pairs[(t, s)] + 5, types=[t], sites=[s], extra={"sex": ["female", "male"]}
        ),
        _spec(sex_model),
        train,
    )
    assert [r.count for r in bal] == [3, 2]  # the top-up of the (type, site) subgroup is shared, not doubled
    # The job validates before doing anything: no output directory appears.
    out = tmp_path / "never"
    with pytest.raises(UnknownValueError):
        generate(GenerateConfig(model=str(rand_model), out=str(out), plan=row(cancer_type="NOPE")))
    with pytest.raises(PlanError, match="unknown sampler"):
        generate(
            GenerateConfig(model=str(rand_model), out=str(out), plan=row(), sampling=SamplingSettings(sampler="euler"))
        )
    assert not out.exists()


def test_yaml_plan_dry_run_on_the_command_line(rand_model, train_pairs, tmp_path, capsys):
    (t, s), n = next(iter(train_pairs.items()))
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"mode: explicit\nseed: 3\nrows:\n  - {{cancer_type: {t}, tissue_source_site: {s}, count: 5}}\n")
    out = tmp_path / "out"
    args = _cli().parse_args(
        ["generate", "--model", str(rand_model), "--plan", str(plan), "--out", str(out), "--dry-run"]
    )
    args.func(args)
    printed = capsys.readouterr().out
    assert f"cancer_type={t}, tissue_source_site={s}: 5 (seen, {n} training tiles)" in printed
    assert "1 shards" in printed and not out.exists()
    # Digit site codes stay text (YAML alone reads 05 as 5); counts and seeds are still numbers.
    plan.write_text(
        "seed: 3\ninclude_unseen: true\nsites: [05, 44]\nrows:\n  - {tissue_source_site: 05, age: 60, count: 5}\n"
    )
    read = GenerationPlan.from_yaml(plan)
    assert read.rows == [{"tissue_source_site": "05", "age": "60", "count": 5}] and read.sites == ["05", "44"]
    assert read.seed == 3 and read.include_unseen is True
    args = _cli().parse_args(
        [
            "generate",
            "--model",
            str(rand_model),
            "--out",
            str(out),
            "--dry-run",
            "--mode",
            "unseen-pairs",
            "--types",
            t,
            "--count",
            "2",
            "--extra",
            "sex=female",
        ]
    )
    with pytest.raises(UnknownValueError, match=r"\['sex'\] are not condition columns"):
        args.func(args)  # this model is conditioned on type and site only
    bare = tmp_path / "bare"  # a model directory that does not record its training data
    spec = _spec(rand_model)
    save_model_dir(bare, ConditionedUNet(ModelConfig.from_preset("tiny"), spec), extra_info={"name": "bare"})
    with pytest.raises(PlanError, match="pass --dataset"):
        training_data(bare)
    assert training_data(bare, dataset=training_data(rand_model).source).pairs == train_pairs


def test_class_only_model_takes_type_rows_and_records_unknown_site(ray_cluster, proc_dataset, train_pairs, tmp_path):
    model = _model_dir(tmp_path / "class-only", proc_dataset, (TYPE,))
    spec, train = _spec(model), training_data(model)
    t = sorted(train.types)[0]
    rows = resolve(GenerationPlan(rows=[{TYPE: t, "count": 3}]), spec, train)
    assert rows[0].conditions == {TYPE: t}
    assert rows[0].real_count == sum(n for (a, _), n in train_pairs.items() if a == t)
    with pytest.raises(PlanError, match="unseen-pairs plans need a model conditioned on tissue_source_site"):
        resolve(GenerationPlan(mode="unseen-pairs"), spec, train)
    with pytest.raises(UnknownValueError, match="not condition columns"):
        resolve(GenerationPlan(rows=[{TYPE: t, SITE: train.sites[0], "count": 1}]), spec, train)
    res = generate(
        GenerateConfig(
            model=str(model),
            out=str(tmp_path / "out"),
            plan=GenerationPlan(rows=[{TYPE: t, "count": 3}]),
            sampling=SamplingSettings(sampler="ddim", steps=2),
        )
    )
    index = pd.read_parquet(res.out / "index.parquet")
    assert list(index[SITE]) == ["Unknown"] * 3 and list(index[TYPE]) == [t] * 3
    rows = tile_stream(res.out, cfg=StreamConfig(resolution=16)).dataset.take_all()  # vocab.json: type only
    assert sorted(r["cond_cancer_type"] for r in rows) == [spec.vocab(TYPE).encode(t)] * 3


def test_tile_seeds_depend_only_on_plan_seed_row_index(rand_model):
    assert tile_seed(0, 1, 2) == tile_seed(0, 1, 2)
    seeds = {tile_seed(p, r, i) for p in range(3) for r in range(20) for i in range(50)}
    assert len(seeds) == 3 * 20 * 50 and all(0 <= x < 2**63 for x in seeds)
    cfg = GenerateConfig(model=str(rand_model), out="unused", plan=GenerationPlan(mode="unseen-pairs", count=3))
    a, _, _, _ = build_tasks(cfg)
    cfg.tiles_per_shard = 5
    b, _, _, _ = build_tasks(cfg)
    flat = lambda tasks: [(t["key"], t["seed"]) for task in tasks for t in task_tiles(task)]  # noqa: E731
    assert len(a) == 1 and len(b) == 10 and flat(a) == flat(b)  # sharding changes nothing about the tiles


def test_tile_bytes_do_not_depend_on_tiles_per_shard(proc_dataset, tmp_path):
    """Batched CPU kernels can sum in a batch-size-dependent order (measured before the fix: 5 of 64
    small-preset DDPM tiles changed between 8 and 256 tiles per shard). Micro-batches aligned to plan
    positions, always full, make each tile's bytes the same however the plan is cut into shards."""
    from medi_dist.generate.writer import ShardGenerator, png_bytes

    spec = ConditioningSpec.load(proc_dataset / "vocab.json").subset([TYPE, SITE], [])
    torch.manual_seed(0)
    net = ConditionedUNet(ModelConfig.from_preset("small"), spec)  # 32 px, 4 levels: more kernels than tiny
    model = tmp_path / "small"
    save_model_dir(model, net, EMA(net), extra_info={"name": "small", "dataset": str(proc_dataset)})
    sampling = SamplingSettings(sampler="ddpm", steps=5, batch_size=8)
    plan = GenerationPlan(mode="unseen-pairs", count=2, seed=3)
    gen = ShardGenerator(str(model), sampling, str(tmp_path / "unused"), threads=1)
    pngs = {}
    for per_shard in (64, 5):
        tasks, _, _, _ = build_tasks(
            GenerateConfig(model=str(model), out="unused", plan=plan, sampling=sampling, tiles_per_shard=per_shard)
        )
        pngs[per_shard] = {
            t["key"]: png_bytes(img)
            for task in tasks
            for t, img in zip(task_tiles(task), gen.sample_aligned(task_tiles(task), task["first"]))
        }
    assert len(pngs[64]) >= 24 and pngs[5] == pngs[64]


# ---------------------------------------------------------------- the Ray Data job

PLAN = GenerationPlan(mode="unseen-pairs", count=3, seed=7)  # 4 types x 4 trained sites x 3 = 48 tiles
SAMPLING = SamplingSettings(sampler="ddpm", steps=4, batch_size=4)  # stochastic sampler: per-tile noise


def _gen(model, out, **kw) -> GenerateConfig:
    return GenerateConfig(model=str(model), out=str(out), plan=PLAN, sampling=SAMPLING, tiles_per_shard=10, **kw)


def _pixels(out: Path) -> dict[str, np.ndarray]:
    tiles, index = read_tiles(out, None, None)
    return dict(zip(index["key"], tiles))


@pytest.fixture(scope="module")
def two_runs(ray_cluster, rand_model, tmp_path_factory):
    """One uninterrupted run on 1 worker; one on 2 workers that is interrupted, damaged and resumed."""
    tmp = tmp_path_factory.mktemp("gen")
    one = generate(_gen(rand_model, tmp / "w1", workers=1))
    out = tmp / "w2"
    first = generate(_gen(rand_model, out, workers=2, max_shards=2))  # "interrupted" after 2 of 5 shards
    shards = sorted((out / "shards" / "train").glob("shard-*.tar"))
    state = {
        "first": first,
        "shards": [p.name for p in shards],
        "no_manifest": not (out / "dataset.json").exists(),
        "kept_mtime": shards[0].stat().st_mtime_ns,
    }
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])  # a torn copy of a finished shard
    (out / "shards" / "train" / ".shard-000004.tar.tmp-deadbeef").write_bytes(b"partial")  # a killed writer's temp
    two = generate(_gen(rand_model, out, workers=2))
    state["mtime_after"] = shards[0].stat().st_mtime_ns
    return one, two, state


def test_gpu_workers_on_a_cpu_cluster_are_refused(ray_cluster, rand_model, tmp_path):
    with pytest.raises(ValueError, match=r"needs 1 GPU\(s\) but the Ray cluster has 0; .*--gpus-per-worker 0"):
        generate(_gen(rand_model, tmp_path / "gpu", gpus_per_worker=1))


def test_same_plan_gives_identical_tiles_with_1_and_2_workers(two_runs):
    one, two, _ = two_runs
    assert one.complete and two.complete and one.tiles == 48 and one.shards == 5
    i1, i2 = (pd.read_parquet(r.out / "index.parquet").set_index("key") for r in (one, two))
    assert len(i1) == 48 and sorted(i1.index) == sorted(i2.index)
    assert (i1["sha256"] == i2.loc[i1.index, "sha256"]).all()  # PNG bytes identical
    p1, p2 = _pixels(one.out), _pixels(two.out)
    assert all(np.array_equal(p1[k], p2[k]) for k in p1)
    assert len({v.tobytes() for v in p1.values()}) == 48  # and every tile differs from the others


def test_synthetic_shards_read_back_through_tile_stream(two_runs, rand_model, train_pairs):
    out = two_runs[0].out
    verify_shards(out, checksums=True)
    index = pd.read_parquet(out / "index.parquet").set_index("key")
    model_id = json.loads((rand_model / "config.json").read_text())["model_id"]
    assert index["synthetic"].all() and (index["source"] == model_id).all() and (index["split"] == "train").all()
    assert set(index["sampler"]) == {"ddpm"} and set(index["steps"]) == {4} and set(index["guidance"]) == {1.0}
    assert index["seed"].nunique() == 48 and (index["image_format"] == "png").all()
    assert all(index["seen"] == [(t, s) in train_pairs for t, s in zip(index[TYPE], index[SITE])])
    assert json.loads((out / "vocab.json").read_text()) == json.loads((rand_model / "conditioning.json").read_text())
    stream = tile_stream(out, cfg=StreamConfig(resolution=16, batch_rows=16))
    rows = stream.dataset.take_all()
    assert stream.tiles == 48 and len(rows) == 48 and stream.skipped()["skipped"] == 0
    spec = _spec(rand_model)
    for r in rows:
        meta = index.loc[r["key"]]
        assert r["cond_cancer_type"] == spec.vocab(TYPE).encode(meta[TYPE])
        assert r["cond_tissue_source_site"] == spec.vocab(SITE).encode(meta[SITE])
        assert r["image"].shape == (3, 16, 16) and r["image"].dtype == np.uint8 and r["image"].std() > 1


def test_interrupted_run_resumes_without_duplicate_or_missing_tiles(two_runs, rand_model):
    _, second, st = two_runs
    first, out = st["first"], second.out
    assert not first.complete and len(first.generated) == 2 and st["no_manifest"]  # not a dataset yet
    assert st["shards"] == ["shard-000000.tar", "shard-000001.tar"]
    assert second.complete and second.skipped == 1 and len(second.generated) == 4  # torn shard redone
    assert st["mtime_after"] == st["kept_mtime"]  # the intact shard was not regenerated
    assert not list((out / "shards" / "train").glob(".*tmp*"))
    index = pd.read_parquet(out / "index.parquet")
    tasks, _, _, _ = build_tasks(_gen(rand_model, out))
    planned = [t["key"] for task in tasks for t in task_tiles(task)]
    assert sorted(index["key"]) == sorted(planned) and not index["key"].duplicated().any()
    verify_shards(out, checksums=True)
    third = generate(_gen(rand_model, out, workers=2))  # nothing left to do: no Ray work at all
    assert third.complete and third.generated == [] and third.skipped == 5
    with pytest.raises(FileExistsError, match="another plan"):
        generate(
            GenerateConfig(
                model=str(rand_model),
                out=str(out),
                plan=GenerationPlan(mode="unseen-pairs", count=2),
                sampling=SAMPLING,
                tiles_per_shard=10,
            )
        )


# ---------------------------------------------------------------- fidelity, dataset level


def _od_shift(img: np.ndarray, strength: float) -> np.ndarray:
    od = -np.log((img.astype(np.float64) + 1) / 256)
    return np.clip(256 * np.exp(-od * (1 + strength)) - 1, 0, 255).astype(np.uint8)


def _shifted_copy(src: Path, out: Path, strength: float) -> Path:
    """The same tiles with a known stain (optical density) shift, written through ingest."""
    from medi_dist.data.ingest import ingest
    from medi_dist.data.records import TileRecord
    from medi_dist.data.sources import Scan
    from medi_dist.data.split import SplitConfig

    index = pd.read_parquet(src / "index.parquet").set_index("key")

    def records():
        for shard in verify_shards(src):
            with tarfile.open(shard) as tar:
                for m in tar.getmembers():
                    key, _, ext = m.name.rpartition(".")
                    if ext == "jpg":
                        img = np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB"))
                        buf = io.BytesIO()
                        Image.fromarray(_od_shift(img, strength)).save(buf, format="PNG")
                        meta = {k: index.loc[key, k] for k in ("slide_id", TYPE, SITE)}
                        yield TileRecord(key, buf.getvalue(), "png", meta)

    groups = Counter(zip(index[TYPE], index[SITE]))
    ingest(Scan(groups, records, name="shifted"), out, SplitConfig(holdout_fraction=0.25, seed=1), shard_mb=1)
    return out


def test_dataset_fd_is_zero_for_itself_and_grows_with_stain_shift(proc_dataset, tmp_path):
    fd = {}
    for strength in (0.0, 0.3, 0.8):
        syn = proc_dataset if strength == 0 else _shifted_copy(proc_dataset, tmp_path / f"shift{strength}", strength)
        res = evaluate_fidelity(
            FidelityConfig(
                real=str(proc_dataset),
                synthetic=str(syn),
                real_splits=["train", "holdout"],
                out=str(tmp_path / f"fid{strength}.json"),
                conditional=False,
                log_mlflow=False,
            )
        )
        fd[strength] = (res["fd"]["overall"], res["fd"]["mean_group_fd"])
        assert len(res["fd"]["groups"]) >= 6  # per-subgroup distances, not just the overall one
    assert fd[0.0][0] == pytest.approx(0, abs=1e-6) and fd[0.0][1] == pytest.approx(0, abs=1e-6)
    assert fd[0.0][0] < fd[0.3][0] < fd[0.8][0] and fd[0.0][1] < fd[0.3][1] < fd[0.8][1], fd


# ---------------------------------------------------------------- after a short training

TRAIN_STEPS = int(os.environ.get("MEDI_TEST_GEN_TRAIN_STEPS", 1000))


@pytest.fixture(scope="module")
def trained_model(proc_dataset, tmp_path_factory):
    """tiny preset at 16 px, v-prediction, trained in-process (plain PyTorch, no Ray Train: its start-up
    and streaming cost more than the 1000 steps themselves here; test_train.py covers Ray Train).
    An ε-prediction model this short-trained samples noise (see the report); v-prediction does not."""
    from medi_dist.model import diffusion_loss, encode_conditions

    tmp = tmp_path_factory.mktemp("trained")
    tiles, index = read_tiles(proc_dataset, ["train"], 16)  # the stream's resize
    spec = ConditioningSpec.load(proc_dataset / "vocab.json").subset([TYPE, SITE])
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 127.5 - 1
    cond = encode_conditions(spec, index[[TYPE, SITE]].to_dict("records"))
    w = torch.tensor(1.0 / index.groupby(TYPE)["key"].transform("count").to_numpy())  # type-balanced, as the trainer
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ConditionedUNet(ModelConfig.from_preset("tiny", prediction_type="v_prediction"), spec)
    ema = EMA(model, 0.995)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.95, 0.999))
    for _ in range(TRAIN_STEPS):
        i = torch.multinomial(w, 32, replacement=True, generator=g)
        loss = diffusion_loss(model, x[i], {k: v[i] for k, v in cond.items()}, g)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
    out = save_model_dir(
        tmp / "model", model, ema, extra_info={"name": "v16", "dataset": str(proc_dataset), "steps": TRAIN_STEPS}
    )
    assert out.startswith("v16-")
    return tmp / "model", tmp


def _cli() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medi-dist")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    add_fidelity_parser(sub.add_parser("evaluate").add_subparsers(dest="evaluate_command", required=True))
    return parser


def test_conditional_accuracy_above_chance_after_short_training(
    ray_cluster, trained_model, proc_dataset, capsys, monkeypatch
):
    from medi_dist.evaluate import fidelity_job
    from medi_dist.tracking import client

    reads: list[float] = []  # when the evaluation read tiles: its run must span that work

    def timed_read(*a, **k):
        reads.append(time.time())
        return read_tiles(*a, **k)

    monkeypatch.setattr(fidelity_job, "read_tiles", timed_read)

    model, tmp = trained_model
    out, fid, uri = tmp / "syn", tmp / "fidelity.json", f"sqlite:///{tmp / 'mlflow.db'}"
    cli = _cli()
    args = cli.parse_args(
        [
            "generate",
            "--model",
            str(model),
            "--out",
            str(out),
            "--mode",
            "unseen-pairs",
            "--count",
            "8",
            "--sampler",
            "ddim",
            "--steps",
            "20",
            "--tiles-per-shard",
            "64",
            "--batch-size",
            "64",
            "--tracking-uri",
            uri,
        ]
    )
    args.func(args)
    args = cli.parse_args(
        [
            "evaluate",
            "fidelity",
            "--real",
            str(proc_dataset),
            "--synthetic",
            str(out),
            "--out",
            str(fid),
            "--tracking-uri",
            uri,
            "--run-name",
            "fid-test",
            "--min-per-group",
            "8",
        ]
    )
    args.func(args)
    printed = capsys.readouterr().out
    res = json.loads(fid.read_text())
    ca, chance = res["conditional_accuracy"], res["chance"]
    print(printed, json.dumps(ca), flush=True)
    assert ca["seen"]["n"] == 4 * 8 and ca["unseen"]["n"] == 12 * 8
    assert set(chance.values()) == {0.25}  # probes learn the 4 trained types / 4 trained sites
    assert len(res["fd"]["groups"]) == 4 and all(v["fd"] > 0 for v in res["fd"]["groups"].values())  # seen pairs
    for part, type_key, site_key in (
        ("seen", "type_accuracy", "site_accuracy"),
        ("unseen", "type_accuracy_morphology", "site_accuracy_stain"),
    ):
        assert ca[part][type_key] > chance["type_accuracy"] + 0.1, (part, ca[part])
        assert ca[part][site_key] > chance["site_accuracy"] + 0.1, (part, ca[part])
    run = client(uri).search_runs(
        [client(uri).get_experiment_by_name("medi-dist").experiment_id], "tags.`medi_dist.run_name` = 'fid-test'"
    )[0]
    assert run.data.metrics["unseen_type_accuracy"] == pytest.approx(ca["unseen"]["type_accuracy"])
    assert "fd_overall" in run.data.metrics and run.data.params["encoder"] == "random-conv"
    assert [a.path for a in client(uri).list_artifacts(run.info.run_id, "fidelity")] == ["fidelity/fidelity.json"]

    # stage runs last as long as their work: opened before it starts, ended after it is done
    assert run.info.status == "FINISHED" and len(reads) >= 2
    assert run.info.start_time <= reads[0] * 1000 and run.info.end_time >= fid.stat().st_mtime * 1000
    (gen,) = client(uri).search_runs([run.info.experiment_id], "tags.`medi_dist.kind` = 'generate'")
    shards = sorted(p.stat().st_mtime * 1000 for p in out.glob("shards/*/*.tar"))
    assert len(shards) == 2 and gen.info.status == "FINISHED"
    assert gen.info.start_time <= shards[0] and gen.info.end_time >= (out / "dataset.json").stat().st_mtime * 1000
