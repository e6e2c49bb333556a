"""Downstream protocol on procedural data: paired real subsample, allocation counts, the linear and
CNN paths, the feature cache, the CLI, and clear errors before any work for bad input."""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from medi_dist.evaluate import allocation as al
from medi_dist.evaluate.downstream import (
    DownstreamConfig,
    DownstreamError,
    augmented,
    compare,
    load_inputs,
    normalized,
    run_downstream,
    run_seed,
    validate,
    verdict,
)
from medi_dist.evaluate.ray_fits import run_parallel
from medi_dist.evaluate.tile_reader import AUDIT, FeatureCache, Part, load_tiles, pool_index, read_index
from synthetic_pools import empty_pool, ingest_procedural, make_pool

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("downstream")
    real = ingest_procedural(root / "real", n_types=3, n_sites=12, n_tiles=420, val=0.0)
    pool = make_pool(real, root / "pool", per_pair=6)
    return {"real": real, "pool": pool, "root": root, "cache": str(root / "cache")}


@pytest.fixture(scope="module", autouse=True)
def few_source_tiles():
    """restain-sites estimates each site's stain from 32 source tiles here, not 128 (a quarter of the rendering)."""
    import medi_dist.data.stain_estimation as stain_estimation

    per, stain_estimation.PER_SITE = stain_estimation.PER_SITE, 32
    yield
    stain_estimation.PER_SITE = per


def cfg_for(data, **kw) -> DownstreamConfig:
    return DownstreamConfig(str(data["real"]), synthetic=[str(data["pool"])], cache_dir=data["cache"], **kw)


def test_allocate_hand_cases():
    # equal weights: 10 over 3 groups -> 4/3/3, the tie goes to the first group
    assert al.allocate(10, {"a": 1, "b": 1, "c": 1}, {"a": 9, "b": 9, "c": 9}) == {"a": 4, "b": 3, "c": 3}
    # capacity: a saturates at 2, the rest goes to b
    assert al.allocate(10, {"a": 1, "b": 1}, {"a": 2, "b": 20}) == {"a": 2, "b": 8}
    # asking for more than the pool holds takes everything
    assert al.allocate(100, {"a": 1, "b": 3}, {"a": 5, "b": 7}) == {"a": 5, "b": 7}
    assert al.allocate(0, {"a": 1}, {"a": 5}) == {"a": 0}
    # inverse frequency: real counts 0 / 1 / 3 -> weights 1 : 1/2 : 1/4 -> 8 / 4 / 2 of 14
    real = Counter({("T", "s1"): 1, ("T", "s2"): 3})
    groups = [("T", "s0"), ("T", "s1"), ("T", "s2")]
    w = al.policy_weights("inverse-frequency", groups, real)
    assert al.allocate(14, w, dict.fromkeys(groups, 50)) == {("T", "s0"): 8, ("T", "s1"): 4, ("T", "s2"): 2}
    # unseen pairs: only the pair without real tiles
    assert al.policy_weights("unseen-pairs", groups, real) == {("T", "s0"): 1.0}
    uniform = al.policy_weights("uniform", groups, real)
    assert al.allocate(6, uniform, dict.fromkeys(groups, 50)) == dict.fromkeys(groups, 2)
    with pytest.raises(ValueError, match="allocation must be one of"):
        al.policy_weights("random", groups, real)


