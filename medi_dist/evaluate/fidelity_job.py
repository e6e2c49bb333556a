"""The fidelity stage: real vs synthetic dataset directories -> Fréchet distances and conditional
accuracy, written to a JSON file and an MLflow run.

Both sides are read from their shards (checked against dataset.json) and brought to one resolution
with the same resize the training stream uses (real tiles are resized to the synthetic tiles' size:
the model learned resized tiles, so comparing against full-size ones would measure the resize), then
go through the same encoder call. Conditional accuracy: probes trained on real tiles predict type
and site of every synthetic tile, reported for seen and unseen (type, site) pairs, next to chance and
to the probes' accuracy on held-out real tiles (the ceiling a perfect generator would reach).

Site and type are confounded in real data (each site belongs to one type), so probes on full
features can read type from stain and site from morphology; at an unseen pair they then penalise a
tile that shows both correctly. Two disentangled probes are reported too: type from grayscale
features (`type_accuracy_morphology`) and site from stain statistics (`site_accuracy_stain`).
"""

from __future__ import annotations

import io
import json
import math
import tarfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..data.shards import INDEX, load_manifest, local_dataset, verify_shards
from ..metadata import MIN_TILE_PX, UNKNOWN
from ..storage import Folder, is_remote
from .classifiers import LinearProbe
from .encoders import get_encoder
from .fidelity import conditional_accuracy, fidelity_report, frechet_distance
from .tile_reader import foreign_values, read_index

TYPE, SITE = "cancer_type", "tissue_source_site"
# reported accuracy -> (label column, feature set the probe is trained on)
PROBES = {
    "type_accuracy": (TYPE, "features"),
    "site_accuracy": (SITE, "features"),
    "type_accuracy_morphology": (TYPE, "morphology"),
    "site_accuracy_stain": (SITE, "stain"),
}


@dataclass
class FidelityConfig:
    real: str
    synthetic: str
    encoder: str = "random-conv"  # a get_encoder spec (evaluate/encoders.py)
    out: str | None = None  # results JSON (default: <synthetic>/fidelity.json)
    real_splits: list[str] = field(default_factory=lambda: ["train"])  # what the model learned from
    resolution: int | None = None  # None: the synthetic tiles' size
    min_per_group: int = 10  # subgroups with fewer tiles on either side are listed as skipped
    conditional: bool = True  # also fit the type/site probes (conditional accuracy)
    device: str = "cpu"
    seed: int = 0
    tracking_uri: str | None = None
    experiment: str = "medi-dist"
    run_name: str | None = None  # default: fidelity-<synthetic dir name>
    run_key: str | None = None  # the run to log into again (default: the run name); the demo: one per demo run
    log_mlflow: bool = True

    def __post_init__(self) -> None:
        if self.resolution is not None and self.resolution < MIN_TILE_PX:
            raise ValueError(
                f"--resolution must be at least {MIN_TILE_PX} px (leave it out to compare at the "
                f"synthetic tiles' size), got {self.resolution}"
            )


GENERATION_KEYS = ("model_id", "sampler", "steps", "guidance", "weights", "generation")  # of generation.json


def read_tiles(root: str | Path, splits: list[str] | None, resolution: int | None, limit: int | None = None):
    """(uint8 tiles (N, R, R, 3), index rows) for the tiles of `splits` (None: all), shard by shard;
    `limit`: only the first tiles of the index (e.g. one, to learn the tile size)."""
    root = local_dataset(root)  # object storage: a verified local copy
    load_manifest(root)
    index = pd.read_parquet(root / INDEX)
    if splits is not None:
        index = index[index["split"].isin(splits)]
    if index.empty:
        raise ValueError(f"{root} has no tiles in split(s) {splits}")
    index = index.iloc[:limit]
    wanted = set(index["key"])
    images: dict[str, np.ndarray] = {}
    for path in verify_shards(root, sorted(index["split"].unique())):
        if len(images) == len(wanted):
            break
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.rpartition(".")
                if ext in ("png", "jpg") and key in wanted:
                    with Image.open(io.BytesIO(tar.extractfile(m).read())) as im:
                        im = im.convert("RGB")
                        resolution = resolution or im.size[0]
                        if im.size != (resolution, resolution):
                            im = im.resize((resolution, resolution), Image.BILINEAR)  # as data.stream.decode_tile
                        images[key] = np.asarray(im, dtype=np.uint8)
    missing = wanted - set(images)
    if missing:
        raise ValueError(f"{root}: {len(missing)} indexed tiles are not in the shards, e.g. {sorted(missing)[:3]}")
    index = index.reset_index(drop=True)
    return np.stack([images[k] for k in index["key"]]), index


