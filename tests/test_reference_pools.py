"""Pools without a model (ground truth, noise control) and the probes calibrated on ground truth.

The calibrated instrument is checked against what it must say: ground-truth tiles score near their
ceiling with no leakage, noise in the right colours scores stain but not type, and a pool whose
unseen-pair tiles show the owner type of the site (a generator that carries morphology in the site
embedding) is caught as leakage.
"""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from medi_dist.cli import main
from medi_dist.evaluate.fidelity_job import FidelityConfig, evaluate_fidelity
from medi_dist.generate.job import GenerateConfig, generate
from medi_dist.generate.plan import GenerationPlan, PlanError

TYPE, SITE = "cancer_type", "tissue_source_site"


@pytest.fixture(scope="module")
def pools(proc_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    plan = GenerationPlan(mode="unseen-pairs", count=6, seed=3)
    out = {}
    for kind in ("oracle", "noise"):
        out[kind] = generate(
            GenerateConfig(
                model=None,
                reference=kind,
                dataset=str(proc_dataset),
                out=str(root / kind),
                plan=plan,
                tiles_per_shard=50,
            )
        ).out
    return out


def _fidelity(real, pool, tmp_path):
    return evaluate_fidelity(
        FidelityConfig(
            real=str(real), synthetic=str(pool), out=str(tmp_path / "f.json"), log_mlflow=False, min_per_group=4
        )
    )


def test_reference_pools_follow_the_plan_and_are_marked(pools, proc_dataset):
    train = pd.read_parquet(proc_dataset / "index.parquet").query("split == 'train'")
    n_pairs = train[TYPE].nunique() * train[SITE].nunique()
    for kind, pool in pools.items():
        manifest = json.loads((pool / "dataset.json").read_text())
        assert manifest["synthetic"] and manifest["reference"] == kind and manifest["source"].startswith(kind)
        idx = pd.read_parquet(pool / "index.parquet")
        assert len(idx) == 6 * n_pairs and set(idx[SITE]) == set(train[SITE])
        assert (~idx["seen"]).sum() == 6 * (n_pairs - train.groupby([TYPE, SITE]).ngroups)


def test_same_plan_gives_the_same_tiles(pools, proc_dataset, tmp_path):
    again = generate(
        GenerateConfig(
            model=None,
            reference="oracle",
            dataset=str(proc_dataset),
            out=str(tmp_path / "o"),
            plan=GenerationPlan(mode="unseen-pairs", count=6, seed=3),
            tiles_per_shard=50,
        )
    ).out
    a, b = (pd.read_parquet(p / "index.parquet").set_index("key")["sha256"] for p in (pools["oracle"], again))
    assert a.sort_index().equals(b.sort_index())


def test_calibrated_probes_against_ground_truth(pools, proc_dataset, tmp_path):
    gt = _fidelity(proc_dataset, pools["oracle"], tmp_path)["calibrated"]
    for part in ("seen", "unseen"):
        assert gt["ceiling"][part]["type_accuracy"] >= 0.9 and gt["ceiling"][part]["stain_accuracy"] >= 0.8, gt
        assert gt["synthetic"][part]["type_accuracy"] >= 0.9 and gt["synthetic"][part]["stain_accuracy"] >= 0.8, gt
    assert gt["synthetic"]["unseen"]["leakage"] <= 0.05 and gt["ceiling"]["unseen"]["leakage"] <= 0.05
    noise = _fidelity(proc_dataset, pools["noise"], tmp_path)["calibrated"]["synthetic"]["unseen"]
    # no morphology, and not its site's owner type's nuclei density either
    assert noise["type_accuracy"] < 0.5 and noise["leakage"] < 0.5, noise


def test_noise_takes_each_site_stain_from_its_tiles(proc_dataset):
    """The noise control's colours: Macenko stain vectors per site, checked against the renderer's."""
    from medi_dist.data.procedural import site_stain
    from medi_dist.generate.reference import site_stains

    stains, mean, std = site_stains(proc_dataset)
    assert len(stains) == pd.read_parquet(proc_dataset / "index.parquet").query("split == 'train'")[SITE].nunique()
    for site, he in stains.items():
        truth = site_stain(site)
        for got, want in ((he[:, 0], truth.h), (he[:, 1], truth.e)):
            assert got @ want / np.linalg.norm(got) / np.linalg.norm(want) > 0.85, site  # measured 0.90-0.995
    assert (mean > 0).all() and (std > 0).all()


def test_leakage_catches_owner_morphology(pools, proc_dataset, tmp_path, monkeypatch):
    """A 'generator' that draws the site's owner type instead of the requested one (what a site
    embedding carrying morphology does): the confounded probe cannot tell, the calibrated one can."""
    from medi_dist.data.procedural import render_tiles
    from medi_dist.data.shards import INDEX
    from medi_dist.generate import reference
    from medi_dist.generate.reference import ReferenceGenerator

    idx = pd.read_parquet(proc_dataset / "index.parquet").query("split == 'train'")
    owner = idx.groupby(SITE)[TYPE].first().to_dict()

    class OwnerMorphology(ReferenceGenerator):
        def sample_tiles(self, tiles, task=None):
            pairs = [(owner[t["conditions"][SITE]], t["conditions"][SITE]) for t in tiles]
            return render_tiles(pairs, [t["seed"] for t in tiles], self.size)

    out = tmp_path / "owner"
    monkeypatch.setattr(reference, "ReferenceGenerator", OwnerMorphology)  # job.generate looks it up per call
    generate(
        GenerateConfig(
            model=None,
            reference="oracle",
            dataset=str(proc_dataset),
            out=str(out),
            plan=GenerationPlan(mode="unseen-pairs", count=6, seed=4),
            tiles_per_shard=50,
        )
    )
    assert (out / INDEX).exists()
    res = _fidelity(proc_dataset, out, tmp_path)
    cal = res["calibrated"]["synthetic"]["unseen"]
    assert cal["leakage"] >= 0.9 and cal["type_accuracy"] <= 0.1 and cal["stain_accuracy"] >= 0.8, cal


def test_oracle_refused_for_real_data_and_cli_errors(pools, proc_dataset, tmp_path, capsys):
    fake = tmp_path / "manifest-data"
    shutil.copytree(proc_dataset, fake)
    manifest = json.loads((fake / "dataset.json").read_text())
    (fake / "dataset.json").write_text(json.dumps({**manifest, "source": "manifest"}))
    with pytest.raises(PlanError, match="no renderer; use --reference noise"):
        generate(
            GenerateConfig(
                model=None,
                reference="oracle",
                dataset=str(fake),
                out=str(tmp_path / "x"),
                plan=GenerationPlan(mode="unseen-pairs", count=1),
            )
        )
    assert not (tmp_path / "x").exists()
    assert _fidelity(fake, pools["oracle"], tmp_path)["calibrated"] is None  # no ground truth: not calibrated
    with pytest.raises(PlanError, match="is a synthetic pool"):
        generate(
            GenerateConfig(
                model=None,
                reference="noise",
                dataset=str(pools["oracle"]),
                out=str(tmp_path / "y"),
                plan=GenerationPlan(mode="unseen-pairs", count=1),
            )
        )
    for args, needle in (
        (["--reference", "oracle"], "pass --dataset DIR"),
        ([], "--model DIR (a trained model) or --reference"),
    ):
        assert main(["generate", *args, "--out", str(tmp_path / "z"), "--mode", "unseen-pairs", "--count", "1"]) == 2
        assert needle in capsys.readouterr().err
