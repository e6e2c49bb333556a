"""`medi-dist train`: its parser and handler (cli.py adds it with `add_train_parser(sub)`)."""

from __future__ import annotations

import argparse

from ..config_loader import add_config_arguments, config_from_args
from .config import TrainConfig


def _train(args: argparse.Namespace) -> None:
    from ..tracking import tracking_uri, ui_link

    cfg = config_from_args(TrainConfig, args)  # fail fast, before heavy imports
    if cfg is None:
        return
    from .trainer import train

    res = train(cfg)
    m = res.metrics
    if res.finished_before:
        print(
            f"run {cfg.run.name} already finished at step {m['step']}; model directory: {res.model_dir} "
            "(raise steps to train further)"
        )
        return
    print(
        f"run {cfg.run.name}: step {m.get('step')} of {cfg.steps}, loss {m.get('loss', float('nan')):.4f}, "
        f"ranks in sync: {bool(m.get('ranks_in_sync'))}, worker nodes: {m.get('worker_nodes')}, "
        f"skipped tiles: {res.skipped_tiles}"
    )
    if res.model_dir:
        print(f"model directory: {res.model_dir}")
    else:
        print(f"stopped early; run the same command again to resume run {cfg.run.name!r}")
    uri = tracking_uri(cfg.run.tracking_uri)
    print(
        f"MLflow run {res.mlflow_run_id}: `mlflow ui --backend-store-uri {uri}`, then "
        f"{ui_link(uri, res.mlflow_run_id, cfg.run.experiment)}"
    )


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train a MeDi diffusion model with Ray Train",
        description="Train on a dataset directory with N Ray Train workers. Settings come from --config\n"
        "(YAML, see jobs/) and section.field=value overrides.",
    )
    add_config_arguments(p, TrainConfig, "training", "steps=200 run.num_workers=2 data.dataset=DIR")
    p.set_defaults(func=_train)
    return p
