"""`medi-dist tune`: a Ray Tune study over augmentation proportions, tracked in MLflow.

Search space: synthetic ratio, allocation policy, pool (a generated dataset dir; its model, sampler,
steps and guidance are read from its index) and the classifier's learning rate (CNN) or C (linear
probe, which has no learning rate). Objective: site-averaged balanced accuracy on the *val* sites,
which are disjoint from the holdout (test) sites; the holdout is read once, after selection, to
re-evaluate the best configuration next to real-only.

Trials are function trainables with an explicit CPU budget, run in parallel on the Ray cluster and
stopped early by ASHA (one iteration = one seed). Re-running the same study (same storage_path and
name) restores it: finished trials are kept and interrupted ones continue from their last seed.
MLflow: the study is a parent run, each trial a child run; the best trial is tagged.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd

from ..evaluate.downstream import Comparison, DownstreamConfig, DownstreamError, baseline, validate
from ..evaluate.metrics import METRIC_NAMES
from ..paths import absolute
from .config import StudyConfig
from .trial import TrialContext, run_trial


@dataclass
class StudyResult:
    trials: pd.DataFrame  # one row per trial: config, objective, seeds done, MLflow run
    best: dict  # the best trial's row
    test: Comparison | None  # holdout: real only vs best
    parent_run_id: str | None  # None: the tracking server stayed down (calls in <path>/mlflow-spill)
    path: str


def base_config(cfg: StudyConfig, test_split: str = "val") -> DownstreamConfig:
    return DownstreamConfig(
        real=absolute(cfg.real),
        classifier=cfg.classifier,
        encoder=cfg.encoder,
        seeds=list(cfg.seeds),
        k_sites=cfg.k_sites,
        max_per_class=cfg.max_per_class,
        test_split=test_split,
        epochs=cfg.epochs,
        width=cfg.width,
        image_size=cfg.image_size,
        cache_dir=absolute(cfg.cache_dir),
    )


def check_study(cfg: StudyConfig):
    """Every input error before Ray starts; returns the encoder (linear) or None."""
    if cfg.metric not in METRIC_NAMES:
        raise DownstreamError(f"metric must be one of {METRIC_NAMES}, got {cfg.metric!r}")
    if cfg.search not in ("random", "grid"):
        raise DownstreamError(f"search must be random or grid, got {cfg.search!r}")
    sp = cfg.space
    if not sp.ratio or not sp.allocation:
        raise DownstreamError("space.ratio and space.allocation need at least one value each")
    if min(sp.ratio) < 0:
        raise DownstreamError(f"space.ratio has a negative ratio ({min(sp.ratio)}); ratios must be >= 0")
    if max(sp.ratio) > 0 and not sp.pools:
        raise DownstreamError("space.ratio has ratios > 0 but space.pools is empty; list generated pool dirs")
    if cfg.cpus_per_trial <= 0:
        raise DownstreamError(f"cpus_per_trial must be > 0, got {cfg.cpus_per_trial}")
    encoder = None
    for alloc in sp.allocation:
        for name in sp.baseline or ["none"]:
            probe = replace(
                base_config(cfg),
                ratio=max(sp.ratio),
                allocation=alloc,
                synthetic=[absolute(p) for p in sp.pools],
                **baseline(name),
            )
            encoder = validate(probe, build_encoder=encoder is None) or encoder
    return encoder


def param_space(cfg: StudyConfig) -> dict:
    from ray import tune

    dims = {
        "ratio": cfg.space.ratio,
        "allocation": cfg.space.allocation,
        "pool": [absolute(p) for p in cfg.space.pools] or [""],
    }
    dims.update({"lr": cfg.space.lr} if cfg.classifier == "cnn" else {"C": cfg.space.C})
    if list(cfg.space.baseline) != ["none"]:  # absent otherwise: studies from before keep their space
        dims["baseline"] = cfg.space.baseline
    pick = tune.grid_search if cfg.search == "grid" else tune.choice
    return {k: pick(list(v)) for k, v in dims.items()}


def _tuner(cfg: StudyConfig, ctx: TrialContext, path: Path):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    # Checkpoints (one per seed) force experiment snapshots; that is what makes resume exact, so
    # Tune's warning about frequent snapshots is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"cpu": cfg.cpus_per_trial})
    if tune.Tuner.can_restore(str(path)):  # interrupted or finished before: continue, never start over
        return tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    asha = ASHAScheduler(
        time_attr="training_iteration",
        max_t=len(cfg.seeds),
        grace_period=cfg.grace_period,
        reduction_factor=cfg.reduction_factor,
    )
    # The concurrency cap goes on the search algorithm: Tune ignores TuneConfig.max_concurrent_trials
    # when a BasicVariantGenerator instance is passed.
    search = BasicVariantGenerator(random_state=cfg.seed, max_concurrent=cfg.max_concurrent_trials)
    tc = tune.TuneConfig(
        metric="objective",
        mode="max",
        scheduler=asha,
        search_alg=search,
        num_samples=1 if cfg.search == "grid" else cfg.num_samples,
    )
    rc = tune.RunConfig(
        name=cfg.name, storage_path=str(path.parent), verbose=1, checkpoint_config=tune.CheckpointConfig(num_to_keep=1)
    )
    return tune.Tuner(trainable, param_space=param_space(cfg), tune_config=tc, run_config=rc)


# Settings that may change between a study's runs without changing what it measures.
RUNTIME_FIELDS = ("cpus_per_trial", "max_concurrent_trials", "storage_path", "cache_dir", "tracking_uri", "final_eval")


def check_same_study(cfg: StudyConfig, path: Path) -> None:
    """A study name stands for one set of settings: Tune would silently resume the old search space,
    so resuming with different settings is an error that names them."""
    d = asdict(cfg)
    d = {k: v for k, v in d.items() if k not in RUNTIME_FIELDS}
    d["real"], d["space"]["pools"] = absolute(d["real"]), [absolute(p) for p in d["space"]["pools"]]
    d = json.loads(json.dumps(d))
    f = path / "study.json"
    if not f.exists():
        f.write_text(json.dumps(d, indent=2))
        return
    old = json.loads(f.read_text())
    diff = sorted(k for k in set(old) | set(d) if old.get(k) != d.get(k))
    if diff:
        raise DownstreamError(
            f"study {cfg.name!r} in {path} was started with other settings ({', '.join(diff)}); "
            "run it with its original settings to resume, or choose a new name"
        )


def _trials_table(grid, n_seeds: int) -> pd.DataFrame:
    rows = []
    for r in grid:
        m = r.metrics or {}
        rows.append(
            {
                "trial_id": m.get("trial_id", Path(r.path).name),
                **{k: v for k, v in r.config.items()},
                "objective": m.get("objective", float("nan")),
                "objective_sem": m.get("objective_sem", float("nan")),
                "seeds_done": int(m.get("seeds_done", 0)),
                "complete": int(m.get("seeds_done", 0)) == n_seeds,
                "mlflow_run_id": m.get("mlflow_run_id"),
                "error": str(r.error)[:200] if r.error else "",
            }
        )
    # Ties (common on easy val sites) go to the smaller SEM, then the earlier trial: deterministic,
    # so a re-run of a finished study names the same best trial.
    return (
        pd.DataFrame(rows)
        .sort_values(
            ["complete", "objective", "objective_sem", "trial_id"], ascending=[False, False, True, True], kind="stable"
        )
        .reset_index(drop=True)
    )


def run_study(cfg: StudyConfig) -> StudyResult:
    from ..ray_setup import check_job_paths, ensure_ray
    from ..run_delivery import ensure_run
    from ..tracking import close, log_datasets, open_run, run_wait_s, tracking_uri
    from .report import close_children, finish_trials, log_test, prepare

    check_job_paths(
        {
            "real": cfg.real,
            "storage_path": cfg.storage_path,
            "cache_dir": cfg.cache_dir,
            **{f"space.pools[{i}]": p for i, p in enumerate(cfg.space.pools)},
        },
        {"tracking_uri": cfg.tracking_uri},
    )
    encoder = check_study(cfg)
    uri = tracking_uri(cfg.tracking_uri)
    path = Path(absolute(cfg.storage_path)) / cfg.name
    audit_dir = path / "audit"
    audit_dir.mkdir(parents=True, exist_ok=True)
    check_same_study(cfg, path)
    ensure_ray()  # RAY_ADDRESS (e.g. set by `ray job submit`) joins an existing cluster
    # A tracking server that is down does not stop the study: the runs' calls are kept (spilled into
    # <study>/mlflow-spill/) and delivered at the end, the runs made then if need be.
    spill = str(path / "mlflow-spill")
    plog = open_run(uri, cfg.name, f"{spill}/study", cfg.experiment, {"medi_dist.kind": "tune-study"})
    parent = plog.run_id
    plog.params({"study": asdict(cfg)})
    log_datasets(plog, {"real": absolute(cfg.real), "synthetic": [absolute(p) for p in cfg.space.pools]})
    base = base_config(cfg)
    baseline = prepare(cfg, base, encoder, uri, parent, audit_dir, spill)
    ctx = TrialContext(
        base,
        cfg.name,
        cfg.experiment,
        uri,
        parent,
        encoder.name if encoder else "",
        cfg.metric,
        str(audit_dir),
        baseline,
        threads=max(1, int(cfg.cpus_per_trial)),
        spill_dir=spill,
    )
    grid = _tuner(cfg, ctx, path).fit()
    trials = _trials_table(grid, len(cfg.seeds))
    done = trials[trials["complete"]]
    if done.empty:
        raise RuntimeError(f"no trial of study {cfg.name!r} finished all seeds; see {path} for errors")
    best = done.iloc[0].to_dict()
    deadline = time.time() + run_wait_s()  # one wait for a server that is down, for all runs
    left = lambda: max(0.0, deadline - time.time())  # noqa: E731
    parent = ensure_run(plog, left())
    close_children(cfg, ctx, trials, best, parent, left)
    finish_trials(trials, best, plog)
    test = log_test(cfg, base, best, encoder, plog, audit_dir) if cfg.final_eval else None
    return StudyResult(trials, best, test, close(plog, wait_s=left()), str(path))


def summary(res: StudyResult, metric: str = "site_balanced_accuracy") -> str:
    cols = [
        c
        for c in ("trial_id", "ratio", "effective_ratio", "allocation", "pool", "lr", "C", "objective", "seeds_done")
        if c in res.trials
    ]
    t = res.trials[cols].copy()
    if "pool" in t:
        t["pool"] = [Path(p).name if p else "-" for p in t["pool"]]
    lines = [
        f"trials (objective: val {metric}, mean over seeds done):",
        t.to_string(index=False, float_format="%.3f"),
        "",
        "best: " + json.dumps({k: res.best[k] for k in cols if k in res.best}, default=str),
    ]
    if res.best.get("effective_ratio", res.best.get("ratio", 0)) < res.best.get("ratio", 0) - 0.01:
        lines.append(
            f"note: the best trial asked for ratio {res.best['ratio']:g} but its pools held enough for "
            f"{res.best['effective_ratio']:.2f} synthetic per real tile; generate more tiles to test higher "
            "ratios"
        )
    failed = res.trials[res.trials["error"] != ""]
    if len(failed):
        lines += [
            "",
            f"{len(failed)} trial(s) failed (run again to retry them): "
            + "; ".join(f"{r.trial_id}: {r.error}" for r in failed.head(3).itertuples()),
        ]
    if res.test is not None:
        lines += ["", "holdout (test) sites, read once after selection:", res.test.table()]
    return "\n".join(lines)