def test_real_subsample_depends_only_on_seed_and_policies_count_right(data):
    cfg = cfg_for(data, k_sites=3, max_per_class=20)
    validate(cfg)
    inputs = load_inputs(cfg, validate(cfg))
    train_sites = set(json.loads((data["real"] / "split.json").read_text())["sites"]["train"])
    pool = inputs.pool.meta
    keys_by_seed = {}
    for seed in (0, 1):
        runs = {
            (r, a): run_seed(cfg.__class__(**{**cfg.__dict__, "ratio": r, "allocation": a}), inputs, seed)
            for r in (0.0, 0.5, 2.0)
            for a in al.ALLOCATIONS
        }
        real_keys = {tuple(run.real_keys) for run in runs.values()}
        assert len(real_keys) == 1, "the real subsample must not depend on ratio or policy"
        keys = real_keys.pop()
        keys_by_seed[seed] = keys
        meta = inputs.train.meta.set_index("key").loc[list(keys)]
        assert meta["tissue_source_site"].nunique() <= 3 and set(meta["tissue_source_site"]) <= train_sites
        assert meta.groupby("cancer_type").size().max() <= 20
        real_pairs = Counter(zip(meta["cancer_type"], meta["tissue_source_site"]))
        n_real = len(keys)
        for (r, a), run in runs.items():
            want = round(r * n_real)
            assert run.n_synthetic == sum(run.allocation.values()) == len(run.synthetic_keys)
            if a == "unseen-pairs":  # only pairs absent from this seed's real tiles
                assert all(real_pairs[g] == 0 for g in run.allocation)
                cap = sum(
                    n
                    for (t, s), n in Counter(zip(pool["cancer_type"], pool["tissue_source_site"])).items()
                    if real_pairs[(t, s)] == 0
                )
                assert run.n_synthetic == min(want, cap)
            else:
                assert run.n_synthetic == min(want, len(pool))
            if a == "uniform" and r == 0.5:  # equal shares up to one tile
                assert max(run.allocation.values()) - min(run.allocation.values()) <= 1
        # nested: the smaller ratio's synthetic tiles are a subset of the larger one's
        for a in al.ALLOCATIONS:
            assert set(runs[(0.5, a)].synthetic_keys) <= set(runs[(2.0, a)].synthetic_keys)
    assert keys_by_seed[0] != keys_by_seed[1]


def test_downstream_linear_compare_and_holdout_only(data):
    cfg = cfg_for(data, seeds=[0, 1], k_sites=4, max_per_class=40)
    AUDIT.reset()
    cmp = compare(cfg, {"real only": {"ratio": 0.0}, "pool r=1": {"ratio": 1.0, "allocation": "uniform"}})
    holdout = set(json.loads((data["real"] / "split.json").read_text())["sites"]["holdout"])
    for res in cmp.results.values():
        assert len(res.per_seed) == 2 and set(res.mean_sem) >= {
            "balanced_accuracy",
            "site_balanced_accuracy",
            "worst_site_accuracy",
            "mcc",
        }
        assert set(res.predictions["tissue_source_site"]) == holdout
        sub = res.subgroups()
        assert list(sub.columns) == ["cancer_type", "tissue_source_site", "n", "accuracy", "accuracy_sem"]
        assert set(sub["tissue_source_site"]) == holdout
        assert sub["accuracy"].between(0, 1).all()
    assert "real only" in cmp.table() and "pool r=1" in cmp.table()
    assert set(cmp.deltas()) == {"pool r=1"}
    # test tiles come only from holdout shards of the real dataset
    real_shards = [s for s in AUDIT.shards if s.startswith(str(data["real"].resolve()))]
    assert {s.split("/")[-2] for s in real_shards} == {"train", "holdout"}


def test_feature_cache_reused(data):
    class Counting:
        name, dim, calls = "counting-encoder", 2, 0

        def encode(self, images):
            Counting.calls += 1
            return np.stack([images.mean(axis=(1, 2, 3)), images.std(axis=(1, 2, 3))], 1).astype(np.float32)

    cache_dir = data["root"] / "cache-count"
    f1, m1 = FeatureCache(cache_dir, Counting()).features(data["real"], ["train"])
    calls = Counting.calls
    assert calls > 0 and len(f1) == len(read_index(data["real"], ["train"]))
    f2, m2 = FeatureCache(cache_dir, Counting()).features(data["real"], ["train"])  # fresh process-like cache
    assert Counting.calls == calls and np.array_equal(f1, f2) and list(m1["key"]) == list(m2["key"])


