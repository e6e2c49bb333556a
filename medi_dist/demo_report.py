"""What the demo compares and how it reports: the downstream arms, the paired contrasts it reads,
the real-vs-generated picture and the printed summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_picture(ds: Path, pool: Path, path: Path) -> None:
    """Real (left) and MeDi-generated (right) tile per (type, site); blank where none exists."""
    from .evaluate.tile_reader import load_tiles
    from .visual import tile_grid

    cells: dict[tuple[str, str], list] = {}
    real_imgs, real_meta = load_tiles(ds, ("train", "holdout"))
    syn_imgs, syn_meta = load_tiles(pool, ("train",))
    types = sorted(real_meta["cancer_type"].unique())
    sites = sorted(real_meta["tissue_source_site"].unique())
    blank = np.full_like(real_imgs[0], 235)
    for t in types:
        for s in sites:
            r = np.flatnonzero(
                (real_meta["cancer_type"] == t).to_numpy() & (real_meta["tissue_source_site"] == s).to_numpy()
            )
            g = np.flatnonzero(
                (syn_meta["cancer_type"] == t).to_numpy() & (syn_meta["tissue_source_site"] == s).to_numpy()
            )
            if len(r) or len(g):
                cells[(t, s)] = [real_imgs[r[0]] if len(r) else blank, syn_imgs[g[0]] if len(g) else blank]
    tile_grid(cells, types, sites, tile_px=48, per_cell=2).save(path)


REAL = "real only"
# (arm, reference arm): the paired differences the demo reads, with what each one asks
CONTRASTS = [
    ("+ ground truth", REAL, "does the protocol reward correct tiles?"),
    ("+ ground truth", "+ noise control", "... more than coloured noise with the right labels?"),
    ("+ MeDi", REAL, "does MeDi help?"),
    ("+ MeDi", "+ site-nulled", "does the site condition add to the same network's class-only tiles?"),
    ("+ MeDi", "HED jitter", "does MeDi beat the standard stain augmentation?"),
    ("+ MeDi + HED jitter", "HED jitter", "does MeDi add to the standard stain augmentation?"),
    ("+ MeDi", "re-stained real tiles", "does MeDi beat re-staining the real tiles (no generator)?"),
]


def arms(ratio: float, pools: dict[str, Path]) -> dict[str, dict]:
    """The downstream arms, each adding `ratio` x the real tiles' count of synthetic or augmented tiles."""
    syn = lambda name: {"synthetic": [str(pools[name])], "ratio": ratio}  # noqa: E731
    jitter = {"augment": "hed-jitter", "augment_ratio": ratio}
    arms = {
        REAL: {"ratio": 0.0},
        "+ noise control": syn("noise"),
        "+ ground truth": syn("oracle"),
        "HED jitter": jitter,
        "+ site-nulled": syn("site-nulled"),
        # the non-generative twin: real tiles moved with the same sites' stains as MeDi's composition
        "re-stained real tiles": {"augment": "restain-sites", "augment_ratio": ratio},
        "+ MeDi": syn("medi"),
        "+ MeDi + HED jitter": {**syn("medi"), **jitter},
    }
    if "class-only" in pools:
        arms["+ class-only model"] = syn("class-only")
    return arms


def format_summary(s: dict) -> str:
    from .evaluate.downstream import verdict

    lines = [
        "",
        "Classifiers trained on real training-site tiles (+ synthetic or a stain baseline), tested on "
        f"held-out sites {', '.join(s['held_out_sites'])}; mean ± SEM over seeds:",
        "",
        s["table"],
        "",
        "Paired differences over seeds (an effect is called past 2 SEM):",
    ]
    questions = {f"{a} vs {b}": q for a, b, q in CONTRASTS}
    for name, d in s["contrasts"].items():
        ba, ws = d["balanced_accuracy"], d["worst_site_accuracy"]
        lines.append(
            f"  {name}: balanced {ba[0]:+.3f} ± {ba[1]:.3f}, worst-site {ws[0]:+.3f} ± {ws[1]:.3f} "
            f"-> {verdict(*ba)}  ({questions[name]})"
        )
    cal = s.get("fidelity")
    if cal:
        got, top = cal["synthetic"], cal["ceiling"]
        lines += [
            "",
            "MeDi tiles, probes calibrated on ground truth (ceiling in brackets): "
            f"seen pairs type {got['seen']['type_accuracy']:.2f} ({top['seen']['type_accuracy']:.2f}), stain "
            f"{got['seen']['stain_accuracy']:.2f} ({top['seen']['stain_accuracy']:.2f}); unseen pairs type "
            f"{got['unseen']['type_accuracy']:.2f} ({top['unseen']['type_accuracy']:.2f}), stain "
            f"{got['unseen']['stain_accuracy']:.2f} ({top['unseen']['stain_accuracy']:.2f}), leakage "
            f"{got['unseen']['leakage']:.2f} (owner type drawn instead of the requested one)",
        ]
    lines += [
        "",
        f"real vs generated tiles per (type, site): {s['picture']}",
        f"wall time: {s['minutes']:.1f} min",
        f"MLflow: .venv/bin/mlflow ui --backend-store-uri {s['tracking_uri']} --host 127.0.0.1 "
        f"then open {s.get('ui', 'http://127.0.0.1:5000')} (the demo's parent run, Model training mode)",
    ]
    return "\n".join(lines)
