"""The bad-input suite (issue 7): every case ends in a clear error that names the file or row and says
what to do, or in a counted skip; the good tiles still ingest and an existing dataset is never touched.

Cases already covered elsewhere and not repeated here: a corrupt/unreadable tile and a slide without
metadata in the tcga-ut source, a missing required column in tcga-ut and manifest tables, an empty
input folder, a truncated shard (test_data_layer.py); corrupt tiles in the stream and a model that
lacks one of the data's sites (test_stream.py).
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import uuid
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from medi_dist.config import ConfigError, load_config
from medi_dist.data import sources
from medi_dist.data.ingest import ingest
from medi_dist.data.procedural import ProceduralConfig, render_tile
from medi_dist.data.records import SkipLog, TileRecord
from medi_dist.data.shards import INDEX, MANIFEST, VOCAB, file_sha256, verify_shards, write_dataset
from medi_dist.data.split import SplitConfig
from medi_dist.data.stream import StreamConfig, decode_tile, tile_stream
from medi_dist.metadata import ConditioningSpec, ContinuousSpec, SchemaError, UnknownValueError, Vocab
from medi_dist.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SITES = [f"S{i}" for i in range(6)]
N_GOOD = 24


# ---- helpers -------------------------------------------------------------------------------------

def _img(seed: int, size: int | tuple[int, int] = 32, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    w, h = (size, size) if isinstance(size, int) else size
    arr = render_tile("GLAND", "A1", np.random.default_rng(seed), max(w, h))[:h, :w]
    im = Image.fromarray(arr)
    im = im if mode == "RGB" else im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, depth: int, color: int, raw: bytes) -> bytes:
    """A PNG by hand: PIL writes neither 16-bit RGB nor a header that lies about its size."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw))
            + _png_chunk(b"IEND", b""))


def _png16_rgb(arr: np.ndarray) -> bytes:
    h, w, _ = arr.shape
    return _png(w, h, 16, 2, b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h)))


