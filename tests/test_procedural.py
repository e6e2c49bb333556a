"""Procedural H&E dataset: determinism, plan, schema, and the ground truth that type sets morphology
and site sets colour."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from medi_dist.data.morphology import cancer_types
from medi_dist.data.procedural import (
    ProceduralConfig,
    generate,
    plan_counts,
    render_tile,
    site_codes,
    site_stain,
)
from medi_dist.metadata import check_key

SMALL = ProceduralConfig(n_types=3, n_sites=6, n_tiles=60, tiles_per_slide=4)


def _decode(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)))


def _deconvolve(img: np.ndarray, site: str) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin and eosin concentrations, recovered using the site's known stain (ground truth)."""
    st = site_stain(site)
    od = -np.log((img.astype(float) + 1) / 256) - st.bg
    c = od.reshape(-1, 3) @ np.linalg.pinv(np.stack([st.h, st.e], 1)).T
    return c[:, 0].reshape(img.shape[:2]), c[:, 1].reshape(img.shape[:2])


def _features(img: np.ndarray, site: str) -> list[float]:
    h, e = _deconvolve(img, site)
    return [np.mean(h > 0.5), h.mean(), e.mean(), np.mean((h < 0.15) & (e < 0.15))]


def test_names():
    types, sites = cancer_types(14), site_codes(300)
    assert types[:4] == ["GLAND", "SHEET", "STROMA", "PAPIL"]
    assert len(set(types)) == 14 and len(set(sites)) == 300
    assert all(len(s) == 2 for s in site_codes(234))
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", n) for n in types + sites)
    for t in types:  # every generated name renders, variants included
        assert render_tile(t, "A1", np.random.default_rng(0), 32).shape == (32, 32, 3)


def test_plan_counts_sum_and_confounding():
    cfg = ProceduralConfig(n_types=5, n_sites=17, n_tiles=1003, seed=3)
    plan = plan_counts(cfg)
    assert plan == plan_counts(cfg)  # deterministic
    assert sum(plan.values()) == 1003 and min(plan.values()) >= 1
    assert {t for t, _ in plan} == set(cancer_types(5)) and {s for _, s in plan} == set(site_codes(17))
    owners = {}
    for t, s in plan:
        owners.setdefault(s, set()).add(t)
    assert all(len(v) == 1 for v in owners.values())  # each site belongs to exactly one type
    assert plan_counts(ProceduralConfig(n_types=5, n_sites=17, n_tiles=1003, seed=4)) != plan


def test_plan_imbalance():
    uni = plan_counts(ProceduralConfig(n_types=4, n_sites=12, n_tiles=1200, imbalance="uniform"))
    assert set(uni.values()) == {100}
    # with ~20 sites per type the largest site holds ~30% of a type's tiles, as in TCGA
    top1 = []
    for seed in range(10):
        plan = plan_counts(ProceduralConfig(n_types=4, n_sites=80, n_tiles=40000, seed=seed))
        for t in cancer_types(4):
            c = np.array([v for (tt, _), v in plan.items() if tt == t])
            top1.append(c.max() / c.sum())
    assert 0.2 < np.mean(top1) < 0.45 and max(top1) > 0.5


def test_plan_explicit_and_errors():
    cfg = ProceduralConfig(counts={("SHEET", "Z9"): 3, ("GLAND2", "A1"): 0, ("CLEAR", "Q7"): 2})
    assert plan_counts(cfg) == {("SHEET", "Z9"): 3, ("CLEAR", "Q7"): 2}
    assert len(list(generate(cfg))) == 5
    with pytest.raises(ValueError, match="unknown procedural cancer type"):
        plan_counts(ProceduralConfig(counts={("LUAD", "A1"): 1}))
    with pytest.raises(ValueError):
        plan_counts(ProceduralConfig(counts={("GLAND", "A.1"): 1}))
    with pytest.raises(ValueError):
        plan_counts(ProceduralConfig(n_types=4, n_sites=3))
    with pytest.raises(ValueError):
        plan_counts(ProceduralConfig(imbalance="zipf"))


def test_determinism_and_seed():
    a = [(r.key, r.image_bytes, r.meta) for r in generate(SMALL)]
    b = [(r.key, r.image_bytes, r.meta) for r in generate(SMALL)]
    assert a == b
    c = [r.image_bytes for r in generate(ProceduralConfig(**{**SMALL.__dict__, "seed": 1}))]
    assert len(set(c) & {x[1] for x in a}) == 0


def test_tiles_independent_of_plan():
    """A tile's bytes depend only on (seed, type, site, index): a partial plan, as a parallel worker
    would render it, reproduces the same tiles."""
    full = list(generate(SMALL))
    (t, s), _ = next(iter(plan_counts(SMALL).items()))
    part = list(generate(ProceduralConfig(counts={(t, s): 3}, tiles_per_slide=4)))
    assert [r.image_bytes for r in part] == [r.image_bytes for r in full[:3]]
    assert [r.key for r in part] == [r.key for r in full[:3]]