def test_load_tiles_subset_across_shards(data):
    idx = read_index(data["pool"], ["train"])
    assert idx["shard"].nunique() > 1
    keys = idx.groupby("shard")["key"].first().tolist()[1:]  # none from the first shard
    images, meta = load_tiles(data["pool"], ["train"], keys=keys)
    assert images.shape == (len(keys), 32, 32, 3) and sorted(meta["key"]) == sorted(keys)
    images, meta = load_tiles(data["pool"], ["train"], keys=keys[:1], size=16)
    assert images.shape == (1, 16, 16, 3) and images.dtype == np.uint8


def test_downstream_cnn_path(data):
    res = run_downstream(cfg_for(data, classifier="cnn", ratio=0.5, seeds=[0], epochs=1, width=8, max_per_class=30))
    assert res.per_seed[0]["n_synthetic"] == round(0.5 * res.per_seed[0]["n_real"])
    assert 0 <= res.mean_sem["balanced_accuracy"][0] <= 1


def test_cli_downstream(data, capsys, tmp_path):
    from medi_dist.evaluate.command import add_downstream_parser

    parser = argparse.ArgumentParser()
    add_downstream_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(
        [
            "downstream",
            "--real",
            str(data["real"]),
            "--synthetic",
            str(data["pool"]),
            "--ratio",
            "1",
            "--seeds",
            "0",
            "1",
            "--k-sites",
            "4",
            "--cache-dir",
            data["cache"],
            "--out",
            str(tmp_path / "out"),
        ]
    )
    args.func(args)
    out = capsys.readouterr().out
    assert "real only" in out and "r=1 inverse-frequency" in out and "paired difference" in out
    assert re.search(r"-> (helps|hurts|makes no clear difference) \(balanced accuracy\)", out)
    assert [verdict(0.11, 0.05), verdict(-0.11, 0.05), verdict(0.09, 0.05)] == [
        "helps",
        "hurts",
        "makes no clear difference",
    ]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(saved) == {"real only", "r=1 inverse-frequency"}


def test_bad_inputs_fail_before_any_work(data, tmp_path):
    AUDIT.reset()
    with pytest.raises(FileNotFoundError, match="/no/such/weights.pt"):
        run_downstream(cfg_for(data, encoder="openclip:ViT-B-32:/no/such/weights.pt", ratio=1.0))
    with pytest.raises(DownstreamError, match="ratio must be >= 0"):
        run_downstream(cfg_for(data, ratio=-0.5))
    empty = empty_pool(data["real"], tmp_path / "empty")
    with pytest.raises(DownstreamError, match="empty"):
        run_downstream(DownstreamConfig(str(data["real"]), synthetic=[str(empty)], ratio=1.0, cache_dir=data["cache"]))
    with pytest.raises(DownstreamError, match="needs at least one synthetic pool"):
        run_downstream(DownstreamConfig(str(data["real"]), ratio=1.0))
    with pytest.raises(DownstreamError, match="no tiles in split 'val'"):
        run_downstream(cfg_for(data, test_split="val"))
    assert not AUDIT.shards, "no tile may be read before the inputs are validated"


