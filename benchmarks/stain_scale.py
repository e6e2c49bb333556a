"""Per-site stains estimated where tiles are larger (issue 13): is source resolution enough?

At 32 px a nucleus is 2-3 pixels, so blur and JPEG chroma subsampling mix the stains and every
estimator of `stain_space.py` is 0.2-0.8 off per component (RESULTS.md, "Per-site stain
estimators"). Real pipelines estimate stains (Macenko) on 256-512 px tiles at 20x, before any
downsizing. The procedural renderer draws the same field of view at any size with the same per-site
stain, blur (scaled with size) and JPEG quality, so a world ingested at 64 / 128 / 256 px holds the
32-px demo world's sites with the same stains. This benchmark

1. estimates each training site's stain directions (and background) at each source size with the
   existing estimators, pixel scales (high-pass sigma, neighbourhood) scaled with the size, and
   scores them against `procedural.site_stain` (largest per-component error of the unit h and e
   vectors, background OD, mean over the 8 training sites);
2. moves ground-truth tiles of each type at its own largest site to the 24 unseen pairs of the
   32-px world through `stain_space.StainSpace.transfer`, with the directions from each source size
   and the rest from where it is identifiable at 32 px (the scanner's line pattern is fixed in the
   32-px frame; background and intensity unmixed at 32 px with the given directions; JPEG quality
   from the 32-px files' quantisation tables), and scores them with the calibrated probes.

    python benchmarks/stain_scale.py --dataset /tmp/stain/world32 \
        --source /tmp/stain2/world64 --source /tmp/stain2/world128 --source /tmp/stain2/world256
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter, maximum_filter

sys.path.insert(0, str(Path(__file__).parent))
import stain_space as ss  # noqa: E402
from stain_bounds import SITE, TYPE, render, site_files  # noqa: E402

from medi_dist.data.site_stains import faint_background, regress_h  # noqa: E402
from medi_dist.evaluate.encoders import get_encoder  # noqa: E402
from medi_dist.evaluate.fidelity_job import CalibratedProbes, read_tiles  # noqa: E402

BASE = 32  # the pixel scales of stain_space's estimators were set at 32 px


def contrast_h(x: np.ndarray, scale: float, share: float = 2.0) -> np.ndarray:
    """stain_space.contrast_vector with its high-pass sigma (1.5 px at 32 px) scaled with the size."""
    return ss.contrast_vector(x, sigma=1.5 * scale, share=share)


def axis_e(x: np.ndarray, scale: float, share: float = 30.0) -> np.ndarray:
    """stain_space.eosin_vector with its sigma and 3x3 neighbourhood scaled with the size."""
    sigma, reach = 1.5 * scale, max(3, int(round(3 * scale)) | 1)
    dense = (x - gaussian_filter(x, (0, sigma, sigma, 0))).sum(-1)
    near = maximum_filter(dense, (1, reach, reach)).ravel()
    px = x.reshape(-1, 3)[near <= np.percentile(near, share)]
    _, vecs = np.linalg.eigh(np.cov(px.T))
    return ss.unit(vecs[:, -1] * np.sign(vecs[:, -1].sum()))


ESTIMATORS = {  # name -> (h, e) choice
    "Macenko (after removing the line pattern)": ("macenko", "macenko"),
    "local-contrast h, eosin axis": ("contrast", "axis"),
    "local-contrast h, Macenko e": ("contrast", "macenko"),
    "Macenko e after a faint-pixel background, regression h": ("regress", "macenko-bg"),
}


def directions(od: np.ndarray, lines: bool, how: tuple[str, str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(unit h and e rows, background) of one site from its (N, H, W, 3) OD at `size` px; the
    background is the median OD off the stain plane (stain_space.estimate's default)."""
    pattern = ss.fixed_pattern(od) if lines else np.zeros(od.shape[1:3])
    x = od - pattern[..., None]
    scale = size / BASE
    mac = ss.macenko_vectors(x.reshape(-1, 3))
    if how[1] == "macenko-bg":  # Macenko's eosin extreme of the OD less the faintest pixels' OD
        e = ss.macenko_vectors((x - faint_background(x)).reshape(-1, 3), beta=0.2)[1]
    else:
        e = axis_e(x, scale) if how[1] == "axis" else mac[1]
    if how[0] == "regress":
        h = regress_h(x, e)  # sigma 4 source pixels: the best of 1, 2, 4 at 128 and 256 px
    else:
        h = contrast_h(x, scale) if how[0] == "contrast" else mac[0]
    hed = np.stack([h, e])
    _, res = ss.Stain(hed, np.zeros(3), pattern).unmix(od)
    return hed, np.median(res.reshape(-1, 3), 0)


