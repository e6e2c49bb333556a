"""Classification metrics for held-out-site evaluation, computed in one place for every stage.

Labels may be ints or strings; ``sites`` names the tissue source site of each test tile. Balanced
accuracy averages recall over the classes *present in y_true* (so a site where only one class occurs
scores that class's recall), which is the MeDi reference's per-site convention.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

METRIC_NAMES = ("balanced_accuracy", "site_balanced_accuracy", "worst_site_accuracy", "mcc")


def _arrays(*arrays: Any) -> list[np.ndarray]:
    out = [np.asarray(a) for a in arrays]
    n = {len(a) for a in out}
    if len(n) != 1:
        raise ValueError(f"inputs have different lengths: {[len(a) for a in out]}")
    if n == {0}:
        raise ValueError("metrics need at least one sample")
    return out


def balanced_accuracy(y_true: Any, y_pred: Any) -> float:
    """Mean over the classes present in y_true of that class's recall."""
    y_true, y_pred = _arrays(y_true, y_pred)
    recalls = [np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]
    return float(np.mean(recalls))


def site_averaged_balanced_accuracy(y_true: Any, y_pred: Any, sites: Any) -> float:
    """Balanced accuracy within each site, averaged over sites (each site weighs the same)."""
    y_true, y_pred, sites = _arrays(y_true, y_pred, sites)
    per_site = [balanced_accuracy(y_true[sites == s], y_pred[sites == s]) for s in np.unique(sites)]
    return float(np.mean(per_site))


def worst_site_accuracy(y_true: Any, y_pred: Any, sites: Any) -> float:
    """Lowest plain accuracy over sites: how badly the classifier can fail on one hospital."""
    y_true, y_pred, sites = _arrays(y_true, y_pred, sites)
    return float(min(np.mean(y_true[sites == s] == y_pred[sites == s]) for s in np.unique(sites)))


def mcc(y_true: Any, y_pred: Any) -> float:
    """Multiclass Matthews correlation (Gorodkin's R_K); 0 when undefined, as in scikit-learn."""
    y_true, y_pred = _arrays(y_true, y_pred)
    classes, idx = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    k, n = len(classes), len(y_true)
    cm = np.zeros((k, k), dtype=np.float64)
    np.add.at(cm, (idx[:n], idx[n:]), 1)
    t, p = cm.sum(axis=1), cm.sum(axis=0)  # true / predicted counts per class
    c, s = np.trace(cm), float(n)
    denom = math.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denom) if denom > 0 else 0.0


def all_metrics(y_true: Any, y_pred: Any, sites: Any) -> dict[str, float]:
    return {
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
        "site_balanced_accuracy": site_averaged_balanced_accuracy(y_true, y_pred, sites),
        "worst_site_accuracy": worst_site_accuracy(y_true, y_pred, sites),
        "mcc": mcc(y_true, y_pred),
    }


def subgroup_table(
    y_true: Any, y_pred: Any, sites: Any, class_names: Sequence[str] | Mapping[Any, str] | None = None
) -> pd.DataFrame:
    """One row per (true type, site) with n, correct and accuracy, to see where a model fails.

    ``class_names`` (list indexed by label, or dict) turns integer labels into readable names.
    """
    y_true, y_pred, sites = _arrays(y_true, y_pred, sites)
    df = pd.DataFrame({"cancer_type": y_true, "site": sites, "correct": y_true == y_pred})
    out = df.groupby(["cancer_type", "site"], sort=True)["correct"].agg(n="size", correct="sum").reset_index()
    out["correct"] = out["correct"].astype(int)
    out["accuracy"] = out["correct"] / out["n"]
    if class_names is not None:
        out["cancer_type"] = [class_names[v] for v in out["cancer_type"]]
    return out


def mean_sem(runs: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and standard error (std with ddof=1 over sqrt(n); 0 for a single run) per metric."""
    if not runs:
        raise ValueError("mean_sem needs at least one run")
    names = list(runs[0])
    for r in runs[1:]:
        if set(r) != set(names):
            raise ValueError(f"runs report different metrics: {sorted(names)} vs {sorted(r)}")
    out = {}
    for name in names:
        v = np.array([float(r[name]) for r in runs])
        sem = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
        out[name] = (float(v.mean()), sem)
    return out


def format_table(
    rows: Mapping[str, Mapping[str, tuple[float, float]]], metrics: Sequence[str] | None = None, digits: int = 3
) -> str:
    """Plain-text table: one row per label (e.g. a ratio r), one 'mean ± sem' column per metric."""
    if not rows:
        return "(no results)"
    if metrics is None:
        metrics = list(dict.fromkeys(m for r in rows.values() for m in r))
    header = ["", *metrics]
    body = []
    for label, stats in rows.items():
        cells = [str(label)]
        for m in metrics:
            cells.append(f"{stats[m][0]:.{digits}f} ± {stats[m][1]:.{digits}f}" if m in stats else "-")
        body.append(cells)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in body)])