def test_pools_of_test_sites_or_another_dataset_are_refused(data, tmp_path):
    """Generated tiles at a held-out site would teach the classifier the stain it is tested on; a pool
    from another dataset's model mislabels the arm. Both stop before any pixel is read, in downstream
    and in fidelity."""
    from medi_dist.evaluate.fidelity_job import FidelityConfig, evaluate_fidelity

    AUDIT.reset()
    leak = make_pool(data["real"], tmp_path / "leak", per_pair=1, sites_split="holdout")
    with pytest.raises(
        DownstreamError, match=r"leak.* keeps out of its 'train' split: .*\(holdout\).*leak the test sites"
    ):
        run_downstream(DownstreamConfig(str(data["real"]), synthetic=[str(leak)], ratio=1.0, cache_dir=data["cache"]))
    other = make_pool(data["real"], tmp_path / "other", per_pair=1)
    idx = pd.read_parquet(other / "index.parquet")
    idx["tissue_source_site"] = idx["tissue_source_site"].replace({idx["tissue_source_site"].iloc[0]: "ZZ"})
    idx.to_parquet(other / "index.parquet", index=False)
    with pytest.raises(DownstreamError, match=r"never has: tissue_source_site \['ZZ'\]"):
        run_downstream(DownstreamConfig(str(data["real"]), synthetic=[str(other)], ratio=1.0, cache_dir=data["cache"]))
    with pytest.raises(ValueError, match=r"never has: tissue_source_site \['ZZ'\]"):
        evaluate_fidelity(FidelityConfig(real=str(data["real"]), synthetic=str(other), log_mlflow=False))
    assert not AUDIT.shards


def test_a_ratio_the_pools_cannot_fill_is_reported(data):
    res = run_downstream(cfg_for(data, ratio=50.0, seeds=[0]))
    n_real, n_syn = res.runs[0].n_real, res.runs[0].n_synthetic
    assert n_syn == len(pool_index(data["pool"])) < 50 * n_real
    assert res.effective_ratio == pytest.approx(n_syn / n_real)
    assert f"used {n_syn} synthetic per {n_real} real" in res.shortfall()
    assert run_downstream(cfg_for(data, ratio=0.25, seeds=[0])).shortfall() is None


def test_stain_baselines_do_what_they_say(data):
    from medi_dist.evaluate.downstream import balance_weights
    from medi_dist.evaluate.stain import hed_jitter, macenko_normalize, restain

    X, meta = load_tiles(data["real"], ["train"])
    sites = meta["tissue_source_site"].astype(str).to_numpy()
    od = lambda im: (-np.log((im.reshape(len(im), -1, 3).astype(float) + 1) / 256)).mean(1)  # noqa: E731
    site_means = lambda im: np.stack([od(im[sites == s]).mean(0) for s in np.unique(sites)])  # noqa: E731
    assert np.abs(hed_jitter(X[:20], np.random.default_rng(0), 0.0).astype(int) - X[:20]).max() <= 2  # identity
    jittered = hed_jitter(X[:20], np.random.default_rng(0), 0.2)
    assert np.abs(od(jittered) - od(X[:20])).mean() > 0.02
    # Macenko: every slide onto one stain, so the sites' mean colours move together
    norm = macenko_normalize(X, meta["slide_id"], X)
    assert site_means(norm).std(0).sum() < 0.9 * site_means(X).std(0).sum()  # measured 0.24 vs 0.30
    # re-staining: each slide into another site's stain; the copies' colour leaves their own site's
    moved = restain(X, meta["slide_id"], sites, seed=0)
    own = site_means(X)[np.searchsorted(np.unique(sites), sites)]
    assert np.abs(od(moved) - own).mean() > 2 * np.abs(od(X) - own).mean()
    # ... and with the sites' stains of MeDi's stain composition (estimated once, shared with the arm below)
    from medi_dist.data.stain_estimation import estimate_site_stains
    from medi_dist.evaluate.stain import restain_sites

    stains = estimate_site_stains(data["real"], 32)
    moved = restain_sites(X, meta["cancer_type"], meta["slide_id"], sites, stains, 0)
    assert np.abs(od(moved) - own).mean() > 2 * np.abs(od(X) - own).mean()
    # balancing: each (type, site) the same total weight within its type, types keep their counts
    w = balance_weights(np.array(["a", "a", "a", "b"]), np.array(["s", "s", "t", "u"]))
    assert np.allclose(w, [0.75, 0.75, 1.5, 1.0])