def errors(st: ss.Stain, ref: ss.Stain) -> dict:
    return {
        "h": round(float(np.abs(st.hed[0] - ref.hed[0]).max()), 3),
        "e": round(float(np.abs(st.hed[1] - ref.hed[1]).max()), 3),
        "bg": round(float(np.abs(st.bg - ref.bg).max()), 3),
        "lines": round(float(np.abs(st.lines - ref.lines).mean()), 3),
    }


def mean_errors(per_site: dict) -> dict:
    return {k: round(float(np.mean([e[k] for e in per_site.values()])), 3) for k in ("h", "e", "bg", "lines")}


def site_od(root: str, size: int, owner: dict, budget: int, seed: int = 0) -> tuple[dict, dict]:
    """OD of up to `budget` pixels' worth of training tiles per site (a seeded random subset)."""
    tiles, index = read_tiles(root, ["train"], size)
    sites, types = index[SITE].to_numpy().astype(str), index[TYPE].to_numpy().astype(str)
    got = {s: str(types[sites == s][0]) for s in sorted(set(sites))}
    if got != owner:
        raise SystemExit(f"{root}: training sites/owners {got} differ from the 32-px world's {owner}")
    per_site = max(1, budget // (size * size))
    rng = np.random.default_rng(seed)
    od, used = {}, {}
    for s in owner:
        idx = np.flatnonzero(sites == s)
        idx = np.sort(rng.choice(idx, min(per_site, idx.size), replace=False))
        od[s], used[s] = ss.optical_density(tiles[idx]), int(idx.size)
    return od, used


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="/tmp/stain/world32", help="the 32-px world (as in RESULTS.md)")
    p.add_argument("--source", action="append", default=[], help="the same world ingested at a larger size")
    p.add_argument("--budget", type=int, default=1 << 23, help="pixels of training tiles per site to estimate on")
    p.add_argument("--per-pair", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--estimator", action="append", choices=sorted(ESTIMATORS), help="default: all")
    p.add_argument("--out", default="benchmarks/results/stain_scale.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = json.loads((Path(args.dataset) / "dataset.json").read_text())["renderer"]
    size, lines = meta["size"], bool(meta["scanner_lines"])
    tiles, index = read_tiles(args.dataset, ["train"], size)
    types, sites = sorted(index[TYPE].unique()), sorted(index[SITE].unique())
    owner = index.groupby(SITE)[TYPE].agg(lambda v: v.value_counts().index[0]).to_dict()
    owner = {str(s): str(t) for s, t in owner.items()}
    donor = {t: index[index[TYPE] == t][SITE].value_counts().index[0] for t in types}
    site_arr = index[SITE].to_numpy().astype(str)
    counts = {s: int((site_arr == s).sum()) for s in owner}
    od32 = {s: ss.optical_density(tiles[site_arr == s]) for s in owner}
    quality = {s: ss.jpeg_quality(f) for s, f in site_files(args.dataset, index).items()}
    t0 = time.time()
    probes = CalibratedProbes(get_encoder("random-conv"), args.dataset, index, 0, size)
    trained = set(zip(index[TYPE], index[SITE]))
    rows = [(t, s) for t in types for s in sites if (t, s) not in trained for _ in range(args.per_pair)]
    want_t, want_s = np.array([t for t, _ in rows]), np.array([s for _, s in rows])
    gt_donor = render([(t, donor[t]) for t, _ in rows], size, lines)
    print(f"probes and donor tiles: {time.time() - t0:.0f} s", flush=True)
    ref32 = {s: ss.true_stain(s, size, lines, od32[s]) for s in owner}
    results: dict = {}

    def score(name: str, stains: dict, extra: dict) -> None:
        for s, st in stains.items():
            st.quality = quality[s]
        space = ss.StainSpace(stains, owner, counts)
        img = space.transfer(gt_donor, want_t, [donor[t] for t in want_t], want_s)
        r = probes.score(img, want_t, want_s, np.zeros(len(rows), bool))["unseen"]
        per = {s: errors(stains[s], ref32[s]) for s in owner}
        results[name] = {
            **{k: round(r[k], 3) for k in ("type_accuracy", "stain_accuracy", "leakage")},
            "error_at_32px": {"mean": mean_errors(per), "sites": per},
            **extra,
        }
        print(
            f"{name}: {results[name]['error_at_32px']['mean']} -> "
            f"{ {k: results[name][k] for k in ('type_accuracy', 'stain_accuracy', 'leakage')} }",
            flush=True,
        )

    score("true stains + JPEG quality (reference)", {s: ss.true_stain(s, size, lines, od32[s]) for s in owner}, {})
    sources = [(args.dataset, size)] + [
        (src, json.loads((Path(src) / "dataset.json").read_text())["renderer"]["size"]) for src in args.source
    ]
    for src, src_size in sources:
        t0 = time.time()
        od, used = (od32, counts) if src == args.dataset else site_od(src, src_size, owner, args.budget)
        if (
            src != args.dataset
            and json.loads((Path(src) / "dataset.json").read_text())["renderer"]["scanner_lines"] != lines
        ):
            raise SystemExit(f"{src}: scanner lines differ from {args.dataset}")
        refs = {s: ss.true_stain(s, src_size, lines, od[s]) for s in owner}
        print(f"{src_size} px: read {sum(used.values())} tiles ({time.time() - t0:.0f} s)", flush=True)
        for name, how in ESTIMATORS.items():
            if args.estimator and name not in args.estimator:
                continue
            t0 = time.time()
            est = {s: directions(od[s], lines, how, src_size) for s in owner}
            src_err = {
                s: {
                    "h": round(float(np.abs(hed[0] - refs[s].hed[0]).max()), 3),
                    "e": round(float(np.abs(hed[1] - refs[s].hed[1]).max()), 3),
                    "bg": round(float(np.abs(bg - refs[s].bg).max()), 3),
                }
                for s, (hed, bg) in est.items()
            }
            extra = {
                "source_size": src_size,
                "tiles_per_site": used,
                "error_at_source": {
                    "mean": {k: round(float(np.mean([e[k] for e in src_err.values()])), 3) for k in ("h", "e", "bg")},
                    "sites": src_err,
                },
                "estimate_seconds": round(time.time() - t0, 1),
            }
            print(
                f"  {src_size} px, {name}: at source {extra['error_at_source']['mean']} "
                f"({extra['estimate_seconds']} s)",
                flush=True,
            )
            # directions from the source; line pattern, background, intensity at 32 px
            stains = {s: ss.estimate(od32[s], lines, hed=est[s][0]) for s in owner}
            score(f"{src_size} px directions, {name}; rest at {size} px", stains, extra)
            if src_size != size:  # the background from the source too
                for s, st in stains.items():
                    st.bg = est[s][1]
                    ss.with_top(st, od32[s])
                score(f"{src_size} px directions and background, {name}; rest at {size} px", stains, extra)
    out = {
        "benchmark": "stain_scale (issue 13)",
        "settings": vars(args),
        "unseen_pairs": len(set(rows)),
        "tiles_per_pair": args.per_pair,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
