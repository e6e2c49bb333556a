"""One Tune trial: the downstream protocol on the *validation* sites, reported seed by seed.

Each seed is one training iteration, so ASHA can stop a poor configuration after its first seeds.
After every seed the trial logs to its MLflow child run (metrics, per-subgroup CSV, plots), writes a
checkpoint with the finished seeds (a restored study continues a trial where it stopped) and an
audit file naming every shard and tile key it read (tests check no holdout tile is among them).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from ..evaluate import plots
from ..evaluate.downstream import DownstreamConfig, DownstreamResult, SeedRun, baseline, load_inputs, run_seed
from ..evaluate.result_log import log_artifacts
from ..evaluate.tile_reader import AUDIT, LazyEncoder, read_index

RUNS_FILE = "runs.json"


@dataclass
class TrialContext:
    """Everything a trial needs besides its sampled config (paths already absolute)."""

    base: DownstreamConfig  # test_split == "val"
    study: str
    experiment: str
    uri: str
    parent_run_id: str | None  # None: the server was down when the study started
    encoder_name: str
    metric: str
    audit_dir: str
    baseline_sites: dict  # real-only per-val-site scores, for the comparison plot
    threads: int = 1
    spill_dir: str = ""  # <study>/mlflow-spill: each trial's calls the server did not take, in <trial_id>/


def trial_logger(ctx: TrialContext, trial_id: str, parent_run_id: str | None, wait_s: float | None = None):
    """The trial's MLflow child run (tracking.open_run: a server that is down does not fail the trial;
    its calls are spilled into <spill_dir>/<trial_id> and the study's end delivers them)."""
    from ..tracking import open_run

    return open_run(
        ctx.uri,
        f"{ctx.study}/{trial_id}",
        f"{ctx.spill_dir}/{trial_id}",
        ctx.experiment,
        {"medi_dist.kind": "tune-trial", "medi_dist.trial_id": trial_id},
        parent_run_id,
        wait_s=wait_s,
    )


def trial_config(base: DownstreamConfig, config: dict) -> DownstreamConfig:
    ratio = float(config["ratio"])
    pool = config.get("pool") or ""
    return replace(
        base,
        ratio=ratio,
        allocation=config["allocation"],
        synthetic=[pool] if ratio > 0 and pool else [],
        lr=float(config.get("lr", base.lr)),
        C=float(config.get("C", base.C)),
        **baseline(config.get("baseline", "none")),
    )


def pool_info(pool: str) -> dict:
    """Model, sampler, steps and guidance of a pool, read from its index (joined if mixed)."""
    if not pool:
        return {}
    idx = read_index(pool, ["train"])
    info = {"pool.tiles": int(len(idx)), "pool.dir": pool}
    for col, name in (("source", "model"), ("sampler", "sampler"), ("steps", "steps"), ("guidance", "guidance")):
        if col in idx:
            info[f"pool.{name}"] = ",".join(map(str, sorted(idx[col].dropna().astype(str).unique()))) or "-"
    return info


def runs_to_json(runs: list[SeedRun]) -> str:
    """Finished seeds as plain JSON (no pickle in checkpoints: they may come from shared storage)."""
    return json.dumps(
        [
            {
                **{k: v for k, v in vars(r).items() if k not in ("predictions", "allocation")},
                "predictions": r.predictions.to_dict("list"),
                "allocation": [[*g, n] for g, n in r.allocation.items()],
            }
            for r in runs
        ]
    )


def runs_from_json(text: str) -> list[SeedRun]:
    return [
        SeedRun(
            **{
                **d,
                "predictions": pd.DataFrame(d["predictions"]),
                "allocation": {(t, s): n for t, s, n in d["allocation"]},
            }
        )
        for d in json.loads(text)
    ]


def _write_audit(path: Path, trial_id: str, start: float, runs, computed: list[int]) -> None:
    entries = json.loads(path.read_text()) if path.exists() else []
    entry = {
        "trial_id": trial_id,
        "start": start,
        "seeds": [r.seed for r in runs],
        "computed": computed,
        **AUDIT.to_dict(),
    }
    entries = [e for e in entries if e["start"] != start] + [entry]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries))
    tmp.replace(path)


def run_trial(config: dict, ctx: TrialContext) -> None:
    """Tune function trainable (wrapped with tune.with_parameters(ctx=...))."""
    import torch
    from ray import tune

    from ..run_logger import WAIT_S
    from ..tracking import log_datasets

    torch.set_num_threads(ctx.threads)  # several trials share the cores; extra threads only spin
    start, trial_id = time.time(), tune.get_context().get_trial_id()
    AUDIT.reset()
    cfg = trial_config(ctx.base, config)
    # a trial does not stall on a server that is down: its first call waits WAIT_S, then it goes on
    log = trial_logger(ctx, trial_id, ctx.parent_run_id, wait_s=0)
    pool = cfg.synthetic[0] if cfg.synthetic else ""
    log.params(
        {
            "trial_id": trial_id,
            "ratio": cfg.ratio,
            "allocation": cfg.allocation,
            **({"lr": cfg.lr} if cfg.classifier == "cnn" else {"C": cfg.C}),
            "classifier": cfg.classifier,
            "seeds": cfg.seeds,
            **pool_info(pool),
        }
    )
    log_datasets(log, {"real": cfg.real, "synthetic": cfg.synthetic})
    runs = []
    ckpt = tune.get_checkpoint()
    if ckpt is not None:  # resumed: keep the seeds already done
        with ckpt.as_directory() as d:
            runs = runs_from_json((Path(d) / RUNS_FILE).read_text())
    encoder = LazyEncoder(cfg.encoder, ctx.encoder_name)
    inputs = load_inputs(cfg, encoder)
    audit = Path(ctx.audit_dir) / f"{trial_id}.json"
    computed: list[int] = []  # seeds computed by this start (a resumed trial skips finished ones)
    todo = cfg.seeds[len(runs) :] or [None]  # None: restored with every seed done; report once more
    for seed in todo:
        if seed is not None:
            runs.append(run_seed(cfg, inputs, seed))
            computed.append(seed)
        res = DownstreamResult(cfg, runs)
        ms = res.mean_sem
        step = len(runs) - 1
        log.metrics(
            {
                **{f"val_{k}": v for k, v in runs[-1].metrics.items()},
                **{f"val_{k}_mean": m for k, (m, _) in ms.items()},
                "n_real": runs[-1].n_real,
                "n_synthetic": runs[-1].n_synthetic,
                "effective_ratio": res.effective_ratio,
            },
            step=step,
        )
        log_artifacts(log, res, "val", pd.Series(ctx.baseline_sites), label="this trial")
        if step == 0 and pool:
            log.artifact_bytes(plots.pool_grid(pool), "pool_samples.png")
        # before tune.report: Tune may stop the trial there. In an outage the queue goes to the trial's
        # spill folder after WAIT_S (the study's end delivers it), not after the full wait per seed.
        log.flush(WAIT_S)
        _write_audit(audit, trial_id, start, runs, computed)
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / RUNS_FILE).write_text(runs_to_json(runs))
            tune.report(
                {
                    "objective": ms[ctx.metric][0],
                    "objective_sem": ms[ctx.metric][1],
                    "seeds_done": len(runs),
                    "n_synthetic": runs[-1].n_synthetic,
                    "effective_ratio": res.effective_ratio,
                    "mlflow_run_id": log.run_id or "",  # "": not made yet (server down)
                },
                checkpoint=tune.Checkpoint.from_directory(d),
            )