def _manifest(root: Path, extra=(), rows_meta: dict[int, dict] | None = None, **all_meta) -> Path:
    """A manifest CSV of N_GOOD good 32-px JPEG tiles (2 types x 6 sites) plus `extra` rows
    ({"name": file name, "data": bytes, **metadata}); rows_meta overrides metadata of given rows."""
    rows = []

    def add(name: str, data: bytes, **meta) -> None:
        p = root / "img" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        i = len(rows)
        rows.append({"path": f"img/{name}", "cancer_type": "AB"[i % 2], "tissue_source_site": SITES[i % 6],
                     "slide_id": f"slide{i // 4}", "age": 40 + i, "key": "", **all_meta,
                     **(rows_meta or {}).get(i, {}), **meta})

    for i in range(N_GOOD):
        add(f"t{i}.jpg", _img(i))
    for e in extra:
        add(**e)
    path = root / "m.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _ingest(csv: Path, out: Path, **kw) -> tuple[SkipLog, pd.DataFrame, dict]:
    skips = SkipLog()
    manifest = ingest(sources.manifest(csv, skips), out, SplitConfig(0.3, seed=0), skips, **kw)
    return skips, pd.read_parquet(out / INDEX), manifest


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): file_sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _rewrite_shard(ds: Path, change) -> Path:
    """Rewrite the dataset's first shard as change([(name, bytes), ...]) and update dataset.json to
    match, as a hand-made or foreign shard would look (so only structure checks can catch it)."""
    manifest = json.loads((ds / MANIFEST).read_text())
    entry = manifest["shards"][0]
    path = ds / entry["path"]
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # in memory only
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in change(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    entry["bytes"], entry["sha256"] = path.stat().st_size, file_sha256(path)
    (ds / MANIFEST).write_text(json.dumps(manifest))
    return path


def _cli(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "medi_dist.cli", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"})


def _one_error_line(proc: subprocess.Popen, *needles: str) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (out, err)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def good_csv(tmp_path_factory) -> Path:
    return _manifest(tmp_path_factory.mktemp("good"))


@pytest.fixture
def good_ds(tmp_path, good_csv) -> Path:
    out = tmp_path / "ds"
    _ingest(good_csv, out, shard_mb=0.02)
    return out


# ---- tiles ---------------------------------------------------------------------------------------

BAD_TILES = {
    # case: (file name, bytes, what the skip reason must say)
    "corrupt": ("bad.jpg", lambda: b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2, r"cannot decode image"),
    "truncated": ("bad.jpg", lambda: _img(99)[: len(_img(99)) // 2], r"cannot decode image .*(?i:truncated)"),
    "grayscale": ("bad.jpg", lambda: _img(99, mode="L"), r"image mode L \(need 8-bit RGB H&E\); convert it to RGB"),
    "rgba": ("bad.png", lambda: _img(99, mode="RGBA", fmt="PNG"), r"image mode RGBA .*convert it to RGB"),
    "16-bit grayscale": ("bad.png", lambda: _img(99, mode="I;16", fmt="PNG"), r"image mode I;16 .*convert it to RGB"),
    "non-square": ("bad.jpg", lambda: _img(99, size=(48, 32)), r"tile is 48x32, not square; crop it"),
    "decompression bomb": ("bad.png", lambda: _png(20000, 20000, 8, 2, b"\x00" * 64), r"DecompressionBombError"),
}


@pytest.mark.parametrize("case", list(BAD_TILES))
def test_bad_tile_is_skipped_counted_and_named(tmp_path, case):
    name, make, reason = BAD_TILES[case]
    csv = _manifest(tmp_path, [{"name": name, "data": make()}])
    skips, index, manifest = _ingest(csv, tmp_path / "ds")
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
    csv = _manifest(tmp_path, [{"name": "deep.png", "data": _png16_rgb(arr), "key": "deep16"}])
    skips, index, _ = _ingest(csv, tmp_path / "ds")
    assert len(skips) == 0 and len(index) == N_GOOD + 1
    shard = tmp_path / "ds" / index.set_index("key").at["deep16", "shard"]
    with tarfile.open(shard) as tar:
        stored = tar.extractfile("deep16.png").read()
    want = (arr >> 8).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(stored))), want)
    np.testing.assert_allclose(decode_tile(stored, 32), want.transpose(2, 0, 1) / 127.5 - 1.0, atol=1e-6)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Good tiles plus other square sizes (48 px JPEG, 64 px PNG) and ages missing in every spelling."""
    root = tmp_path_factory.mktemp("mixed")
    missing = {0: "NaN", 1: "", 2: "'--", 3: "not reported", 4: "nan", 5: "None"}
    extra = [{"name": "big48.jpg", "data": _img(100, size=48), "key": "big48"},
             {"name": "big64.png", "data": _img(101, size=64, fmt="PNG"), "key": "big64"},
             {"name": "word.jpg", "data": _img(102), "key": "word", "age": "forty"}]
    csv = _manifest(root, extra, rows_meta={i: {"age": v, "key": f"noage{i}"} for i, v in missing.items()})
    skips, index, manifest = _ingest(csv, root / "ds")
    return {"root": root, "csv": csv, "ds": root / "ds", "skips": skips, "index": index.set_index("key"),
            "missing": [f"noage{i}" for i in missing]}


def test_other_square_sizes_are_kept_and_resized_in_the_stream(ray_cluster, mixed):
    """A square tile of another size is ingested as is; the stream resizes every tile (bilinear) to the
    model resolution. Here the model also knows one more site and type than the data (listed first,
    so every index shifts): the stream must use the model's indices, and the model's age statistics."""
    data_spec = ConditioningSpec.load(mixed["ds"] / VOCAB)
    model_spec = ConditioningSpec(
        [Vocab("cancer_type", ["0-only-in-model", *data_spec.vocab("cancer_type").values]),
         Vocab("tissue_source_site", ["00", *data_spec.vocab("tissue_source_site").values])],
        [ContinuousSpec("age", 50.0, 10.0)])
    s = tile_stream(mixed["ds"], ("train", "holdout"), StreamConfig(resolution=16), spec=model_spec)
    got = {}
    for b in s.dataset.iter_batches(batch_size=64, batch_format="numpy"):
        for i, k in enumerate(b["key"]):
            got[k] = {c: b[c][i] for c in b if c != "key"}
    index = mixed["index"]
    assert set(got) == set(index.index) and s.skipped()["skipped"] == 0
    assert all(v["image"].shape == (3, 16, 16) for v in got.values())
    for key, name in (("big48", "big48.jpg"), ("big64", "big64.png")):
        np.testing.assert_allclose(got[key]["image"], decode_tile((mixed["root"] / "img" / name).read_bytes(), 16))
    for k, v in got.items():
        assert model_spec.vocab("cancer_type").decode(v["cond_cancer_type"]) == index.at[k, "cancer_type"]
        site = model_spec.vocab("tissue_source_site").decode(v["cond_tissue_source_site"])
        assert site == index.at[k, "tissue_source_site"]
        if k in mixed["missing"]:
            assert np.isnan(v["cont_age"])  # -> the model's learned null age, not a crash
        else:
            assert v["cont_age"] == pytest.approx((index.at[k, "age"] - 50.0) / 10.0)


# ---- metadata ------------------------------------------------------------------------------------

def test_missing_age_in_any_spelling_is_null_and_a_word_is_a_counted_skip(mixed):
    index = mixed["index"]
    assert index.loc[mixed["missing"], "age"].isna().all()
    assert index["age"].notna().sum() == len(index) - len(mixed["missing"])
    spec = ConditioningSpec.load(mixed["ds"] / VOCAB)
    numeric = index["age"].dropna()
    assert spec.continuous[0].mean == pytest.approx(numeric.mean())  # statistics from real numbers only
    assert "word" not in index.index
    [(origin, why)] = mixed["skips"].entries
    assert f"{mixed['csv']} row {N_GOOD + 4} (img/word.jpg)" in origin and "not a number: 'forty'" in why


def test_age_column_with_no_value_at_all_is_dropped_not_a_crash(tmp_path):
    csv = _manifest(tmp_path, age="'--")
    skips, index, manifest = _ingest(csv, tmp_path / "ds")
    assert len(index) == N_GOOD and len(skips) == 0 and index["age"].isna().all()
    assert manifest["continuous"] == [] and ConditioningSpec.load(tmp_path / "ds" / VOCAB).continuous_names == []


def test_missing_column_names_file_and_fix_and_cli_says_one_line(tmp_path, good_csv):
    with pytest.raises(SchemaError, match=rf"{re.escape(str(good_csv))}: missing required column\(s\) \['race'\]"):
        sources.manifest(good_csv, SkipLog(), categorical=["race"])
    with pytest.raises(SchemaError, match=r"missing required column\(s\) \['image'\].*Use --image-column"):
        sources.manifest(good_csv, SkipLog(), image_column="image")
    proc = _cli("ingest", "--source", "manifest", "--manifest", str(good_csv), "--out", str(tmp_path / "ds"),
                "--categorical", "race", cwd=tmp_path)
    _one_error_line(proc, "medi-dist ingest: error:", str(good_csv), "['race']")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


# ---- keys ----------------------------------------------------------------------------------------

def test_duplicate_keys_are_refused_and_the_existing_dataset_is_kept(tmp_path, good_csv):
    out = tmp_path / "ds"
    _ingest(good_csv, out)
    before = _snapshot(out)
    # 'slide.7' is sanitised to 'slide_7', colliding with the next row's key
    csv = _manifest(tmp_path / "new", [{"name": "x.jpg", "data": _img(50), "key": "slide.7"},
                                       {"name": "y.jpg", "data": _img(51), "key": "slide_7"}])
    rows = rf"{re.escape(str(csv))} row 2[67] \(img/[xy]\.jpg\)"
    with pytest.raises(SchemaError, match=rf"duplicate tile key 'slide_7' from {rows} and {rows}.*distinct keys"):
        _ingest(csv, out, overwrite=True)
    assert _snapshot(out) == before  # the existing dataset is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "new"]  # no temporary directory left


def test_dotted_keys_are_sanitised_and_unsanitised_keys_refused(tmp_path):
    """A manifest `key` with dots is sanitised (every character but letters, digits, '-' and '_'
    becomes '_'); a source that hands the writer a dotted key is refused before anything is written."""
    csv = _manifest(tmp_path, [{"name": "x.jpg", "data": _img(50), "key": "TCGA.A1.0001.tile.3"}])
    _, index, _ = _ingest(csv, tmp_path / "ds")
    assert "TCGA_A1_0001_tile_3" in set(index["key"]) and not index["key"].str.contains(r"\.").any()
    urls = [str(p) for p in verify_shards(tmp_path / "ds", checksums=True)]
    assert {s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)} == set(index["key"])
    rec = TileRecord("a.b", _img(1), "jpg", {"cancer_type": "A", "tissue_source_site": "S0"}, "src.csv row 2")
    with pytest.raises(SchemaError, match=r"tile key 'a\.b' is invalid.*no '\.'"):
        write_dataset([rec], tmp_path / "w", {"S0": "train"}, SkipLog())
    assert not (tmp_path / "w").exists()


# ---- shards --------------------------------------------------------------------------------------

def test_members_out_of_order_are_refused_naming_the_shard(ray_cluster, good_ds):
    def images_then_jsons(members):
        return sorted(members, key=lambda m: (m[0].endswith(".json"), m[0]))

    shard = _rewrite_shard(good_ds, images_then_jsons)
    verify_shards(good_ds)  # sizes match dataset.json: only the structure check can tell
    with pytest.raises(SchemaError, match=rf"shard {re.escape(str(shard))}: the members of key '.+' are not adjacent"):
        verify_shards(good_ds, checksums=True)
    proc = _cli("data", "stats", "--verify", str(good_ds), cwd=good_ds.parent)
    s = tile_stream(good_ds, ("train", "holdout"), StreamConfig(resolution=8))
    with pytest.raises(Exception, match=rf"(?s)not contiguous.*tar is {re.escape(str(shard))}"):
        s.dataset.take_all()  # Ray Data itself stops with the shard named
    _one_error_line(proc, "medi-dist data: error:", str(shard), "not adjacent")


def test_empty_shards_are_refused_by_name(good_ds):
    shard = _rewrite_shard(good_ds, lambda members: [])  # a valid tar with no tiles
    verify_shards(good_ds)
    with pytest.raises(SchemaError, match=rf"shard {re.escape(str(shard))} holds no tiles"):
        verify_shards(good_ds, checksums=True)
    shard.write_bytes(b"")  # 0 bytes, and dataset.json agrees
    manifest = json.loads((good_ds / MANIFEST).read_text())
    manifest["shards"][0].update(bytes=0, sha256=file_sha256(shard))
    (good_ds / MANIFEST).write_text(json.dumps(manifest))
    for check in (lambda: verify_shards(good_ds), lambda: tile_stream(good_ds, ("train", "holdout"))):
        with pytest.raises(SchemaError, match=rf"shard {re.escape(str(shard))} is empty \(0 bytes\)"):
            check()  # tile_stream refuses before Ray (whose own error, 'empty file', names no file)


def test_member_paths_leaving_the_folder_are_never_written(ray_cluster, good_ds, tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    tag = uuid.uuid4().hex[:8]
    evil = [f"../evil{tag}", f"../../evil{tag}", str(outside / f"abs{tag}")]
    jpg = _img(7)

    def add_evil(members):
        return members + [(f"{e}.{ext}", jpg if ext == "jpg" else b"{}") for e in evil for ext in ("jpg", "json")]

    shard = _rewrite_shard(good_ds, add_evil)
    with pytest.raises(SchemaError, match=rf"shard {re.escape(str(shard))}: member '\.\./evil{tag}\.jpg' is a path"):
        verify_shards(good_ds, checksums=True)
    monkeypatch.chdir(shard.parent)  # where a naive extractor would resolve '../'
    before = {p for p in tmp_path.rglob("*")}
    seen = {s["__key__"] for s in wds.WebDataset([str(shard)], shardshuffle=False)}
    import ray

    seen_ray = {r["__key__"] for r in ray.data.read_webdataset([str(shard)], decoder=None).take_all()}
    assert set(evil) <= seen and set(evil) <= seen_ray  # read (in memory) ...
    assert {p for p in tmp_path.rglob("*")} == before  # ... and nothing written anywhere
    assert not any(Path(f"{e}.jpg").exists() or Path(f"{e}.json").exists() for e in evil)
    assert not list(Path("/").glob(f"*evil{tag}*")) and not list(Path.cwd().parent.parent.glob(f"*evil{tag}*"))


def test_altered_tile_bytes_are_never_loaded(ray_cluster, good_ds):
    """A bit flip that keeps the shard's size and the JPEG decodable: `--verify` names the shard, and
    the stream skips and counts the tile (its sha256 rides in its json) instead of training on it."""
    state = {}

    def flip_quant_table(members):
        out = []
        for name, data in members:
            if name.endswith(".jpg") and not state:
                i = data.index(b"\xff\xdb") + 5 + 10  # DQT marker, length, table id, then the table
                data = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]
                state["key"] = name.split(".")[0]
                Image.open(io.BytesIO(data)).load()  # still a valid JPEG
            out.append((name, data))
        return out

    manifest = json.loads((good_ds / MANIFEST).read_text())
    shard = _rewrite_shard(good_ds, flip_quant_table)
    (good_ds / MANIFEST).write_text(json.dumps(manifest))  # dataset.json as ingest wrote it
    assert shard.stat().st_size == manifest["shards"][0]["bytes"]
    verify_shards(good_ds)
    with pytest.raises(SchemaError, match=rf"shard {re.escape(str(shard))} fails its sha256 check"):
        verify_shards(good_ds, checksums=True)
    s = tile_stream(good_ds, ("train", "holdout"), StreamConfig(resolution=8, max_bad_fraction=0.5))
    keys = {k for b in s.dataset.iter_batches(batch_format="numpy") for k in b["key"]}
    assert state["key"] not in keys and len(keys) == N_GOOD - 1
    [bad] = s.skipped()["bad"]
    assert bad["key"] == state["key"] and f"{shard.parent.name}/{shard.name}" in bad["shard"]
    assert "sha256" in bad["error"]


def test_interrupted_ingest_leaves_nothing_that_looks_complete(tmp_path, good_csv):
    out = tmp_path / "ds"
    scan = sources.manifest(good_csv, SkipLog())
    records = scan.records

    def dies_midway():
        for i, rec in enumerate(records()):
            if i == 20:
                raise KeyboardInterrupt  # a killed job
            yield rec

    scan.records = dies_midway
    with pytest.raises(KeyboardInterrupt):
        ingest(scan, out, SplitConfig(0.3), shard_mb=0.01, shuffle_buffer=4)
    assert list(tmp_path.iterdir()) == []


# ---- conditions ----------------------------------------------------------------------------------

def test_unknown_site_at_generation_lists_the_models_sites(tmp_path):
    import torch

    from medi_dist.model import ConditionedUNet, ModelConfig, encode_conditions, load_model_dir, save_model_dir

    spec = ConditioningSpec([Vocab("cancer_type", ["A", "B"]), Vocab("tissue_source_site", SITES)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        save_model_dir(tmp_path / "model", ConditionedUNet(ModelConfig.from_preset("tiny"), spec))
        _, _, model_spec = load_model_dir(tmp_path / "model")  # generation reads the vocabularies from here
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(UnknownValueError, match=r"unknown tissue_source_site 'S9'; valid values \(6\): S0, S1, .*, S5"):
        encode_conditions(model_spec, [{"cancer_type": "A", "tissue_source_site": "S0"},
                                       {"cancer_type": "B", "tissue_source_site": "S9"}])
    # a site of the model's vocabulary (whitespace trimmed) maps to the model's index, not a rebuilt one
    cond = encode_conditions(model_spec, [{"cancer_type": "B", "tissue_source_site": " S4 "}])
    assert cond["cond_tissue_source_site"].tolist() == [4] and cond["cond_cancer_type"].tolist() == [1]


def test_model_condition_column_missing_from_data(mixed):
    spec = ConditioningSpec.load(mixed["ds"] / VOCAB)
    model_spec = ConditioningSpec(spec.categorical + [Vocab("race", ["asian", "white"])], spec.continuous)
    with pytest.raises(SchemaError, match=rf"dataset {re.escape(str(mixed['ds']))} has no column 'race'"):
        tile_stream(mixed["ds"], ("train",), spec=model_spec)


# ---- config --------------------------------------------------------------------------------------

def test_bad_configs_give_one_clear_line(tmp_path):
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("steps: 10\nrun:\n  name: [a, b\n")
    negative = tmp_path / "negative.yaml"
    negative.write_text("steps: -1\n")
    # the CLI runs start first: each imports torch and Ray (slow on a busy machine), so they overlap
    procs = [_cli("train", "--config", str(f), cwd=tmp_path) for f in (malformed, negative)]
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(malformed))} is not valid YAML: .*line 4"):
        load_config(TrainConfig, malformed)
    with pytest.raises(ValueError, match=rf"{re.escape(str(negative))}: steps must be positive, got -1"):
        load_config(TrainConfig, negative)
    for over, msg in ((["steps=-1"], "steps must be positive"), (["run.num_workers=0"], "num_workers"),
                      (["steps=[1]"], r"config\.steps: expected int, got \[1\]"),
                      (["run=3"], "run: expected a mapping"), (["stepz=3"], r"unknown field\(s\) \['stepz'\]"),
                      (["steps=[1,"], "override 'steps=\\[1,': the value is not valid YAML")):
        with pytest.raises(ConfigError, match=msg):
            load_config(TrainConfig, None, over)
    _one_error_line(procs[0], "medi-dist train: error: config file", str(malformed), "line 4")
    _one_error_line(procs[1], "medi-dist train: error:", str(negative), "steps must be positive, got -1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["malformed.yaml", "negative.yaml"]  # no run started


# ---- a full disk ---------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root can mount one); None where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        yield None
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if r.returncode != 0:
        yield None
        return
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


FILL_DISK = """
import json, sys
from medi_dist.data import sources
from medi_dist.data.ingest import ingest
from medi_dist.data.procedural import ProceduralConfig
from medi_dist.data.split import SplitConfig
try:
    ingest(sources.procedural(ProceduralConfig(n_types=2, n_sites=6, n_tiles=int(sys.argv[2]), size=32, seed=1)),
           sys.argv[1], SplitConfig(0.3), shard_mb=float(sys.argv[3]), shuffle_buffer=16, overwrite=True)
except OSError as e:
    print(json.dumps({"errno": e.errno, "message": str(e)}))
"""


def _fill(out: Path, tiles: int, shard_mb: float, fsize_limit: int | None = None) -> dict:
    """Ingest `tiles` procedural tiles into `out`; in a subprocess with a file-size limit when given."""
    if fsize_limit is None:
        try:
            ingest(sources.procedural(ProceduralConfig(n_types=2, n_sites=6, n_tiles=tiles, size=32, seed=1)), out,
                   SplitConfig(0.3), shard_mb=shard_mb, shuffle_buffer=16, overwrite=True)
        except OSError as e:
            return {"errno": e.errno, "message": str(e)}
        return {}
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))  # Python ignores SIGXFSZ

    r = subprocess.run([sys.executable, "-c", FILL_DISK, str(out), str(tiles), str(shard_mb)], capture_output=True,
                       text=True, preexec_fn=limit, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else {"stderr": r.stderr}


def test_full_disk_while_writing_shards(small_disk, tmp_path):
    """ENOSPC on a 1 MiB tmpfs (or, where mounting is not allowed, EFBIG under RLIMIT_FSIZE): a clear
    error naming the dataset, no half-written shard or dataset directory, the old dataset untouched."""
    disk = small_disk or tmp_path / "disk"
    limit = None if small_disk else 256 << 10
    want = errno.ENOSPC if small_disk else errno.EFBIG
    out = disk / "ds"
    assert _fill(out, 60, 0.05) == {}  # an existing, complete dataset (~0.2 MiB)
    before = _snapshot(out)
    got = _fill(out, 1500, 0.1 if small_disk else 1.0, limit)  # ~4 MiB of shards: does not fit
    assert got.get("errno") == want, got
    assert got["message"].startswith(f"[Errno {want}] {os.strerror(want)} while writing dataset {out}")
    assert f"the existing {out} is untouched" in got["message"]
    assert "Free space or choose another --out" in got["message"]
    assert _snapshot(out) == before and verify_shards(out, checksums=True)
    assert sorted(p.name for p in disk.iterdir()) == ["ds"]  # no temporary dataset or shard left
    got = _fill(disk / "fresh", 1500, 0.1 if small_disk else 1.0, limit)
    assert got.get("errno") == want and f"{disk / 'fresh'} was not created" in got["message"]
    assert sorted(p.name for p in disk.iterdir()) == ["ds"]
