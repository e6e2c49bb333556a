"""The bad-input suite (issue 7), tiles and metadata: every case ends in a clear error that names the
file or row and says what to do, or in a counted skip; the good tiles still ingest and an existing
dataset is never touched. Shards, model conditions, configs and a full disk: test_bad_artifacts.py.

Cases already covered elsewhere and not repeated here: a corrupt/unreadable tile and a slide without
metadata in the tcga-ut source, a missing required column in tcga-ut and manifest tables, an empty
input folder, a truncated shard (test_data_layer.py); corrupt tiles in the stream and a model that
lacks one of the data's sites (test_stream.py).
"""

from __future__ import annotations

import io
import re
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from bad_inputs import (
    N_GOOD,
    good_csv,  # noqa: F401 (pytest fixtures, used by name)
    ingest_csv,
    one_error_line,
    png16_rgb,
    png_raw,
    run_cli,
    snapshot,
    tile_bytes,
    write_manifest,
)
from medi_dist.data import sources
from medi_dist.data.records import SkipLog, TileRecord
from medi_dist.data.shards import VOCAB, check_record, verify_shards
from medi_dist.data.stats import dataset_stats, format_stats
from medi_dist.data.stream import StreamConfig, decode_tile, tile_stream, to_model_range
from medi_dist.metadata import ConditioningSpec, ContinuousSpec, SchemaError, Vocab

# ---- tiles ---------------------------------------------------------------------------------------

BAD_TILES = {
    # case: (file name, bytes, what the skip reason must say)
    "corrupt": ("bad.jpg", lambda: b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2, r"cannot decode image"),
    "truncated": (
        "bad.jpg",
        lambda: tile_bytes(99)[: len(tile_bytes(99)) // 2],
        r"cannot decode image .*(?i:truncated)",
    ),
    "grayscale": (
        "bad.jpg",
        lambda: tile_bytes(99, mode="L"),
        r"image mode L \(need 8-bit RGB H&E\); convert it to RGB",
    ),
    "rgba": ("bad.png", lambda: tile_bytes(99, mode="RGBA", fmt="PNG"), r"image mode RGBA .*convert it to RGB"),
    "16-bit grayscale": (
        "bad.png",
        lambda: tile_bytes(99, mode="I;16", fmt="PNG"),
        r"image mode I;16 .*convert it to RGB",
    ),
    "non-square": ("bad.jpg", lambda: tile_bytes(99, size=(48, 32)), r"tile is 48x32, not square; crop it"),
    "decompression bomb": ("bad.png", lambda: png_raw(20000, 20000, 8, 2, b"\x00" * 64), r"DecompressionBombError"),
}


@pytest.mark.parametrize("case", list(BAD_TILES))
def test_bad_tile_is_skipped_counted_and_named(tmp_path, case):
    name, make, reason = BAD_TILES[case]
    csv = write_manifest(tmp_path, [{"name": name, "data": make()}])
    skips, index, manifest = ingest_csv(csv, tmp_path / "ds")
    assert len(index) == N_GOOD  # every good tile still ingested
    assert len(skips) == 1 and len(manifest["skipped"]) == 1
    origin, why = skips.entries[0]
    assert origin.startswith(f"{csv} row {N_GOOD + 2} (img/{name})"), origin
    assert re.search(reason, why), why
    assert manifest["skipped"][0] == {"input": origin, "reason": why}


def test_16bit_rgb_png_is_reduced_to_8_bits(tmp_path):
    """PIL reads 48-bit RGB PNGs as 8-bit RGB (high byte); the tile is stored as is and decodes the same
    in the stream and in the webdataset library."""
    arr = np.random.default_rng(5).integers(0, 65536, (32, 32, 3)).astype(np.uint16)
    csv = write_manifest(tmp_path, [{"name": "deep.png", "data": png16_rgb(arr), "key": "deep16"}])
    skips, index, _ = ingest_csv(csv, tmp_path / "ds")
    assert len(skips) == 0 and len(index) == N_GOOD + 1
    shard = tmp_path / "ds" / index.set_index("key").at["deep16", "shard"]
    with tarfile.open(shard) as tar:
        stored = tar.extractfile("deep16.png").read()
    want = (arr >> 8).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(stored))), want)
    np.testing.assert_allclose(decode_tile(stored, 32), want.transpose(2, 0, 1) / 127.5 - 1.0, atol=1e-6)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Good tiles plus other square sizes (48 px JPEG, 64 px PNG), ages missing in every spelling (any
    case), GDC's de-identified ages and a word where a number should be."""
    root = tmp_path_factory.mktemp("mixed")
    missing = {
        0: "NaN",
        1: "",
        2: "'--",
        3: "not reported",
        4: "nan",
        5: "None",
        6: "NA",
        7: "N/A",
        8: "Not reported",
        9: "NOT REPORTED",
        10: "unknown",
        11: " na ",
    }
    top_coded = {12: ">89", 13: "90+"}
    extra = [
        {"name": "big48.jpg", "data": tile_bytes(100, size=48), "key": "big48"},
        {"name": "big64.png", "data": tile_bytes(101, size=64, fmt="PNG"), "key": "big64"},
        {"name": "word.jpg", "data": tile_bytes(102), "key": "word", "age": "forty"},
        {"name": "word2.jpg", "data": tile_bytes(103), "key": "word2", "age": "forty"},
    ]
    rows_meta = {i: {"age": v, "key": f"noage{i}"} for i, v in missing.items()}
    rows_meta |= {i: {"age": v, "key": f"old{i}"} for i, v in top_coded.items()}
    csv = write_manifest(root, extra, rows_meta=rows_meta)
    skips, index, manifest = ingest_csv(csv, root / "ds")
    return {
        "root": root,
        "csv": csv,
        "ds": root / "ds",
        "skips": skips,
        "index": index.set_index("key"),
        "manifest": manifest,
        "missing": [f"noage{i}" for i in missing] + ["word", "word2"],
        "top_coded": [f"old{i}" for i in top_coded],
    }


