"""Pictures for MLflow: per-site accuracy (real-only vs augmented), confusion matrix, pool samples.

Matplotlib runs on the Agg backend (no display on workers); figures are returned to the caller,
which logs and closes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .allocation import SITE, TYPE


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def site_bars(scores: dict[str, pd.Series], title: str = "per-site balanced accuracy"):
    """Grouped bars: one group per test site, one bar per arm (e.g. real only / augmented)."""
    plt = _plt()
    sites = sorted(set().union(*(s.index for s in scores.values())))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(sites) + 2), 3.2))
    w = 0.8 / max(1, len(scores))
    x = np.arange(len(sites))
    for i, (label, s) in enumerate(scores.items()):
        ax.bar(x + (i - (len(scores) - 1) / 2) * w, [s.get(site, np.nan) for site in sites], w, label=label)
    ax.set_xticks(x, sites, rotation=45, ha="right")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("balanced accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def confusion(predictions: pd.DataFrame, title: str = "confusion (all seeds)"):
    """Row-normalised confusion matrix of true vs predicted cancer type, counts in the cells."""
    plt = _plt()
    labels = sorted(set(predictions[TYPE]) | set(predictions["pred"]))
    cm = pd.crosstab(predictions[TYPE], predictions["pred"]).reindex(index=labels, columns=labels, fill_value=0)
    frac = cm.div(cm.sum(axis=1).replace(0, 1), axis=0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(labels), 0.8 + 0.6 * len(labels)))
    ax.imshow(frac.to_numpy(), vmin=0, vmax=1, cmap="Blues")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(
                j,
                i,
                int(cm.iat[i, j]),
                ha="center",
                va="center",
                color="white" if frac.iat[i, j] > 0.5 else "black",
                fontsize=8,
            )
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def pool_grid(
    pool_dir: str | Path, per_cell: int = 2, max_types: int = 8, max_sites: int = 12, tile_px: int = 48
) -> bytes:
    """PNG of a few synthetic tiles per (type, site) of a pool, types as rows and sites as columns."""
    from ..visual import png_bytes, tile_grid
    from .tile_reader import load_tiles, read_index

    idx = read_index(pool_dir, ["train"])
    types = sorted(idx[TYPE].astype(str).unique())[:max_types]
    sites = sorted(idx[SITE].astype(str).unique())[:max_sites]
    sel = idx[idx[TYPE].isin(types) & idx[SITE].isin(sites)].sort_values("key")
    keys = sel.groupby([TYPE, SITE]).head(per_cell)["key"].tolist()
    images, meta = load_tiles(pool_dir, ["train"], keys=keys)
    tiles: dict[tuple[str, str], list[np.ndarray]] = {}
    for img, t, s in zip(images, meta[TYPE].astype(str), meta[SITE].astype(str)):
        tiles.setdefault((t, s), []).append(img)
    return png_bytes(tile_grid(tiles, types, sites, tile_px=tile_px, per_cell=per_cell))


def close(fig) -> None:
    _plt().close(fig)
