"""`medi-dist tune`: its parser and handler (cli.py adds it with `add_tune_parser(sub)`)."""

from __future__ import annotations

import argparse

from ..config_loader import add_config_arguments, config_from_args
from .config import StudyConfig


def _tune(args: argparse.Namespace) -> None:
    from ..tracking import tracking_uri
    from .study import run_study, summary

    cfg = config_from_args(StudyConfig, args)
    if cfg is None:
        return
    res = run_study(cfg)
    print(summary(res, cfg.metric))
    if res.test is None and cfg.final_eval:
        print("(the holdout was already scored for this best trial; see the parent run's test_table.txt)")
    uri = tracking_uri(cfg.tracking_uri)
    print(
        f"study {res.path}; MLflow parent run {res.parent_run_id} (experiment {cfg.experiment!r}): "
        f"`mlflow ui --backend-store-uri {uri}`"
    )


def add_tune_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "tune",
        help="Ray Tune study over synthetic ratio, allocation, pool and classifier lr",
        description="Select augmentation settings on validation sites (ASHA, trials in parallel on Ray), then\n"
        "re-evaluate the best once on the held-out sites. Run the same command again to resume.\n"
        "Settings come from --config (YAML, see jobs/tune_small.yaml) and field=value overrides.",
    )
    add_config_arguments(p, StudyConfig, "study", "name=s2 num_samples=8 space.ratio=[0,1]")
    p.set_defaults(func=_tune)
    return p
