"""A downstream result in an MLflow run: metrics (mean and SEM over seeds), per-subgroup and per-seed
CSVs, per-site bars next to the real-only scores, and the confusion matrix. `evaluate downstream`,
every Tune trial (after each seed) and the study's baseline and holdout runs all log through here."""

from __future__ import annotations

import pandas as pd

from . import plots
from .downstream import DownstreamResult


def log_artifacts(
    log, res: DownstreamResult, prefix: str, baseline: pd.Series | None = None, label: str = "augmented"
) -> None:
    """CSVs and plots named `*_{prefix}`; `baseline` (real-only per-site scores) is drawn beside `res`
    as `label`, without it `res` is the real-only arm."""
    log.artifact_bytes(res.subgroups().to_csv(index=False).encode(), f"subgroups_{prefix}.csv")
    log.artifact_bytes(pd.DataFrame(res.per_seed).to_csv(index=False).encode(), f"per_seed_{prefix}.csv")
    if baseline is None:
        scores, title = {"real only": res.site_scores()}, f"{prefix} sites"
    else:
        scores, title = {"real only": baseline, label: res.site_scores()}, f"{prefix} sites: real only vs {label}"
    fig = plots.site_bars(scores, title)
    log.figure(fig, f"site_accuracy_{prefix}.png")
    plots.close(fig)
    fig = plots.confusion(res.predictions, f"{prefix} confusion ({len(res.runs)} seeds)")
    log.figure(fig, f"confusion_{prefix}.png")
    plots.close(fig)


def log_result(log, res: DownstreamResult, prefix: str, baseline: DownstreamResult | None = None) -> None:
    """Mean/SEM metrics (`{prefix}_{metric}`, `{prefix}_{metric}_sem`) and `log_artifacts`."""
    ms = res.mean_sem
    log.metrics(
        {**{f"{prefix}_{k}": m for k, (m, _) in ms.items()}, **{f"{prefix}_{k}_sem": s for k, (_, s) in ms.items()}}
    )
    log_artifacts(log, res, prefix, baseline.site_scores() if baseline is not None else None)