def test_other_square_sizes_are_kept_and_resized_in_the_stream(ray_cluster, mixed):
    """A square tile of another size is ingested as is; the stream resizes every tile (bilinear) to the
    model resolution. Here the model also knows one more site and type than the data (listed first,
    so every index shifts): the stream must use the model's indices, and the model's age statistics."""
    data_spec = ConditioningSpec.load(mixed["ds"] / VOCAB)
    model_spec = ConditioningSpec(
        [
            Vocab("cancer_type", ["0-only-in-model", *data_spec.vocab("cancer_type").values]),
            Vocab("tissue_source_site", ["00", *data_spec.vocab("tissue_source_site").values]),
        ],
        [ContinuousSpec("age", 50.0, 10.0)],
    )
    s = tile_stream(mixed["ds"], ("train", "holdout"), StreamConfig(resolution=16), spec=model_spec)
    got = {}
    for b in s.dataset.iter_batches(batch_size=64, batch_format="numpy"):
        for i, k in enumerate(b["key"]):
            got[k] = {c: b[c][i] for c in b if c != "key"}
    index = mixed["index"]
    assert set(got) == set(index.index) and s.skipped()["skipped"] == 0
    assert all(v["image"].shape == (3, 16, 16) for v in got.values())
    for key, name in (("big48", "big48.jpg"), ("big64", "big64.png")):
        want = decode_tile((mixed["root"] / "img" / name).read_bytes(), 16)
        np.testing.assert_array_equal(to_model_range(got[key]["image"]), want)
    for k, v in got.items():
        assert model_spec.vocab("cancer_type").decode(v["cond_cancer_type"]) == index.at[k, "cancer_type"]
        site = model_spec.vocab("tissue_source_site").decode(v["cond_tissue_source_site"])
        assert site == index.at[k, "tissue_source_site"]
        if k in mixed["missing"]:
            assert np.isnan(v["cont_age"])  # -> the model's learned null age, not a crash
        else:
            assert v["cont_age"] == pytest.approx((index.at[k, "age"] - 50.0) / 10.0)


# ---- metadata ------------------------------------------------------------------------------------


def test_missing_age_in_any_spelling_is_null_and_a_word_is_listed_not_a_skip(mixed):
    """NA, N/A, 'Not reported' (any case) are missing; '>89' and '90+' are 90; a word is read as
    missing too, and listed (column, value, count) in the summary and dataset.json; no tile is dropped."""
    index = mixed["index"]
    assert len(index) == N_GOOD + 4 and len(mixed["skips"]) == 0
    assert index.loc[mixed["missing"], "age"].isna().all()
    assert (index.loc[mixed["top_coded"], "age"] == 90).all()
    assert index["age"].notna().sum() == len(index) - len(mixed["missing"])
    spec = ConditioningSpec.load(mixed["ds"] / VOCAB)
    numeric = index.loc[index["split"] == "train", "age"].dropna()  # statistics: the train split only
    assert spec.continuous[0].mean == pytest.approx(numeric.mean())  # ... and real numbers only
    assert mixed["manifest"]["unparsed_values"] == [{"column": "age", "value": "forty", "count": 2}]
    notes = format_stats(dataset_stats(mixed["ds"]))
    assert "warning: age value 'forty' is not a number; read as missing in 2 row(s)" in notes


def test_age_column_with_no_value_at_all_is_dropped_not_a_crash(tmp_path):
    csv = write_manifest(tmp_path, age="'--")
    skips, index, manifest = ingest_csv(csv, tmp_path / "ds")
    assert len(index) == N_GOOD and len(skips) == 0 and index["age"].isna().all()
    assert manifest["continuous"] == [] and ConditioningSpec.load(tmp_path / "ds" / VOCAB).continuous_names == []


