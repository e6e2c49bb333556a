"""`medi-dist ingest` from the command line: which source it reads, when it stops, and what it prints.
Small generated manifests (bad_inputs.write_manifest); the WSI source's CLI run is in test_wsi.py."""

from __future__ import annotations

import json
import os
import re

import pandas as pd
import pytest

from bad_inputs import N_GOOD, good_csv, ingest_csv, one_error_line, run_cli, snapshot, tile_bytes, write_manifest  # noqa: F401
from medi_dist import cli
from medi_dist.data.shards import INDEX, MANIFEST
from medi_dist.metadata import SchemaError


def _main(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


# ---- which source ----------------------------------------------------------------------------------


def test_source_follows_the_input_flag(tmp_path, capsys, good_csv):
    """--manifest without --source reads the manifest (it used to ingest the built-in dataset)."""
    rc, out, err = _main(capsys, "ingest", "--manifest", str(good_csv), "--out", str(tmp_path / "ds"))
    assert rc == 0, err
    manifest = json.loads((tmp_path / "ds" / MANIFEST).read_text())
    assert manifest["source"] == f"manifest:{good_csv}" and manifest["tiles"] == N_GOOD


@pytest.mark.parametrize(
    "args, needles",
    [
        (
            ["--source", "procedural", "--manifest", "m.csv"],
            ["--source procedural does not read --manifest", "an input of --source manifest"],
        ),
        (["--source", "manifest", "--manifest", "m.csv", "--slides", "s.csv"], ["does not read --slides"]),
        (["--manifest", "m.csv", "--root", "r", "--metadata", "g.csv"], ["inputs of different sources"]),
    ],
)
def test_conflicting_source_flags_are_one_line_errors(tmp_path, capsys, args, needles):
    rc, out, err = _main(capsys, "ingest", *args, "--out", str(tmp_path / "ds"))
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert all(n in err for n in needles), err
    assert not (tmp_path / "ds").exists()


# ---- too much skipped --------------------------------------------------------------------------------


def _mostly_missing(root, n_missing: int = 19, n_bad: int = 2):
    """A manifest whose first n_missing files are gone and n_bad more are not images."""
    csv = write_manifest(root, [{"name": f"bad{i}.jpg", "data": b"not a jpeg"} for i in range(n_bad)])
    for i in range(n_missing):
        (root / "img" / f"t{i}.jpg").unlink()
    return csv


def test_ingest_stops_when_too_much_is_skipped_and_writes_nothing(tmp_path):
    csv = _mostly_missing(tmp_path)
    proc = run_cli("ingest", "--manifest", str(csv), "--out", str(tmp_path / "ds"), cwd=tmp_path)
    line = one_error_line(
        proc,
        "medi-dist ingest: error:",
        "81% of the inputs were skipped (21 of 26)",
        "--max-skipped-fraction 0.2",
        "nothing was written",
        f"file not found (19, e.g. {csv} row 2 (img/t0.jpg))",
        f"cannot decode image; re-export or remove it (2, e.g. {csv} row 26 (img/bad0.jpg))",
        "pass --max-skipped-fraction 0.81 to ingest the rest",
    )
    assert line.index("file not found") < line.index("cannot decode")  # most common first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img", "m.csv"]  # no output, no temporary folder


def test_existing_dataset_is_untouched_and_override_ingests_the_rest(tmp_path, good_csv):
    out = tmp_path / "ds"
    ingest_csv(good_csv, out)
    before = snapshot(out)
    csv = _mostly_missing(tmp_path / "new")
    with pytest.raises(SchemaError, match=r"81% of the inputs were skipped"):
        ingest_csv(csv, out, overwrite=True)
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ds", "new"]
    skips, index, _ = ingest_csv(csv, out, overwrite=True, max_skipped_fraction=0.81)
    assert len(index) == N_GOOD - 19 and len(skips) == 21


def test_a_few_bad_tiles_still_ingest(tmp_path, capsys):
    """Below the threshold (here 1 of 25) nothing changes: the bad tile is skipped and listed."""
    csv = _mostly_missing(tmp_path, n_missing=0, n_bad=1)
    rc, out, err = _main(capsys, "ingest", "--manifest", str(csv), "--out", str(tmp_path / "ds"))
    assert rc == 0, err
    assert len(pd.read_parquet(tmp_path / "ds" / INDEX)) == N_GOOD


# ---- paths relative to the manifest ----------------------------------------------------------------


def test_paths_relative_to_the_working_directory_are_named_as_such(tmp_path):
    """The manifest sits in meta/ but its paths were written relative to the working directory: every
    tile is skipped, and the error says why instead of a bare 'file not found'."""
    csv = write_manifest(tmp_path)
    (tmp_path / "meta").mkdir()
    moved = tmp_path / "meta" / "m.csv"
    csv.rename(moved)
    proc = run_cli("ingest", "--manifest", "meta/m.csv", "--out", "ds", cwd=tmp_path)
    one_error_line(
        proc,
        "every input was skipped; nothing was written",
        "path relative to the current directory, not to the table's folder (24, e.g. meta/m.csv row 2 (img/t0.jpg))",
    )
    assert not (tmp_path / "ds").exists()
    help_text = run_cli("ingest", "--help", cwd=tmp_path).communicate(timeout=120)[0]
    assert "A relative path is read from the manifest's" in help_text


def test_reason_names_both_folders(tmp_path, monkeypatch):
    from medi_dist.data import sources
    from medi_dist.data.records import SkipLog

    write_manifest(tmp_path)
    (tmp_path / "meta").mkdir()
    (tmp_path / "m.csv").rename(tmp_path / "meta" / "m.csv")
    monkeypatch.chdir(tmp_path)
    skips = SkipLog()
    assert list(sources.manifest("meta/m.csv", skips).records()) == []
    origin, why = skips.entries[0]
    assert why == (
        "not found relative to the table's folder (meta/img/t0.jpg), but img/t0.jpg exists relative to "
        "the current directory; paths in m.csv are read relative to its folder: make them relative to "
        "meta or absolute"
    )


# ---- duplicate keys ----------------------------------------------------------------------------------


def test_duplicate_key_message_says_to_add_slide_id(tmp_path, capsys):
    """Per-slide folders each holding 0_0.png and no slide_id column: the keys collide; the error says
    which column to add, and --help documents the optional columns."""
    rows = []
    for s in range(2):
        p = tmp_path / f"slide{s}" / "0_0.png"
        p.parent.mkdir()
        p.write_bytes(tile_bytes(s, fmt="PNG"))
        rows.append({"path": f"slide{s}/0_0.png", "cancer_type": "A", "tissue_source_site": f"S{s}"})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    rc, out, err = _main(capsys, "ingest", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "ds"))
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(r"duplicate tile key '0_0-0_0' .*add a slide_id column.*or a key column", err), err
    with pytest.raises(SystemExit):
        cli.main(["ingest", "--help"])
    help_text = capsys.readouterr().out
    for col in ("key ", "slide_id", "sex, race", "age", "'>89'"):
        assert col in help_text, col


# ---- what it prints ------------------------------------------------------------------------------------


def test_each_skipped_file_is_printed_once_and_verify_says_ok(tmp_path):
    csv = _mostly_missing(tmp_path, n_missing=1, n_bad=1)
    proc = run_cli("ingest", "--manifest", str(csv), "--out", "ds", cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    lines = (out + err).splitlines()
    for name in ("img/t0.jpg", "img/bad0.jpg"):
        assert sum(name in ln for ln in lines) == 1, out + err  # not as a warning, a summary and again
    assert "2 input(s) skipped" in out and "1 x file not found" in out and "1 x cannot decode image" in out
    assert len(json.loads((tmp_path / "ds" / MANIFEST).read_text())["skipped"]) == 2
    proc = run_cli("data", "stats", "ds", "--verify", cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    shards = json.loads((tmp_path / "ds" / MANIFEST).read_text())["shards"]
    assert f"verified {len(shards)} shards ({N_GOOD - 1} tiles): sha256 and member order OK" in out
    assert os.path.isdir(tmp_path / "ds")
