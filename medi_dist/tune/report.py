"""Study bookkeeping around the trials: warm-up and real-only baseline (val), closing the trials'
MLflow runs and tagging the best, and the single holdout re-evaluation of the best configuration.

The driver's own reads are audited too (audit/prepare.json must show no holdout tile; the holdout
appears only in audit/final.json, written after selection).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd

from ..evaluate.downstream import Comparison, DownstreamConfig, compare, load_inputs, run_downstream
from ..evaluate.metrics import METRIC_NAMES
from ..evaluate.result_log import log_result
from ..evaluate.tile_reader import AUDIT
from ..paths import absolute
from .trial import trial_config

TEST_TAG = "medi_dist.test_evaluated_trial"


def _audit(audit_dir: Path, name: str) -> None:
    entry = {"trial_id": name, "start": 0, "seeds": [], "computed": [], **AUDIT.to_dict()}
    (audit_dir / f"{name}.json").write_text(json.dumps([entry]))


def prepare(cfg, base: DownstreamConfig, encoder, uri: str, parent: str, audit_dir: Path) -> dict:
    """Warm the feature cache (train, val, pools) once, so parallel trials do not all encode, and
    score real-only on val: the reference for every trial's per-site plot. Returns site -> score."""
    from ..tracking import RunLogger, find_or_create_run, log_datasets

    AUDIT.reset()
    inputs = load_inputs(base, encoder, [absolute(p) for p in cfg.space.pools])
    res = run_downstream(replace(base, ratio=0.0), inputs)
    run = find_or_create_run(
        uri, f"{cfg.name}/real-only", cfg.experiment, {"medi_dist.kind": "tune-baseline"}, parent_run_id=parent
    )
    log = RunLogger(uri, run)
    log.params({"ratio": 0.0, "classifier": base.classifier, "seeds": base.seeds})
    log_datasets(log, {"real": base.real})
    log_result(log, res, "val")
    log.finish()
    _audit(audit_dir, "prepare")
    return {str(k): float(v) for k, v in res.site_scores().items()}


def finish_trials(uri: str, trials: pd.DataFrame, best: dict, plog) -> None:
    """Close every trial's child run (ASHA-stopped ones stay RUNNING otherwise) and tag the best."""
    from ..tracking import client

    c = client(uri)
    for row in trials.to_dict("records"):
        if not isinstance(row.get("mlflow_run_id"), str):  # failed before its first report
            continue
        rid = row["mlflow_run_id"]
        c.set_tag(rid, "medi_dist.best", str(row["trial_id"] == best["trial_id"]).lower())
        c.set_tag(rid, "medi_dist.early_stopped", str(not row["complete"] and not row["error"]).lower())
        c.set_terminated(rid, "FAILED" if row["error"] else "FINISHED")
    plog.tags(
        {
            "best_trial": best["trial_id"],
            "best_run_id": best["mlflow_run_id"],
            **{f"best.{k}": best[k] for k in ("ratio", "allocation", "pool", "lr", "C") if k in best},
        }
    )
    plog.metrics({"best_val_objective": best["objective"], "best_val_objective_sem": best["objective_sem"]})
    plog.artifact_bytes(trials.to_csv(index=False).encode(), "trials.csv")


def log_test(cfg, base: DownstreamConfig, best: dict, encoder, plog, audit_dir: Path) -> Comparison | None:
    """Re-evaluate the best configuration once on the holdout sites, next to real-only (paired)."""
    from ..tracking import client

    if client(plog.uri).get_run(plog.run_id).data.tags.get(TEST_TAG) == best["trial_id"]:
        return None  # this exact selection was already scored on the holdout: do not look again
    AUDIT.reset()
    test_base = replace(base, test_split="holdout")
    chosen = trial_config(test_base, best)
    arms = {
        "real only": {"ratio": 0.0, "synthetic": [], "lr": chosen.lr, "C": chosen.C},
        "best": {k: getattr(chosen, k) for k in ("ratio", "allocation", "synthetic", "lr", "C")},
    }
    cmp = compare(test_base, arms)
    _audit(audit_dir, "final")
    real, aug = cmp.results["real only"], cmp.results["best"]
    log_result(plog, aug, "test", baseline=real)
    plog.metrics({f"test_real_only_{k}": m for k, (m, _) in real.mean_sem.items() if k in METRIC_NAMES})
    plog.artifact_bytes((cmp.table() + "\n").encode(), "test_table.txt")
    plog.tags({TEST_TAG: best["trial_id"]})
    return cmp
