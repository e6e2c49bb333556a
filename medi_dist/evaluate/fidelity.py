"""Fidelity of synthetic tiles: Fréchet distance per (type, site) subgroup and conditional accuracy.

Fréchet distance is biased upward at small N (and more so at high feature dimension), so only compare
numbers computed with the same encoder and similar sample sizes; ``min_per_group`` drops subgroups
too small to mean anything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .classifiers import LinearProbe


def _moments(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"Fréchet distance needs at least 2 feature rows shaped (N, D); got {feats.shape}")
    return feats.mean(axis=0), np.atleast_2d(np.cov(feats, rowvar=False))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_from_moments(mu1, s1, mu2, s2) -> float:
    """||mu1-mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}).

    Tr((S1 S2)^{1/2}) is computed as the sum of square roots of the eigenvalues of the symmetric PSD
    matrix S1^{1/2} S2 S1^{1/2} (same spectrum as S1 S2). Unlike scipy.linalg.sqrtm of S1 S2 this
    never yields complex parts or NaNs when the covariances are singular (N < D), so no eps hack.
    """
    r1 = _psd_sqrt(s1)
    w = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_covmean = float(np.sqrt(np.clip(w, 0, None)).sum())
    diff = np.asarray(mu1) - np.asarray(mu2)
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(fd, 0.0)  # tiny negative values are rounding error


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D)."""
    mu1, s1 = _moments(feats_a)
    mu2, s2 = _moments(feats_b)
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    return frechet_from_moments(mu1, s1, mu2, s2)


def as_groups(groups: Any) -> list[tuple]:
    """Rows of (type, site, ...) as tuples of str; accepts a list of tuples, an (N, k) array or 1-D labels."""
    arr = np.asarray(groups, dtype=object)
    if arr.ndim == 1:
        return [tuple(map(str, g)) if isinstance(g, (tuple, list)) else (str(g),) for g in arr]
    return [tuple(map(str, row)) for row in arr]


def fidelity_report(
    real_feats: np.ndarray,
    real_groups: Any,
    synth_feats: np.ndarray,
    synth_groups: Any,
    min_per_group: int = 10,
) -> dict[str, Any]:
    """Overall and per-subgroup Fréchet distance between real and synthetic features.

    Returns ``{"overall", "n_real", "n_synth", "mean_group_fd", "groups": {group: {"fd", "n_real",
    "n_synth"}}, "skipped": {group: reason}}``; a subgroup is scored only when both sides have at least
    ``min_per_group`` rows (groups present on one side only are listed as skipped, with the reason).
    """
    rg, sg = as_groups(real_groups), as_groups(synth_groups)
    if len(rg) != len(real_feats) or len(sg) != len(synth_feats):
        raise ValueError("groups and features must have the same number of rows")
    real_feats, synth_feats = np.asarray(real_feats), np.asarray(synth_feats)
    report: dict[str, Any] = {
        "overall": frechet_distance(real_feats, synth_feats),
        "n_real": len(rg),
        "n_synth": len(sg),
        "groups": {},
        "skipped": {},
    }
    r_idx: dict[tuple, list[int]] = {}
    s_idx: dict[tuple, list[int]] = {}
    for i, g in enumerate(rg):
        r_idx.setdefault(g, []).append(i)
    for i, g in enumerate(sg):
        s_idx.setdefault(g, []).append(i)
    for g in sorted(set(r_idx) | set(s_idx)):
        nr, ns = len(r_idx.get(g, [])), len(s_idx.get(g, []))
        if min(nr, ns) < max(min_per_group, 2):
            report["skipped"][g] = f"{nr} real / {ns} synthetic rows, need >= {max(min_per_group, 2)} each"
            continue
        fd = frechet_distance(real_feats[r_idx[g]], synth_feats[s_idx[g]])
        report["groups"][g] = {"fd": fd, "n_real": nr, "n_synth": ns}
    fds = [v["fd"] for v in report["groups"].values()]
    report["mean_group_fd"] = float(np.mean(fds)) if fds else math.nan
    return report


def _acc(pred: np.ndarray, want: np.ndarray, mask: np.ndarray) -> float:
    return float(np.mean(pred[mask] == want[mask])) if mask.any() else math.nan


def conditional_accuracy(
    real_feats: np.ndarray,
    real_types: Sequence,
    real_sites: Sequence,
    synth_feats: np.ndarray,
    synth_types: Sequence,
    synth_sites: Sequence,
    seen: Sequence[bool] | None = None,
    C: float = 1.0,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """How often synthetic tiles are recognised as the type and site they were generated for.

    Two balanced linear probes are fit on *real* features (type, site) and applied to synthetic ones.
    Rows are split by ``seen`` (was the requested (type, site) pair in the real data?); by default it
    is derived from the real pairs. Returns ``{"all"|"seen"|"unseen": {"n", "type_accuracy",
    "site_accuracy", "joint_accuracy"}}`` (NaN accuracies for an empty split).

    Caveat: site and type are confounded in TCGA, so the site probe partly reads type; low site
    accuracy on unseen pairs is expected even for a perfect generator.
    """
    rt, rs = np.asarray(real_types).astype(str), np.asarray(real_sites).astype(str)
    st, ss = np.asarray(synth_types).astype(str), np.asarray(synth_sites).astype(str)
    if seen is None:
        pairs = set(zip(rt, rs))
        seen_mask = np.array([p in pairs for p in zip(st, ss)], dtype=bool)
    else:
        seen_mask = np.asarray(seen, dtype=bool)
    if not (len(st) == len(ss) == len(seen_mask) == len(synth_feats)):
        raise ValueError("synthetic features, types, sites and seen flags must have the same length")
    type_pred = LinearProbe(C=C, seed=seed).fit(real_feats, rt).predict(synth_feats)
    site_pred = LinearProbe(C=C, seed=seed).fit(real_feats, rs).predict(synth_feats)
    out = {}
    for name, mask in (("all", np.ones_like(seen_mask)), ("seen", seen_mask), ("unseen", ~seen_mask)):
        out[name] = {
            "n": int(mask.sum()),
            "type_accuracy": _acc(type_pred, st, mask),
            "site_accuracy": _acc(site_pred, ss, mask),
            "joint_accuracy": _acc((type_pred == st) & (site_pred == ss), np.ones(len(st), bool), mask),
        }
    return out


def fidelity_table(report: dict[str, Any]):
    """The per-subgroup part of a fidelity report as a DataFrame (one row per scored group)."""
    import pandas as pd

    rows = [{"group": "/".join(g), **v} for g, v in report["groups"].items()]
    return pd.DataFrame(rows, columns=["group", "fd", "n_real", "n_synth"])
