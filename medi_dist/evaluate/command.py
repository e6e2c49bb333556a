"""Command-line parts for `medi-dist evaluate downstream` and `medi-dist tune` (wired in cli.py).

Handlers raise ValueError/FileNotFoundError subclasses for bad input; cli.main prints them as one
line. Both commands print a table and say where the MLflow record is.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .allocation import ALLOCATIONS
from .downstream import BASELINES


def _downstream(args: argparse.Namespace) -> None:
    from ..ray_setup import check_job_paths
    from .downstream import DownstreamConfig, baseline, compare, verdict

    check_job_paths({"--real": args.real, "--cache-dir": args.cache_dir, "--out": args.out,
                     **{f"--synthetic[{i}]": p for i, p in enumerate(args.synthetic)}},
                    {"$MLFLOW_TRACKING_URI": None} if args.mlflow_run else None)
    ratios = list(dict.fromkeys(args.ratio))
    base = DownstreamConfig(real=args.real, synthetic=args.synthetic, classifier=args.classifier, encoder=args.encoder,
                            allocation=args.allocation, seeds=args.seeds, k_sites=args.k_sites,
                            max_per_class=args.max_per_class, test_split=args.test_split, C=args.C, lr=args.lr,
                            epochs=args.epochs, image_size=args.image_size, cache_dir=args.cache_dir,
                            jitter=args.jitter)
    # Real-only always runs first: the same real tiles per seed, so every delta below is paired.
    arms = {"real only": {"ratio": 0.0}}
    arms.update({name: baseline(name) for name in dict.fromkeys(args.baselines)})  # on real tiles only
    arms.update({f"r={r:g} {args.allocation}": {"ratio": r} for r in ratios if r != 0})
    if any(r < 0 for r in ratios):
        from .downstream import DownstreamError

        raise DownstreamError(f"--ratio must be >= 0, got {min(ratios)}")
    cmp = compare(base, arms)
    print(f"held-out split {args.test_split!r}, classifier {args.classifier}, seeds {args.seeds} (mean ± SEM)")
    print(cmp.table())
    for label, d in cmp.deltas().items():
        print(f"paired difference {label} - real only: "
              + ", ".join(f"{k} {m:+.3f} ± {s:.3f}" for k, (m, s) in d.items())
              + f" -> {verdict(*d['balanced_accuracy'])} (balanced accuracy)")
    for r in cmp.results.values():
        if r.shortfall():
            print(f"warning: {r.shortfall()}")
    last = cmp.results[list(arms)[-1]]
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({k: r.to_dict() for k, r in cmp.results.items()}, indent=2))
        (out / "table.txt").write_text(cmp.table() + "\n")
        for k, r in cmp.results.items():
            r.subgroups().to_csv(out / f"subgroups_{k.replace(' ', '_').replace('=', '')}.csv", index=False)
        print(f"wrote {out}/results.json, table.txt and per-(type, site) tables")
    if args.mlflow_run:
        _log_downstream(args, cmp, last)
    else:
        print(f"per (type, site) on the held-out split, arm {list(arms)[-1]!r}:")
        print(last.subgroups().to_string(index=False, float_format="%.3f"))


def _log_downstream(args, cmp, last) -> None:
    from ..tracking import RunLogger, find_or_create_run, log_datasets, tracking_uri
    from ..tune.report import log_result

    uri = tracking_uri()
    log = RunLogger(uri, find_or_create_run(uri, args.mlflow_run, tags={"medi_dist.kind": "downstream"}))
    log.params({"real": args.real, "synthetic": args.synthetic, "classifier": args.classifier, "encoder": args.encoder,
                "allocation": args.allocation, "ratios": args.ratio, "seeds": args.seeds, "k_sites": args.k_sites,
                "max_per_class": args.max_per_class, "test_split": args.test_split})
    real = cmp.results["real only"]
    log_result(log, last, "test", baseline=real if last is not real else None)
    log_datasets(log, {"real": args.real, "synthetic": args.synthetic})
    log.artifact_bytes((cmp.table() + "\n").encode(), "table.txt")
    log.finish()
    print(f"MLflow run {args.mlflow_run!r} in {uri}; open it with `mlflow ui --backend-store-uri {uri}`")


def add_downstream_parser(evaluate_subparsers) -> argparse.ArgumentParser:
    p = evaluate_subparsers.add_parser(
        "downstream", help="held-out-site classifier: real only vs real + synthetic at ratio r",
        description="Train a classifier on real train-split tiles (optionally k random sites, at most m per class) "
        "plus synthetic tiles at ratio r, allocated over (type, site) subgroups; test on held-out sites. "
        "Real-only is always run on the same real tiles per seed, so differences are paired.")
    p.add_argument("--real", required=True, help="real dataset directory (from `medi-dist ingest`)")
    p.add_argument("--synthetic", nargs="*", default=[], metavar="DIR", help="synthetic pool directories")
    p.add_argument("--classifier", choices=["linear", "cnn"], default="linear")
    p.add_argument("--encoder", default="random-conv",
                   help="linear probe features: random-conv[:DIM[:SEED]], uni:PATH, uni2-h:PATH, timm:ARCH:PATH, openclip:NAME:PATH or inception:PATH (weights from a local file)")
    p.add_argument("--ratio", type=float, nargs="+", default=[0.0], help="synthetic tiles per real tile (one arm each)")
    p.add_argument("--allocation", choices=ALLOCATIONS, default="inverse-frequency")
    p.add_argument("--baselines", nargs="+", default=[], choices=[b for b in BASELINES if b != "none"],
                   help="arms without a generator, on the same real tiles (cnn): HED stain jitter (one jittered "
                   "copy per real tile), re-staining into other training sites' stains, Macenko normalisation of "
                   "every slide, (type, site)-balanced sampling")
    p.add_argument("--jitter", type=float, default=0.05, help="HED jitter strength (0.05 HED-light, 0.2 HED-strong)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--k-sites", type=int, default=None, help="train on k random real sites (low-data regime)")
    p.add_argument("--max-per-class", type=int, default=None, help="at most m real tiles per class")
    p.add_argument("--test-split", default="holdout", help="split to test on (holdout; val for selection)")
    p.add_argument("--C", type=float, default=1.0, help="linear probe inverse regularisation")
    p.add_argument("--lr", type=float, default=3e-3, help="CNN learning rate")
    p.add_argument("--epochs", type=int, default=8, help="CNN epochs")
    p.add_argument("--image-size", type=int, default=32, help="CNN input size (real and synthetic alike)")
    p.add_argument("--cache-dir", default="medi-dist-cache", help="encoder feature cache")
    p.add_argument("--out", help="write results.json, table.txt and per-subgroup CSVs here")
    p.add_argument("--mlflow-run", help="also log to this MLflow run ($MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.set_defaults(func=_downstream)
    return p


def _tune(args: argparse.Namespace) -> None:
    from ..config import load_config
    from ..tracking import tracking_uri
    from ..tune import StudyConfig, run_study, summary

    cfg = load_config(StudyConfig, args.config, args.overrides)
    res = run_study(cfg)
    print(summary(res, cfg.metric))
    if res.test is None and cfg.final_eval:
        print("(the holdout was already scored for this best trial; see the parent run's test_table.txt)")
    uri = tracking_uri(cfg.tracking_uri)
    print(f"study {res.path}; MLflow parent run {res.parent_run_id} (experiment {cfg.experiment!r}): "
          f"`mlflow ui --backend-store-uri {uri}`")


def add_tune_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "tune", help="Ray Tune study over synthetic ratio, allocation, pool and classifier lr",
        description="Select augmentation settings on validation sites (ASHA, trials in parallel on Ray), then "
        "re-evaluate the best once on the held-out sites. Run the same command again to resume. Settings come "
        "from --config (YAML, see jobs/tune_small.yaml) and overrides like num_samples=8 space.ratio=[0,1].")
    p.add_argument("--config", help="YAML study config")
    p.add_argument("overrides", nargs="*", help="field=value overrides (e.g. name=s2 cpus_per_trial=2)")
    p.set_defaults(func=_tune)
    return p