def tile_size(dataset: str | Path) -> int:
    """The stored size of a dataset's tiles (its first train tile)."""
    return int(read_tiles(dataset, ["train"], None, limit=1)[0].shape[1])


def scanner_lines(dataset: str | Path) -> bool:
    """Whether the procedural world of `dataset` has its sites' scanner line patterns."""
    return bool((load_manifest(dataset).get("renderer") or {}).get("scanner_lines", False))


def real_reference(feats: dict, index: pd.DataFrame, seed: int) -> dict:
    """Probe accuracy on held-out real tiles: what real tiles score. Half the slides of every site are
    held out (a site wholly held out would be a class the probe never saw, scoring 0); a site with
    one slide, or an unlucky draw, splits its tiles instead."""
    hashed = lambda values: np.array([zlib.crc32(f"{seed}:{v}".encode()) % 2 == 1 for v in values])  # noqa: E731
    held = np.zeros(len(index), bool)
    for rows in index.groupby(SITE).indices.values():
        h = hashed(index["slide_id"].astype(str).to_numpy()[rows])
        if h.all() or not h.any():
            h = hashed(index["key"].astype(str).to_numpy()[rows])
        held[rows] = h
    if held.all() or not held.any():
        return {}
    out = {}
    for name, (col, kind) in PROBES.items():
        y = index[col].astype(str).to_numpy()
        f = feats[kind]
        out[name] = float(np.mean(LinearProbe(seed=seed).fit(f[~held], y[~held]).predict(f[held]) == y[held]))
    return out