def test_records_schema():
    recs = list(generate(SMALL))
    plan = plan_counts(SMALL)
    assert len(recs) == sum(plan.values())
    got = {}
    for r in recs:
        got[(r.meta["cancer_type"], r.meta["tissue_source_site"])] = (
            got.get((r.meta["cancer_type"], r.meta["tissue_source_site"]), 0) + 1
        )
    assert got == plan
    keys = [r.key for r in recs]
    assert len(set(keys)) == len(keys)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", k) and check_key(k) for k in keys)
    for r in recs:
        assert r.image_format == "jpg"
        img = _decode(r.image_bytes)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert set(r.meta) == {"slide_id", "cancer_type", "tissue_source_site", "sex", "age"}
        assert r.meta["sex"] in ("male", "female")
        assert r.meta["age"] is None or isinstance(r.meta["age"], int)
    by_slide = {}
    for r in recs:  # tiles of one slide come from one patient
        by_slide.setdefault(r.meta["slide_id"], set()).add((r.meta["sex"], r.meta["age"]))
    assert all(len(v) == 1 for v in by_slide.values())
    assert max(len([r for r in recs if r.meta["slide_id"] == s]) for s in by_slide) == 4
    ages = [r.meta["age"] for r in generate(ProceduralConfig(n_tiles=800, tiles_per_slide=1))]
    assert None in ages and any(a is not None for a in ages)


def test_no_extra_metadata_and_size():
    cfg = ProceduralConfig(n_types=2, n_sites=2, n_tiles=4, size=96, extra_metadata=False)
    for r in generate(cfg):
        assert set(r.meta) == {"slide_id", "cancer_type", "tissue_source_site"}
        img = Image.open(io.BytesIO(r.image_bytes))
        assert img.mode == "RGB" and img.size == (96, 96)


def test_types_differ_in_morphology_across_sites():
    """Type is learnable from stain-invariant morphology (hematoxylin/eosin amounts recovered by
    deconvolution): a nearest-centroid classifier trained on some sites works on held-out sites."""
    types, sites = cancer_types(6), site_codes(12)
    feats = {
        (t, s): [_features(render_tile(t, s, np.random.default_rng([i, k, j]), 64), s) for i in range(4)]
        for k, t in enumerate(types)
        for j, s in enumerate(sites)
    }
    train, test = sites[:6], sites[6:]
    cent = np.array([np.mean([feats[(t, s)] for s in train], axis=(0, 1)) for t in types])
    scale = np.std([f for s in train for t in types for f in feats[(t, s)]], axis=0)
    hits = [
        np.argmin((((np.array(f) - cent) / scale) ** 2).sum(1)) == k
        for k, t in enumerate(types)
        for s in test
        for f in feats[(t, s)]
    ]
    assert np.mean(hits) > 0.85, np.mean(hits)
    # nuclear fraction orders the archetypes the same way at every site
    hfrac = {key: np.mean([f[0] for f in v]) for key, v in feats.items()}
    for s in sites:
        assert hfrac[("SMALL", s)] > hfrac[("GLAND", s)] > hfrac[("STROMA", s)]
        assert hfrac[("SHEET", s)] > 2 * hfrac[("GLAND", s)]


def test_site_changes_colour_not_morphology():
    sites = site_codes(8)
    means = {
        s: np.mean(
            [render_tile("SHEET", s, np.random.default_rng(i), 64).reshape(-1, 3).mean(0) for i in range(6)], axis=0
        )
        for s in sites
    }
    dists = [np.abs(means[a] - means[b]).max() for i, a in enumerate(sites) for b in sites[i + 1 :]]
    assert min(dists) > 3 and np.median(dists) > 10  # a visible per-site colour shift
    assert len({site_stain(s).quality for s in sites}) > 1 and len({site_stain(s).blur for s in sites}) > 1
    # same tile RNG at two sites: the same tissue, so the deconvolved hematoxylin maps agree
    for t in cancer_types(6):
        a, b = (render_tile(t, s, np.random.default_rng(5), 64) for s in ("A1", "B1"))
        assert not np.array_equal(a, b)
        ha, hb = _deconvolve(a, "A1")[0], _deconvolve(b, "B1")[0]
        assert np.corrcoef(ha.ravel(), hb.ravel())[0, 1] > 0.8, t


def test_scanner_lines_are_a_site_signature_without_colour():
    """scanner_lines adds each site's own neutral-density line pattern: the same on every tile of the
    site (so a classifier can use it as a shortcut), different between sites, no change of hue."""
    from medi_dist.data.procedural import render_tile, site_stain

    def od(site, seed, lines):
        return -np.log((render_tile("SHEET", site, np.random.default_rng(seed), 32, lines) + 1.0) / 256)

    diffs = {s: [od(s, k, True) - od(s, k, False) for k in (1, 2)] for s in ("A1", "B1")}
    for d1, d2 in diffs.values():
        assert np.corrcoef(d1.ravel(), d2.ravel())[0, 1] > 0.8  # one pattern for the site, whatever the tile
        assert d1.mean() > 0.02  # added optical density, the same in every channel (no hue):
        assert np.ptp(d1.mean(axis=(0, 1))) < 0.2 * d1.mean()
    assert np.corrcoef(diffs["A1"][0].ravel(), diffs["B1"][0].ravel())[0, 1] < 0.5
    assert site_stain("A1").lines != site_stain("B1").lines
    # off by default: the existing world's tiles are unchanged
    assert np.array_equal(
        render_tile("SHEET", "A1", np.random.default_rng(1), 32),
        render_tile("SHEET", "A1", np.random.default_rng(1), 32, False),
    )