def test_fits_as_ray_tasks_equal_the_fits_one_after_the_other(data, ray_cluster):
    """ray_fits.run_parallel: every (arm, seed) CNN fit runs in a Ray worker with one torch thread, and gives
    what the same fit gives in this process with one thread. The workers get the driver's site stains
    (here from 32 source tiles per site, not the 128 a worker would estimate with)."""
    base = cfg_for(data, classifier="cnn", seeds=[0, 1], epochs=1, width=8, max_per_class=30)
    arms = {
        "real only": {"ratio": 0.0},
        "pool": {"ratio": 1.0, "allocation": "uniform"},
        "restain-sites": {"ratio": 0.0, "augment": "restain-sites"},
    }
    one_by_one, tasks = compare(base, arms), compare(base, arms, run_parallel)
    for arm in arms:
        a, b = one_by_one.results[arm], tasks.results[arm]
        assert [r.seed for r in b.runs] == [0, 1]
        for ra, rb in zip(a.runs, b.runs):
            assert ra.predictions.equals(rb.predictions), arm
    restained, real = (one_by_one.results[k].runs[0].predictions for k in ("restain-sites", "real only"))
    assert not restained.equals(real)  # the re-stained copies change the fit


def test_baseline_arms_in_the_protocol_and_the_cli(data, capsys):
    from medi_dist.cli import main

    base = DownstreamConfig(
        str(data["real"]), cache_dir=data["cache"], classifier="cnn", seeds=[0], epochs=1, width=8, max_per_class=30
    )
    comp = compare(
        base,
        {
            "real only": {},
            "hed": {"augment": "hed-jitter", "augment_ratio": 0.5},
            "restain": {"augment": "restain"},
            "restain-sites": {"augment": "restain-sites"},
            "macenko": {"normalize": "macenko"},
            "balanced": {"balance": "type-site"},
        },
    )
    assert all(0 <= r.mean_sem["balanced_accuracy"][0] <= 1 for r in comp.results.values())
    inputs = load_inputs(base)
    real = Part(inputs.train.X[:40], inputs.train.meta.iloc[:40])
    for augment, ratio in (("hed-jitter", 0.5), ("restain", 2.0), ("restain-sites", 1.0)):
        copies = augmented(replace(base, augment=augment, augment_ratio=ratio), real, seed=0)
        assert len(copies.X) == len(copies.meta) == round(40 * ratio)
        assert not np.array_equal(copies.X, real.X[: len(copies.X)])
    normed = normalized(inputs, "macenko")
    assert normed is normalized(inputs, "macenko") and not np.array_equal(normed.test.X, inputs.test.X)  # cached
    with pytest.raises(DownstreamError, match="use --classifier cnn"):
        validate(cfg_for(data, classifier="linear", augment="hed-jitter"))
    with pytest.raises(DownstreamError, match="augment must be one of"):
        validate(cfg_for(data, classifier="cnn", augment="jpeg"))
    assert (
        main(
            [
                "evaluate",
                "downstream",
                "--real",
                str(data["real"]),
                "--classifier",
                "cnn",
                "--epochs",
                "1",
                "--seeds",
                "0",
                "--max-per-class",
                "20",
                "--baselines",
                "hed-jitter",
                "macenko",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "paired difference hed-jitter - real only" in out and "paired difference macenko - real only" in out


def test_every_demo_contrast_names_two_of_its_arms():
    """The demo reads a contrast only where both arms ran: a renamed arm would drop it silently."""
    from medi_dist.demo import DemoConfig
    from medi_dist.demo_report import CONTRASTS, arms

    pools = {k: f"/pools/{k}" for k in ("medi", "site-nulled", "oracle", "noise")}
    got = arms(DemoConfig().ratio, pools)
    assert all(a in got and b in got for a, b, _ in CONTRASTS)
    assert got["+ MeDi + HED jitter"] == {**got["+ MeDi"], **got["HED jitter"]}