def grayscale(images: np.ndarray) -> np.ndarray:
    """Luminance replicated to 3 channels: morphology without stain colour."""
    y = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat(np.clip(y + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def stain_features(images: np.ndarray) -> np.ndarray:
    """Per-channel optical-density mean, spread and quantiles: stain colour without morphology."""
    od = -np.log((images.reshape(len(images), -1, 3).astype(np.float64) + 1) / 256)
    q = np.quantile(od, [0.1, 0.5, 0.9], axis=1).transpose(1, 0, 2).reshape(len(images), -1)
    return np.concatenate([od.mean(1), od.std(1), q], axis=1)


def _seen(synth: pd.DataFrame, real: pd.DataFrame) -> np.ndarray:
    if "seen" in synth:  # recorded at generation against the model's training pairs
        return synth["seen"].astype(bool).to_numpy()
    pairs = set(zip(real.loc[real["split"] == "train", TYPE], real.loc[real["split"] == "train", SITE]))
    return np.array([p in pairs for p in zip(synth[TYPE], synth[SITE])])


class CalibratedProbes:
    """Procedural data only: type and stain probes trained on ground-truth renderings of *every*
    (type, site) pair, so neither can read one through the other (on real tiles each site belongs to
    one type). `ceiling` is their accuracy on fresh renderings. Leakage: the share of unseen-pair
    tiles whose predicted type is the one that owns the requested site. Fit once, score many pools
    (a learning curve scores one per checkpoint)."""

    def __init__(self, enc, real: str | Path, r_idx: pd.DataFrame, seed: int, resolution: int, sites=(), per_pair=24):
        from ..data.procedural import render_tiles

        self.enc, self.per_pair = enc, per_pair
        types = sorted(r_idx[TYPE].astype(str).unique())
        sites = sorted(set(r_idx[SITE].astype(str)) | set(sites) - {UNKNOWN})
        self.owner = r_idx.groupby(SITE)[TYPE].agg(lambda v: v.astype(str).value_counts().index[0]).to_dict()
        native, lines = tile_size(real), scanner_lines(real)

        def render(tag: int, n: int):
            pairs = [(t, s) for t in types for s in sites for _ in range(n)]
            img = render_tiles(
                pairs,
                [[seed, tag, zlib.crc32(f"{t}/{s}".encode()), i] for i, (t, s) in enumerate(pairs)],
                native,
                lines,
            )
            if native != resolution:  # as real tiles reach the model: stored at full size, resized by the stream
                img = np.stack(
                    [np.asarray(Image.fromarray(x).resize((resolution, resolution), Image.BILINEAR)) for x in img]
                )
            return img, np.array([t for t, _ in pairs]), np.array([s for _, s in pairs])

        fit_img, fit_t, fit_s = render(1, per_pair)
        self.type_probe = LinearProbe(seed=seed).fit(enc.encode(fit_img), fit_t)
        self.stain_probe = LinearProbe(seed=seed).fit(stain_features(fit_img), fit_s)
        trained = set(zip(r_idx[TYPE].astype(str), r_idx[SITE].astype(str)))
        gt_img, gt_t, gt_s = render(2, max(per_pair // 2, 4))
        self.ceiling = self.score(gt_img, gt_t, gt_s, np.array([p in trained for p in zip(gt_t, gt_s)]))

    def score(self, img: np.ndarray, want_t: np.ndarray, want_s: np.ndarray, seen: np.ndarray) -> dict:
        pt = self.type_probe.predict(self.enc.encode(img))
        ps = self.stain_probe.predict(stain_features(img))
        has_site = want_s != UNKNOWN
        out = {}
        for part, mask in (("seen", seen), ("unseen", ~seen)):
            site_mask = mask & has_site
            out[part] = {
                "n": int(mask.sum()),
                "type_accuracy": _rate(pt == want_t, mask),
                "stain_accuracy": _rate(ps == want_s, site_mask),
                "joint_accuracy": _rate((pt == want_t) & (ps == want_s), site_mask),
            }
        leak = ~seen & has_site
        out["unseen"]["leakage"] = _rate(pt == np.array([self.owner.get(s, "") for s in want_s]), leak)
        return out


def calibrated_probes(
    enc, s_img: np.ndarray, s_idx: pd.DataFrame, real: str | Path, r_idx: pd.DataFrame, seed: int, per_pair: int = 24
) -> dict:
    """The calibrated probes (CalibratedProbes) fit for one synthetic pool and scored on it."""
    probes = CalibratedProbes(enc, real, r_idx, seed, s_img.shape[1], s_idx[SITE].astype(str), per_pair)
    st, ss = s_idx[TYPE].astype(str).to_numpy(), s_idx[SITE].astype(str).to_numpy()
    return {
        "probes": "trained on ground-truth renderings of every (type, site) pair",
        "per_pair": per_pair,
        "synthetic": probes.score(s_img, st, ss, _seen(s_idx, r_idx)),
        "ceiling": probes.ceiling,
    }


def _rate(hit: np.ndarray, mask: np.ndarray) -> float:
    return float(hit[mask].mean()) if mask.any() else math.nan


def _finite(d: dict) -> dict:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def evaluate_fidelity(cfg: FidelityConfig) -> dict:
    from ..ray_setup import check_job_paths

    check_job_paths(
        {"--real": cfg.real, "--synthetic": cfg.synthetic, "--out": cfg.out},
        {"--tracking-uri": cfg.tracking_uri} if cfg.log_mlflow else None,
    )
    enc = get_encoder(cfg.encoder, device=cfg.device)  # built first: a bad spec or device fails before any reading
    foreign = foreign_values(read_index(cfg.real), read_index(cfg.synthetic))  # before any pixel
    if foreign:
        raise ValueError(
            f"{cfg.synthetic} has values that {cfg.real} never has: "
            + "; ".join(f"{c} {v}" for c, v in foreign.items())
            + " (generated by a model of another dataset?); compare it with the dataset its model was "
            "trained on"
        )
    if not cfg.log_mlflow:
        return _evaluate(cfg, enc)
    from ..tracking import ended_as

    with ended_as(_open_run(cfg)) as logger:  # FAILED (KILLED on Ctrl-C) if the evaluation does not finish
        result = _evaluate(cfg, enc)
        _log_results(logger, result)
    result["mlflow_run_id"] = logger.run_id
    return result


def _evaluate(cfg: FidelityConfig, enc) -> dict:
    """The evaluation itself: read both datasets, encode, score; writes the results JSON."""
    s_img, s_idx = read_tiles(cfg.synthetic, None, cfg.resolution)
    res = int(s_img.shape[1])
    r_img, r_idx = read_tiles(cfg.real, cfg.real_splits, res)
    # Type and site are confounded in real tiles (each site belongs to one type), so a probe on full
    # features may read type from stain or site from morphology and misjudge a tile at an unseen pair
    # that shows both correctly. So besides them: type from grayscale features, site from stain stats.
    r_f, s_f = {"features": enc.encode(r_img)}, {"features": enc.encode(s_img)}
    if cfg.conditional:
        r_f.update(morphology=enc.encode(grayscale(r_img)), stain=stain_features(r_img))
        s_f.update(morphology=enc.encode(grayscale(s_img)), stain=stain_features(s_img))
    groups = lambda ix: list(zip(ix[TYPE].astype(str), ix[SITE].astype(str)))  # noqa: E731
    fd = fidelity_report(r_f["features"], groups(r_idx), s_f["features"], groups(s_idx), cfg.min_per_group)
    seen = _seen(s_idx, r_idx)
    labels = [ix[c].astype(str) for ix in (r_idx, s_idx) for c in (TYPE, SITE)]
    acc = (
        {
            kind: conditional_accuracy(
                r_f[kind], labels[0], labels[1], s_f[kind], labels[2], labels[3], seen=seen, seed=cfg.seed
            )
            for kind in r_f
        }
        if cfg.conditional
        else {}
    )
    cond = acc.get("features", {})
    for part in cond:
        cond[part]["type_accuracy_morphology"] = acc["morphology"][part]["type_accuracy"]
        cond[part]["site_accuracy_stain"] = acc["stain"][part]["site_accuracy"]
        mask = {"all": np.ones_like(seen), "seen": seen, "unseen": ~seen}[part]
        if (s_idx[SITE] == UNKNOWN).all():  # class-only model: no site was asked for
            cond[part].update(site_accuracy=math.nan, site_accuracy_stain=math.nan, joint_accuracy=math.nan)
        cond[part]["fd_vs_real"] = (
            frechet_distance(r_f["features"], s_f["features"][mask]) if mask.sum() > 1 else math.nan
        )
    gen = load_manifest(cfg.synthetic).get("generation", {})
    result = {
        "real": str(cfg.real),
        "synthetic": str(cfg.synthetic),
        "encoder": getattr(enc, "name", cfg.encoder),
        "resolution": res,
        "real_splits": cfg.real_splits,
        "generation": {k: gen.get(k) for k in GENERATION_KEYS},
        "fd": {
            "overall": fd["overall"],
            "mean_group_fd": fd["mean_group_fd"],
            "n_real": fd["n_real"],
            "n_synth": fd["n_synth"],
            "groups": {"/".join(g): v for g, v in fd["groups"].items()},
            "skipped": {"/".join(g): v for g, v in fd["skipped"].items()},
        },
        "conditional_accuracy": cond,
        "chance": {name: 1 / r_idx[col].nunique() for name, (col, _) in PROBES.items()},
        "real_reference": real_reference(r_f, r_idx, cfg.seed) if cfg.conditional else {},
        # Probes fit on real tiles read stain through type and back (site and type are confounded).
        "confounded": [
            "conditional_accuracy.site_accuracy",
            "conditional_accuracy.site_accuracy_stain",
            "conditional_accuracy.type_accuracy",
        ],
        "calibrated": (
            calibrated_probes(enc, s_img, s_idx, cfg.real, r_idx, cfg.seed)
            if cfg.conditional and load_manifest(cfg.real).get("source") == "procedural"
            else None
        ),
    }
    out = cfg.out or f"{str(cfg.synthetic).rstrip('/')}/fidelity.json"
    if is_remote(out):
        Folder(out.rsplit("/", 1)[0]).write_bytes(
            out.rsplit("/", 1)[1], json.dumps(result, indent=2, default=str).encode()
        )
    else:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
    return result


def _open_run(cfg: FidelityConfig):
    """The evaluation's MLflow run, opened (or, for a re-evaluation into the same run, set running
    again) before the work, with its inputs: its duration is the evaluation's."""
    from ..tracking import RunLogger, find_or_create_run, log_datasets, tracking_uri

    uri = tracking_uri(cfg.tracking_uri)
    name = cfg.run_name or f"fidelity-{Path(cfg.synthetic).resolve().name}"
    run_id = find_or_create_run(uri, name, cfg.experiment, tags={"medi_dist.kind": "fidelity"}, key=cfg.run_key)
    logger = RunLogger(uri, run_id)
    logger.status("RUNNING")
    gen = load_manifest(cfg.synthetic).get("generation", {})
    logger.params(
        {
            **{k: v for k, v in asdict(cfg).items() if k not in ("tracking_uri", "log_mlflow")},
            **{f"generation.{k}": gen.get(k) for k in GENERATION_KEYS},
        }
    )
    log_datasets(logger, {"real": cfg.real, "synthetic": cfg.synthetic})
    return logger


def _log_results(logger, result: dict) -> None:
    metrics = {"fd_overall": result["fd"]["overall"], "fd_mean_group": result["fd"]["mean_group_fd"]}
    for part, d in result["conditional_accuracy"].items():
        metrics.update({f"{part}_{k}": v for k, v in _finite(d).items()})
    metrics.update({f"real_ref_{k}": v for k, v in result["real_reference"].items()})
    for kind, parts in (result["calibrated"] or {}).items():
        if isinstance(parts, dict):
            for part, d in parts.items():
                metrics.update({f"calibrated_{kind}_{part}_{k}": v for k, v in _finite(d).items()})
    if len(result["fd"]["groups"]) <= 500:  # per-subgroup curves; larger studies keep them in the JSON
        metrics.update({f"fd_group/{g}": v["fd"] for g, v in result["fd"]["groups"].items()})
    logger.metrics(_finite(metrics))
    logger.artifact_bytes(json.dumps(result, indent=2, default=str).encode(), "fidelity.json", "fidelity")
