"""Sources, shards, splits and their bad inputs (no Ray needed here)."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from medi_dist.data import sources
from medi_dist.data.ingest import ingest
from medi_dist.data.procedural import ProceduralConfig, render_tile
from medi_dist.data.records import SkipLog
from medi_dist.data.shards import INDEX, MANIFEST, VOCAB, verify_shards
from medi_dist.data.split import SplitConfig, site_split
from medi_dist.data.stats import dataset_stats
from medi_dist.metadata import UNKNOWN, ConditioningSpec, SchemaError, UnknownValueError


def _jpeg(seed: int, size: int = 32) -> bytes:
    img = render_tile("GLAND", "A1", np.random.default_rng(seed), size)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_procedural_ingest_layout(proc_dataset):
    index = pd.read_parquet(proc_dataset / INDEX)
    manifest = json.loads((proc_dataset / MANIFEST).read_text())
    assert len(index) == manifest["tiles"] == 600
    assert index["key"].is_unique and not index["key"].str.contains(r"\.").any()
    assert len(manifest["shards"]) > 2
    for shard in manifest["shards"]:
        with tarfile.open(proc_dataset / shard["path"]) as tar:
            names = tar.getnames()
        assert names == sorted(names), "members must be sorted so samples are grouped by key"
        keys = [n.split(".")[0] for n in names]
        assert [k for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]] == sorted(set(keys))
        assert len(keys) == 2 * shard["tiles"]
    spec = ConditioningSpec.load(proc_dataset / VOCAB)
    assert spec.categorical_names[:2] == ["cancer_type", "tissue_source_site"]
    assert spec.continuous_names == ["age"]
    stats = dataset_stats(proc_dataset, verify=True)
    assert stats["tiles"] == 600 and stats["cancer_types"] == 4 and stats["sites"] == 8


def test_webdataset_library_reads_identical_pixels(proc_dataset):
    index = pd.read_parquet(proc_dataset / INDEX).set_index("key")
    urls = [str(p) for p in verify_shards(proc_dataset)]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("rgb8"):
        row = index.loc[sample["__key__"]]
        meta = sample["json"]
        assert meta["cancer_type"] == row["cancer_type"] and meta["tissue_source_site"] == row["tissue_source_site"]
        assert sample["jpg"].shape == (32, 32, 3)
        seen += 1
    assert seen == len(index)


def test_ray_and_webdataset_agree(ray_cluster, proc_dataset):
    import ray

    urls = [str(p) for p in verify_shards(proc_dataset)]
    ours = {s["__key__"]: (s["jpg"], s["json"]) for s in wds.WebDataset(urls, shardshuffle=False).decode("rgb8")}
    rows = ray.data.read_webdataset(urls).take_all()
    assert len(rows) == len(ours)
    for r in rows:
        img, meta = ours[r["__key__"]]
        np.testing.assert_array_equal(np.asarray(r["jpg"]), img)
        assert r["json"] == meta


def test_split_site_disjoint_and_reproducible():
    cfg = ProceduralConfig(n_types=5, n_sites=20, n_tiles=3000, seed=3)
    from medi_dist.data.procedural import plan_counts

    groups = Counter(plan_counts(cfg))
    a = site_split(groups, SplitConfig(0.3, 0.15, seed=7))
    b = site_split(groups, SplitConfig(0.3, 0.15, seed=7))
    c = site_split(groups, SplitConfig(0.3, 0.15, seed=8))
    assert a == b and a != c
    assert set(a) == {s for _, s in groups}  # every site exactly once (dict keys)
    for split in ("train", "holdout", "val"):
        types = {t for (t, s) in groups if a[s] == split}
        assert types == {t for t, _ in groups}, f"every type has >=3 sites so each must reach {split}"
    share = sum(n for (t, s), n in groups.items() if a[s] == "holdout") / sum(groups.values())
    assert 0.15 < share < 0.45


def test_split_not_file_order():
    groups = Counter({("T", f"S{i:02d}"): 10 for i in range(20)})
    holdout = sorted(s for s, sp in site_split(groups, SplitConfig(0.3, seed=0)).items() if sp == "holdout")
    assert holdout != [f"S{i:02d}" for i in range(14, 20)] and holdout != [f"S{i:02d}" for i in range(6)]


def _tcga_tree(root: Path, tcga_metadata: Path, n_slides=6, tiles=3):
    meta = pd.read_csv(tcga_metadata, dtype=str, keep_default_na=False)
    meta = pd.concat([meta[meta["project_id"] == p].head(n_slides // 2) for p in ("TCGA-LUAD", "TCGA-LUSC")])
    for i, r in enumerate(meta.itertuples()):
        d = root / r.project_id.split("-")[1] / r.slide_submitter_id
        d.mkdir(parents=True)
        for j in range(tiles):
            (d / f"tile_{j}.jpg").write_bytes(_jpeg(i * 10 + j))
    return meta


def test_tcga_ut_source(tmp_path, tcga_metadata):
    meta = _tcga_tree(tmp_path / "tiles", tcga_metadata)
    orphan = tmp_path / "tiles" / "LUAD" / "TCGA-XX-0000-01Z-00-DX1"  # a slide with no metadata row
    orphan.mkdir()
    (orphan / "tile_0.jpg").write_bytes(_jpeg(99))
    first = (
        tmp_path / "tiles" / "LUAD" / meta.iloc[0].slide_submitter_id
        if meta.iloc[0].project_id == "TCGA-LUAD"
        else next((tmp_path / "tiles" / "LUAD").iterdir())
    )
    (first / "tile_bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # corrupt JPEG
    (first / "tile_gone.jpg").symlink_to(tmp_path / "nowhere.jpg")  # unreadable file
    skips = SkipLog()
    scan = sources.tcga_ut(tmp_path / "tiles", tcga_metadata, skips)
    ingest(scan, tmp_path / "ds", SplitConfig(0.3, seed=0), skips)
    index = pd.read_parquet(tmp_path / "ds" / INDEX)
    assert len(index) == len(meta) * 3
    assert set(index["cancer_type"]) == {"LUAD", "LUSC"}
    assert set(index["slide_id"]) == set(meta["slide_submitter_id"])
    assert {"sex", "race", "age"} <= set(index.columns)
    reasons = " | ".join(f"{o}: {r}" for o, r in skips.entries)
    assert "TCGA-XX-0000-01Z-00-DX1" in reasons and "no row" in reasons
    assert "tile_bad.jpg" in reasons and "cannot decode" in reasons
    assert "tile_gone.jpg" in reasons and "unreadable" in reasons
    assert len(skips) == 3
    # GDC's '--' and "not reported" become the explicit Unknown token, never index 0 by accident
    spec = ConditioningSpec.load(tmp_path / "ds" / VOCAB)
    race = spec.vocab("race")
    if (meta["race"] == "not reported").any():
        assert UNKNOWN in race.values
    with pytest.raises(UnknownValueError, match="valid values"):
        spec.vocab("tissue_source_site").encode("ZZ")


def test_tcga_missing_column_and_empty_folder(tmp_path, tcga_metadata):
    bad = tmp_path / "meta.csv"
    pd.read_csv(tcga_metadata).drop(columns=["tissue_source_site"]).to_csv(bad)
    (tmp_path / "tiles").mkdir()
    with pytest.raises(SchemaError, match=r"meta\.csv.*tissue_source_site"):
        sources.tcga_ut(tmp_path / "tiles", bad, SkipLog())
    with pytest.raises(SchemaError, match="no ingestible tiles"):
        sources.tcga_ut(tmp_path / "tiles", tcga_metadata, SkipLog())


def test_manifest_source_csv_and_parquet(tmp_path):
    rows = []
    for i in range(24):
        p = tmp_path / "img" / f"t{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(render_tile("SHEET" if i % 2 else "GLAND", f"S{i % 6}", np.random.default_rng(i), 32)).save(p)
        rows.append(
            {
                "path": f"img/t{i}.png",
                "cancer_type": "A" if i % 2 else "B",
                "tissue_source_site": f"S{i % 6}",
                "slide_id": f"slide{i // 4}",
                "sex": ["male", "female", ""][i % 3],
                "age": None if i == 0 else 40 + i,
            }
        )
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "m.parquet")
    for name in ("m.csv", "m.parquet"):
        skips = SkipLog()
        ingest(sources.manifest(tmp_path / name, skips), tmp_path / f"ds_{name}", SplitConfig(0.3, seed=0), skips)
        index = pd.read_parquet(tmp_path / f"ds_{name}" / INDEX)
        assert len(index) == 24 and set(index["image_format"]) == {"png"} and len(skips) == 0
        assert index["age"].isna().sum() == 1
        assert set(index["sex"]) == {"male", "female", UNKNOWN}
    pd.DataFrame(rows).drop(columns=["cancer_type"]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(SchemaError, match=r"bad\.csv.*cancer_type"):
        sources.manifest(tmp_path / "bad.csv", SkipLog())


def test_ingest_refuses_existing_output(tmp_path):
    scan = sources.procedural(ProceduralConfig(n_types=2, n_sites=4, n_tiles=40, size=16))
    ingest(scan, tmp_path / "d", SplitConfig(0.3))
    with pytest.raises(FileExistsError, match="--overwrite"):
        ingest(scan, tmp_path / "d", SplitConfig(0.3))
    assert (tmp_path / "d" / MANIFEST).exists()  # the existing dataset is untouched


def test_truncated_shard_is_refused_by_name(tmp_path):
    scan = sources.procedural(ProceduralConfig(n_types=2, n_sites=4, n_tiles=80, size=16))
    ingest(scan, tmp_path / "d", SplitConfig(0.3), shard_mb=0.01)
    shard = verify_shards(tmp_path / "d")[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(SchemaError, match=f"{shard.name}.*truncated"):
        verify_shards(tmp_path / "d")


def test_tcga_ut_accepts_tiff_tiles_like_the_manifest_source(tmp_path, tcga_metadata):
    """.tif/.tiff tiles are read (re-encoded as PNG), not silently left out."""
    meta = _tcga_tree(tmp_path / "tiles", tcga_metadata, n_slides=4, tiles=2)
    slide = tmp_path / "tiles" / meta.iloc[0].project_id.split("-")[1] / meta.iloc[0].slide_submitter_id
    arr = render_tile("GLAND", "A1", np.random.default_rng(7), 32)
    Image.fromarray(arr).save(slide / "tile_t.tif")
    Image.fromarray(arr).save(slide / "tile_u.TIFF")
    skips = SkipLog()
    ingest(sources.tcga_ut(tmp_path / "tiles", tcga_metadata, skips), tmp_path / "ds", SplitConfig(0.3, seed=0), skips)
    index = pd.read_parquet(tmp_path / "ds" / INDEX).set_index("key")
    assert len(skips) == 0 and len(index) == len(meta) * 2 + 2
    for stem in ("tile_t", "tile_u"):
        row = index.loc[f"{slide.name}-{stem}".replace(".", "_")]
        assert row["image_format"] == "png"
        with tarfile.open(tmp_path / "ds" / row["shard"]) as tar:
            stored = tar.extractfile(f"{row.name}.png").read()
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(stored))), arr)


def test_split_is_planned_from_the_tiles_that_survive(tmp_path):
    """With seed 0, type A's sites S0, S2, S4 are planned train, train, holdout. Every file of S4 is
    missing: planned from the listed rows, A would end with no holdout tile and split.json would list
    an empty site. Planned from the tiles read, S4 is not in the split and A keeps a holdout site."""
    from bad_inputs import ingest_csv, write_manifest

    csv = write_manifest(tmp_path)
    rows = pd.read_csv(csv)
    for p in rows.loc[rows["tissue_source_site"] == "S4", "path"]:
        (tmp_path / p).unlink()
    skips, index, manifest = ingest_csv(csv, tmp_path / "ds")
    assert len(skips) == 4 and "S4" not in set(index["tissue_source_site"])
    split = json.loads((tmp_path / "ds" / "split.json").read_text())
    assert split["missing_types"] == {}
    assert set(index.loc[index["split"] == "holdout", "cancer_type"]) == {"A", "B"}
    planned = {s for sites in split["sites"].values() for s in sites}
    assert planned == set(index["tissue_source_site"])  # no site without tiles in the plan
