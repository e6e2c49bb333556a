"""The stain composition of generation (each type drawn at its own training sites, moved to the
requested site by the sites' stains, data/site_stains.py) and a model trained in the reference stain,
end to end through `generate` and `train`."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

import medi_dist.data.site_stains as site_stains
import medi_dist.data.stain_estimation as stain_estimation
from medi_dist.evaluate.fidelity_job import read_tiles
from medi_dist.generate.job import GenerateConfig, generate
from medi_dist.generate.plan import GenerationPlan, PlanError
from medi_dist.generate.writer import SamplingSettings
from medi_dist.metadata import ConditioningSpec
from medi_dist.model import EMA, ConditionedUNet, ModelConfig, save_model_dir

TYPE, SITE = "cancer_type", "tissue_source_site"


@pytest.fixture(scope="module", autouse=True)
def few_source_tiles():
    """64 source tiles per site, as tests/test_site_stains.py estimates them (the estimate is cached per
    process for the same dataset and count)."""
    per, stain_estimation.PER_SITE = stain_estimation.PER_SITE, 64
    yield
    stain_estimation.PER_SITE = per


def _model(path, data, columns=(TYPE, SITE), **info):
    spec = ConditioningSpec.load(data / "vocab.json").subset(list(columns))
    torch.manual_seed(0)
    model = ConditionedUNet(ModelConfig.from_preset("tiny"), spec)
    save_model_dir(path, model, EMA(model), extra_info={"name": "rand", "dataset": str(data), **info})
    return path


def test_stain_composition_without_its_dataset_names_the_fix(proc_dataset, tmp_path):
    """A model whose recorded dataset has moved still knows its training pairs, but not the stains."""
    idx = pd.read_parquet(proc_dataset / "index.parquet")
    pairs = sorted({(t, s) for t, s in zip(idx[TYPE], idx[SITE])})
    model = _model(tmp_path / "m", proc_dataset, train_pairs=pairs, dataset=str(tmp_path / "moved"))
    from medi_dist.generate.job import build_tasks

    cfg = GenerateConfig(model=str(model), out=str(tmp_path / "o"), plan=GenerationPlan(mode="unseen-pairs", count=1))
    cfg.sampling.composition = "stain"
    with pytest.raises(PlanError, match="pass --dataset DIR"):
        build_tasks(cfg)


def test_stain_composition_draws_trained_pairs_and_moves_them(ray_cluster, proc_dataset, tmp_path):
    model = _model(tmp_path / "m", proc_dataset)
    plan = GenerationPlan(mode="unseen-pairs", count=2, seed=3)
    made, cfgs = {}, {}
    for comp, calibration in (("joint", 0), ("stain", 0), ("calibrated", 4)):
        cfgs[comp] = cfg = GenerateConfig(
            model=str(model),
            out=str(tmp_path / comp),
            plan=plan,
            sampling=SamplingSettings(
                sampler="ddim", steps=2, composition=comp.replace("calibrated", "stain"), calibration_tiles=calibration
            ),
            tiles_per_shard=16,
        )
        res = generate(cfg)
        tiles, index = read_tiles(res.out, None, None)
        index["key"] = index["key"].str.split("-", n=2).str[2]  # row-index (the plan id differs)
        made[comp] = (dict(zip(index["key"], tiles)), index)
    header = json.loads((tmp_path / "stain" / "generation.json").read_text())
    assert header["composition"] == "stain" and header["site_stains"]["from"] == str(proc_dataset)
    assert set(header["site_stains"]["stains"]) == set(header["site_stains"]["owner"])  # every site involved
    joint, index = made["joint"]
    stain, sidx = made["stain"]
    assert sorted(joint) == sorted(stain) and list(sidx[SITE]) == list(index.set_index("key").loc[sidx["key"], SITE])
    seen = dict(zip(index["key"], index["seen"]))
    # a trained pair is drawn as the network draws it, then rendered in its site's stain (the off-plane
    # OD dropped, stored at the site's JPEG quality); an unseen one is drawn elsewhere and moved
    recorded = site_stains.SiteStains.from_dict(header["site_stains"])
    pair = dict(zip(index["key"], zip(index[TYPE], index[SITE])))
    for k in (k for k in joint if seen[k]):
        (t, s) = pair[k]
        drawn = recorded.transfer(joint[k][None], [t], [s], [s], own="render", patterned=False)
        assert np.array_equal(drawn[0], stain[k])
        assert np.array_equal(recorded.transfer(joint[k][None], [t], [s], [s])[0], joint[k])  # "keep": untouched
    assert sum(not np.array_equal(joint[k], stain[k]) for k in joint if not seen[k]) == sum(
        not v for v in seen.values()
    )
    # calibrated: the network's concentrations at each training site, measured on its own draws there
    # (the same on every worker), are mapped onto the site's real ones before the tile is rendered
    from medi_dist.generate.job import build_tasks
    from medi_dist.generate.writer import ShardGenerator

    calibrated = made["calibrated"][0]
    task = build_tasks(cfgs["calibrated"])[0][0]
    sampler = ShardGenerator(str(model), cfgs["calibrated"].sampling, str(tmp_path / "unused"))
    drawn = sampler._calibration(task, recorded)
    assert sorted(drawn) == sorted(recorded.owner)  # every type of the plan, at each of its training sites
    for k in (k for k in joint if seen[k]):
        (t, s) = pair[k]
        want = recorded.transfer(joint[k][None], [t], [s], [s], own="render", patterned=False, drawn=drawn)
        assert np.array_equal(want[0], calibrated[k])
    assert sum(not np.array_equal(calibrated[k], stain[k]) for k in joint) > len(joint) // 2
    with pytest.raises(PlanError, match="use them with --composition stain"):
        generate(dataclasses.replace(cfgs["joint"], sampling=SamplingSettings(calibration_tiles=8)))
    with pytest.raises(PlanError, match="needs rows with a site"):
        generate(
            GenerateConfig(
                model=str(model),
                out=str(tmp_path / "x"),
                plan=GenerationPlan(rows=[{TYPE: "GLAND", "count": 1}], null_site=True),
                sampling=SamplingSettings(composition="stain"),
            )
        )
    class_only = _model(tmp_path / "c", proc_dataset, (TYPE,))
    with pytest.raises(PlanError, match="has no site condition"):
        generate(
            GenerateConfig(
                model=str(class_only),
                out=str(tmp_path / "y"),
                plan=GenerationPlan(rows=[{TYPE: "GLAND", "count": 1}]),
                sampling=SamplingSettings(composition="stain"),
            )
        )


def test_a_reference_stain_model_records_its_stains_and_renders_every_tile(ray_cluster, proc_dataset, tmp_path):
    """data.stain=reference: the trainer estimates the training sites' stains and records them in the
    model directory; generation renders each drawn tile in the requested site's stain (a site-nulled row
    at one of its type's training sites)."""
    from medi_dist.config_loader import load_config
    from medi_dist.generate.writer import ShardGenerator
    from medi_dist.model.model_dir import read_model_info
    from medi_dist.train.config import TrainConfig
    from medi_dist.train.trainer import train

    over = ["model.preset=tiny", "model.resolution=16", "optim.batch_size=16", "run.cpus_per_worker=1"]
    cfg = load_config(
        TrainConfig,
        None,
        [f"data.dataset={proc_dataset}", "data.stain=reference", "steps=4", "run.name=ref", *over]
        + [f"run.storage_path={tmp_path / 'runs'}", f"run.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"],
    )
    model = train(cfg).model_dir
    info = read_model_info(model)["info"]
    idx = pd.read_parquet(proc_dataset / "index.parquet")
    train_sites = set(idx.loc[idx["split"] == "train", SITE])
    assert info["stain"] == "reference" and set(info["site_stains"]["stains"]) == train_sites

    recorded = site_stains.SiteStains.from_dict(info["site_stains"])
    own = {}
    for t, s in sorted({(t, s) for t, s in zip(idx[TYPE], idx[SITE]) if s in train_sites}):
        own.setdefault(t, []).append(s)
    gen = ShardGenerator(str(model), SamplingSettings(sampler="ddim", steps=2, batch_size=8), str(tmp_path / "g"))
    rows = [(t, s) for t in sorted(own)[:2] for s in (own[t][0], None, sorted(train_sites - set(own[t]))[0], None)]
    tiles = [{"seed": i, "conditions": {TYPE: t, **({SITE: s} if s else {})}} for i, (t, s) in enumerate(rows)]
    targets = [s or own[t][i % len(own[t])] for i, (t, s) in enumerate(rows)]
    drawn = gen._sample(tiles, {})  # as the network draws them: in the reference stain
    got = gen.sample_tiles(tiles, {"own_sites": own})
    assert np.array_equal(got, recorded.from_reference(drawn, [t for t, _ in rows], targets))

    plan = GenerationPlan(mode="unseen-pairs", count=1, seed=3)
    res = generate(GenerateConfig(model=str(model), out=str(tmp_path / "pool"), plan=plan, tiles_per_shard=64))
    header = json.loads((res.out / "generation.json").read_text())
    assert header["site_stains"]["from"] == f"{model}/config.json"