def test_missing_column_names_file_and_fix_and_cli_says_one_line(tmp_path, good_csv):
    with pytest.raises(SchemaError, match=rf"{re.escape(str(good_csv))}: missing required column\(s\) \['race'\]"):
        sources.manifest(good_csv, SkipLog(), categorical=["race"])
    with pytest.raises(SchemaError, match=r"missing required column\(s\) \['image'\].*Use --image-column"):
        sources.manifest(good_csv, SkipLog(), image_column="image")
    proc = run_cli(
        "ingest",
        "--source",
        "manifest",
        "--manifest",
        str(good_csv),
        "--out",
        str(tmp_path / "ds"),
        "--categorical",
        "race",
        cwd=tmp_path,
    )
    one_error_line(proc, "medi-dist ingest: error:", str(good_csv), "['race']")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


# ---- keys ----------------------------------------------------------------------------------------


def test_duplicate_keys_are_refused_and_the_existing_dataset_is_kept(tmp_path, good_csv):
    out = tmp_path / "ds"
    ingest_csv(good_csv, out)
    before = snapshot(out)
    # 'slide.7' is sanitised to 'slide_7', colliding with the next row's key
    csv = write_manifest(
        tmp_path / "new",
        [
            {"name": "x.jpg", "data": tile_bytes(50), "key": "slide.7"},
            {"name": "y.jpg", "data": tile_bytes(51), "key": "slide_7"},
        ],
    )
    rows = rf"{re.escape(str(csv))} row 2[67] \(img/[xy]\.jpg\)"
    with pytest.raises(SchemaError, match=rf"duplicate tile key 'slide_7' from {rows} and {rows}.*distinct keys"):
        ingest_csv(csv, out, overwrite=True)
    assert snapshot(out) == before  # the existing dataset is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "new"]  # no temporary directory left


def test_dotted_keys_are_sanitised_and_unsanitised_keys_refused(tmp_path):
    """A manifest `key` with dots is sanitised (every character but letters, digits, '-' and '_'
    becomes '_'); a source that hands the writer a dotted key is refused before anything is written."""
    csv = write_manifest(tmp_path, [{"name": "x.jpg", "data": tile_bytes(50), "key": "TCGA.A1.0001.tile.3"}])
    _, index, _ = ingest_csv(csv, tmp_path / "ds")
    assert "TCGA_A1_0001_tile_3" in set(index["key"]) and not index["key"].str.contains(r"\.").any()
    urls = [str(p) for p in verify_shards(tmp_path / "ds", checksums=True)]
    assert {s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)} == set(index["key"])
    rec = TileRecord("a.b", tile_bytes(1), "jpg", {"cancer_type": "A", "tissue_source_site": "S0"}, "src.csv row 2")
    with pytest.raises(SchemaError, match=r"tile key 'a\.b' is invalid.*no '\.'"):
        check_record(rec, {}, SkipLog())  # what ingest runs on every tile before writing
    assert not (tmp_path / "w").exists()


def test_model_condition_column_missing_from_data(mixed):
    spec = ConditioningSpec.load(mixed["ds"] / VOCAB)
    model_spec = ConditioningSpec(spec.categorical + [Vocab("race", ["asian", "white"])], spec.continuous)
    with pytest.raises(SchemaError, match=rf"dataset {re.escape(str(mixed['ds']))} has no column 'race'"):
        tile_stream(mixed["ds"], ("train",), spec=model_spec)


def test_category_whitespace_is_stripped_and_case_variants_are_listed(tmp_path):
    """'LUAD ' is 'LUAD' in every categorical column; 'MALE' / 'male' stay two values but ingest lists
    them once per column (summary via data stats, and dataset.json)."""
    rows_meta = {
        i: {
            "cancer_type": f" {'AB'[i % 2]} ",
            "tissue_source_site": f"{['S0', 'S1', 'S2', 'S3', 'S4', 'S5'][i % 6]}\t",
            "sex": ["male", "MALE ", "female"][i % 3],
            "race": ["White", "WHITE", "white", " asian"][i % 4],
        }
        for i in range(N_GOOD)
    }
    csv = write_manifest(tmp_path, rows_meta=rows_meta)
    _, index, manifest = ingest_csv(csv, tmp_path / "ds")
    assert set(index["cancer_type"]) == {"A", "B"} and set(index["tissue_source_site"]) == {f"S{i}" for i in range(6)}
    assert set(index["sex"]) == {"male", "MALE", "female"}
    assert set(index["race"]) == {"White", "WHITE", "white", "asian"}
    assert manifest["case_variants"] == {"race": [["WHITE", "White", "white"]], "sex": [["MALE", "male"]]}
    text = format_stats(dataset_stats(tmp_path / "ds"))
    assert text.count("differ only by case") == 2
    assert "warning: sex has values that differ only by case, kept as different values: 'MALE' / 'male'" in text
