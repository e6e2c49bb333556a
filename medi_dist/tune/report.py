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
from .trial import TrialContext, trial_config, trial_logger

TEST_TAG = "medi_dist.test_evaluated_trial"


def _audit(audit_dir: Path, name: str) -> None:
    entry = {"trial_id": name, "start": 0, "seeds": [], "computed": [], **AUDIT.to_dict()}
    (audit_dir / f"{name}.json").write_text(json.dumps([entry]))


BASELINE = "real-only"  # the baseline's child run: <study>/real-only, spilled into <spill_dir>/real-only


def _baseline_logger(cfg, uri: str, parent: str | None, spill_dir: str, wait_s: float | None):
    from ..tracking import open_run

    name = f"{cfg.name}/{BASELINE}"
    return open_run(
        uri, name, f"{spill_dir}/{BASELINE}", cfg.experiment, {"medi_dist.kind": "tune-baseline"}, parent, wait_s=wait_s
    )


def prepare(
    cfg, base: DownstreamConfig, encoder, uri: str, parent: str | None, audit_dir: Path, spill_dir: str
) -> dict:
    """Warm the feature cache (train, val, pools) once, so parallel trials do not all encode, and
    score real-only on val: the reference for every trial's per-site plot. Returns site -> score."""
    from ..run_logger import WAIT_S
    from ..tracking import close, log_datasets

    AUDIT.reset()
    inputs = load_inputs(base, encoder, [absolute(p) for p in cfg.space.pools])
    res = run_downstream(replace(base, ratio=0.0), inputs)
    # A server that is down holds the study up for WAIT_S here, not the full wait: what it did not
    # take is spilled and the study's end (close_children) delivers it.
    log = _baseline_logger(cfg, uri, parent, spill_dir, 0)
    log.params({"ratio": 0.0, "classifier": base.classifier, "seeds": base.seeds})
    log_datasets(log, {"real": base.real})
    log_result(log, res, "val")
    close(log, wait_s=WAIT_S)
    _audit(audit_dir, "prepare")
    return {str(k): float(v) for k, v in res.site_scores().items()}


def close_children(cfg, ctx: TrialContext, trials: pd.DataFrame, best: dict, parent: str | None, left) -> None:
    """Close every trial's child run (ASHA-stopped ones stay RUNNING otherwise), tag the best, and
    deliver what the trials and the baseline spilled while the server was down (their runs made now
    if need be, with the parent tag they could not have then). `left()`: seconds still to wait for a
    server that is down (one budget for all runs). Fills in trials' mlflow_run_id."""
    from ..tracking import close

    parent_tag = {"mlflow.parentRunId": parent} if parent else {}
    ids = []
    for row in trials.to_dict("records"):
        if not row["seeds_done"]:  # failed before its first report: nothing logged
            ids.append(None)
            continue
        log = trial_logger(ctx, row["trial_id"], parent, wait_s=0)  # made or found by its first call
        log.tags(
            {
                "medi_dist.best": str(row["trial_id"] == best["trial_id"]).lower(),
                "medi_dist.early_stopped": str(not row["complete"] and not row["error"]).lower(),
                **parent_tag,
            }
        )
        ids.append(close(log, "FAILED" if row["error"] else "FINISHED", wait_s=left()))
    trials["mlflow_run_id"] = ids
    best["mlflow_run_id"] = trials.loc[trials["trial_id"] == best["trial_id"], "mlflow_run_id"].iloc[0]
    if any((Path(ctx.spill_dir) / BASELINE).glob("*.jsonl")):  # the baseline's calls the server did not take
        log = _baseline_logger(cfg, ctx.uri, parent, ctx.spill_dir, 0)
        log.tags(parent_tag)
        close(log, wait_s=left())


def finish_trials(trials: pd.DataFrame, best: dict, plog) -> None:
    """The study run: best trial, its objective, the trials table."""
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
    if _study_tags(plog).get(TEST_TAG) == best["trial_id"]:
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


def _study_tags(plog) -> dict:
    """The study run's tags; {} if it has none yet or the server is down (then the holdout is scored:
    the run may hold the tag of an earlier look, which is then not checked, and the log says so)."""
    from ..run_logger import WAIT_S
    from ..tracking import TrackingUnavailable, client, retrying

    if plog.run_id is None:
        return {}
    try:
        run = retrying(lambda: client(plog.uri).get_run(plog.run_id), "reading the study run", plog.uri, WAIT_S)
        return run.data.tags
    except TrackingUnavailable as e:
        import logging

        logging.getLogger("medi_dist.tune").warning("%s; holdout scored without checking for an earlier look", e)
        return {}
