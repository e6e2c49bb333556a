"""`medi-dist demo --out s3://…` (and gs://): the demo runs in a local staging folder and its output is
uploaded to the bucket at the end, results.json last (medi_dist/demo_storage.py). The demo itself
is replaced by a stand-in that writes a demo-shaped folder: a real demo takes minutes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import medi_dist.demo
import medi_dist.demo_report
from medi_dist import cli
from medi_dist.demo_storage import staging_dir
from medi_dist.storage import Folder
from objstore import one_line_error as _one_line


def _fake_demo(calls: list, tag: str):
    def run_demo(cfg):
        root = Path(cfg.out)
        calls.append(root)
        for rel, text in {
            "demo.json": "{}",
            "data/dataset.json": "{}",
            "data/shards/train-000000.tar": tag,
            f"runs/demo-medi/model/{tag}.safetensors": tag,
            "cache/features.npy": "local only",
            "real_vs_generated.png": tag,
        }.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        summary = {"tag": tag}
        (root / "results.json").write_text(json.dumps(summary))
        (root / "results.txt").write_text(tag)
        return summary

    return run_demo


@pytest.fixture(params=["s3", "gs"])
def store(request):
    return request.getfixturevalue("object_store" if request.param == "s3" else "gcs")


def test_demo_out_uri_uploads_the_output_markers_last(store, monkeypatch, capsys):
    uri = store.uri("demo", "run")
    calls: list[Path] = []
    monkeypatch.setattr(medi_dist.demo, "run_demo", _fake_demo(calls, "first"))
    monkeypatch.setattr(medi_dist.demo_report, "format_summary", lambda s: f"summary {s['tag']}")
    order: list[str] = []
    write = Folder.write_bytes
    monkeypatch.setattr(Folder, "write_bytes", lambda self, rel, data: (order.append(rel), write(self, rel, data)))
    assert cli.main(["demo", "--quick", "--out", uri]) == 0
    out = capsys.readouterr().out
    assert calls == [staging_dir(uri)] and calls[0].is_dir()  # the demo ran in the local staging folder
    assert "summary first" in out and f"uploaded to {uri}" in out
    files = Folder(uri).files()
    assert sorted(files) == sorted(
        [
            "demo.json",
            "data/dataset.json",
            "data/shards/train-000000.tar",
            "runs/demo-medi/model/first.safetensors",
            "real_vs_generated.png",
            "results.json",
            "results.txt",
        ]
    )  # the feature cache stays local
    assert order[-2:] == ["results.txt", "results.json"] and len(order) == len(files)
    assert json.loads(Folder(uri).read_bytes("results.json")) == {"tag": "first"}

    # A second run on another machine (no staging folder; another model file) cut short while
    # uploading: the earlier results.json is gone before anything is replaced, and the earlier run's
    # files it did not write are removed, so the bucket never reads as a finished demo.
    shutil.rmtree(calls[0])
    monkeypatch.setattr(medi_dist.demo, "run_demo", _fake_demo(calls, "second"))

    def fail_on_model(self, rel, data):
        if rel.endswith("second.safetensors"):
            raise OSError(f"{self.uri_of(rel)}: connection lost")
        write(self, rel, data)

    monkeypatch.setattr(Folder, "write_bytes", fail_on_model)
    assert "connection lost" in _one_line(capsys, "demo", "--quick", "--out", uri)
    left = Folder(uri).files()
    assert "results.json" not in left and "results.txt" not in left
    assert "runs/demo-medi/model/first.safetensors" not in left and "demo.json" in left
    monkeypatch.setattr(Folder, "write_bytes", write)
    assert cli.main(["demo", "--quick", "--out", uri]) == 0
    assert calls[-1] == calls[0]  # the same staging folder: the re-run continues there
    files = Folder(uri).files()
    assert "runs/demo-medi/model/second.safetensors" in files and "runs/demo-medi/model/first.safetensors" not in files
    assert json.loads(Folder(uri).read_bytes("results.json")) == {"tag": "second"}


def test_demo_out_uri_refuses_what_is_not_a_demo_output(store, monkeypatch, capsys):
    calls: list[Path] = []
    monkeypatch.setattr(medi_dist.demo, "run_demo", _fake_demo(calls, "x"))
    ds = store.uri("demo", "a-dataset")
    Folder(ds).write_bytes("dataset.json", b"{}")
    assert f"--out {ds} is a dataset directory, not a demo output" in _one_line(capsys, "demo", "--out", ds)
    other = store.uri("demo", "other")
    Folder(other).write_bytes("notes.txt", b"mine")
    err = _one_line(capsys, "demo", "--out", other)
    assert f"--out {other} holds files that are not the demo's (notes.txt)" in err
    err = _one_line(capsys, "demo", "--out", f"{store.scheme}://no-such-bucket/demo")
    assert "bucket 'no-such-bucket' does not exist" in err
    assert calls == [] and Folder(other).files().keys() == {"notes.txt"}


@pytest.mark.parametrize("prefix", ["file://", ""])
def test_demo_out_local_and_file_uri_run_in_place(prefix, tmp_path, monkeypatch, capsys):
    calls: list[Path] = []
    monkeypatch.setattr(medi_dist.demo, "run_demo", _fake_demo(calls, "x"))
    monkeypatch.setattr(medi_dist.demo_report, "format_summary", lambda s: "summary")
    assert cli.main(["demo", "--out", f"{prefix}{tmp_path}/d"]) == 0
    assert calls == [tmp_path / "d"] and "uploaded" not in capsys.readouterr().out
