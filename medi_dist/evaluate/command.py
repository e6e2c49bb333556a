"""`medi-dist evaluate fidelity` and `medi-dist evaluate downstream`: parsers and handlers (cli.py
adds them with `add_evaluate_parser(sub)`).

Handlers raise ValueError/FileNotFoundError subclasses for bad input; cli.main prints them as one
line. Both commands print a table and say where the MLflow record is.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .allocation import ALLOCATIONS
from .downstream import BASELINES

ENCODERS_HELP = (
    "random-conv[:DIM[:SEED]], uni:PATH, uni2-h:PATH, timm:ARCH:PATH, openclip:NAME:PATH or "
    "inception:PATH (weights from a local file)"
)


def _downstream(args: argparse.Namespace) -> None:
    from ..ray_setup import check_job_paths
    from .downstream import DownstreamConfig, baseline

    check_job_paths(
        {
            "--real": args.real,
            "--cache-dir": args.cache_dir,
            "--out": args.out,
            **{f"--synthetic[{i}]": p for i, p in enumerate(args.synthetic)},
        },
        {"$MLFLOW_TRACKING_URI": None} if args.mlflow_run else None,
    )
    ratios = list(dict.fromkeys(args.ratio))
    base = DownstreamConfig(
        real=args.real,
        synthetic=args.synthetic,
        classifier=args.classifier,
        encoder=args.encoder,
        allocation=args.allocation,
        seeds=args.seeds,
        k_sites=args.k_sites,
        max_per_class=args.max_per_class,
        test_split=args.test_split,
        C=args.C,
        lr=args.lr,
        epochs=args.epochs,
        image_size=args.image_size,
        cache_dir=args.cache_dir,
        jitter=args.jitter,
    )
    # Real-only always runs first: the same real tiles per seed, so every delta below is paired.
    arms = {"real only": {"ratio": 0.0}}
    arms.update({name: baseline(name) for name in dict.fromkeys(args.baselines)})  # on real tiles only
    arms.update({f"r={r:g} {args.allocation}": {"ratio": r} for r in ratios if r != 0})
    if any(r < 0 for r in ratios):
        from .downstream import DownstreamError

        raise DownstreamError(f"--ratio must be >= 0, got {min(ratios)}")
    if args.mlflow_run:
        from ..tracking import ended_as

        with ended_as(_open_downstream_run(args)) as logger:  # FAILED (KILLED on Ctrl-C) if it does not finish
            cmp = _compare(args, base, arms)
            _log_downstream(logger, args, cmp)
    else:
        _compare(args, base, arms)


def _compare(args: argparse.Namespace, base, arms: dict):
    """The arms compared; the table, the paired differences and the files of --out."""
    from .downstream import compare, verdict
    from .ray_fits import run_parallel

    cmp = compare(base, arms, run_parallel if args.parallel else None)
    print(f"held-out split {args.test_split!r}, classifier {args.classifier}, seeds {args.seeds} (mean ± SEM)")
    print(cmp.table())
    for label, d in cmp.deltas().items():
        print(
            f"paired difference {label} - real only: "
            + ", ".join(f"{k} {m:+.3f} ± {s:.3f}" for k, (m, s) in d.items())
            + f" -> {verdict(*d['balanced_accuracy'])} (balanced accuracy)"
        )
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
    if not args.mlflow_run:
        print(f"per (type, site) on the held-out split, arm {list(arms)[-1]!r}:")
        print(last.subgroups().to_string(index=False, float_format="%.3f"))
    return cmp


def _open_downstream_run(args: argparse.Namespace):
    """The --mlflow-run run, opened (found by its name, set running again) before the work, with its
    params and inputs. A tracking server that is down does not stop the evaluation (as evaluate
    fidelity, tracking.open_run): the calls go to <--out, else .>/mlflow-spill/<run name> and are
    uploaded when it is back."""
    from ..tracking import SPILL_DIR, log_datasets, open_run, tracking_uri

    uri = tracking_uri()
    spill = Path(args.out or ".").resolve() / SPILL_DIR / args.mlflow_run.replace("/", "_")
    log = open_run(uri, args.mlflow_run, str(spill), tags={"medi_dist.kind": "downstream"})
    log.status("RUNNING")
    log.params(
        {
            "real": args.real,
            "synthetic": args.synthetic,
            "classifier": args.classifier,
            "encoder": args.encoder,
            "allocation": args.allocation,
            "ratios": args.ratio,
            "seeds": args.seeds,
            "k_sites": args.k_sites,
            "max_per_class": args.max_per_class,
            "test_split": args.test_split,
        }
    )
    log_datasets(log, {"real": args.real, "synthetic": args.synthetic})
    return log


def _log_downstream(log, args: argparse.Namespace, cmp) -> None:
    from .result_log import log_result

    real, last = cmp.results["real only"], list(cmp.results.values())[-1]
    log_result(log, last, "test", baseline=real if last is not real else None)
    log.artifact_bytes((cmp.table() + "\n").encode(), "table.txt")
    print(
        f"MLflow run {args.mlflow_run!r} in {log.uri}; open it with `mlflow ui --backend-store-uri {log.uri}`"
        + ("" if log.run_id else f" (the server is down: its calls wait in {log.spill_dir})")
    )


def add_downstream_parser(evaluate_subparsers) -> argparse.ArgumentParser:
    p = evaluate_subparsers.add_parser(
        "downstream",
        help="held-out-site classifier: real only vs real + synthetic at ratio r",
        description="Train a classifier on real train-split tiles (optionally k random sites, at most m per class) "
        "plus synthetic tiles at ratio r, allocated over (type, site) subgroups; test on held-out sites. "
        "Real-only is always run on the same real tiles per seed, so differences are paired.",
    )
    p.add_argument("--real", required=True, help="real dataset directory (from `medi-dist ingest`)")
    p.add_argument("--synthetic", nargs="*", default=[], metavar="DIR", help="synthetic pool directories")
    p.add_argument("--classifier", choices=["linear", "cnn"], default="linear")
    p.add_argument("--encoder", default="random-conv", help="linear probe features: " + ENCODERS_HELP)
    p.add_argument("--ratio", type=float, nargs="+", default=[0.0], help="synthetic tiles per real tile (one arm each)")
    p.add_argument("--allocation", choices=ALLOCATIONS, default="inverse-frequency")
    p.add_argument(
        "--baselines",
        nargs="+",
        default=[],
        choices=[b for b in BASELINES if b != "none"],
        help="arms without a generator, on the same real tiles (cnn): HED stain jitter (one jittered "
        "copy per real tile), re-staining into other training sites' stains (restain: Macenko per site; "
        "restain-sites: the sites' stains MeDi's stain composition uses), Macenko normalisation of every "
        "slide, (type, site)-balanced sampling",
    )
    p.add_argument("--jitter", type=float, default=0.05, help="HED jitter strength (0.05 HED-light, 0.2 HED-strong)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--parallel",
        action="store_true",
        help="fit every (arm, seed) as a Ray task of one CPU and one torch thread, as many at once as the "
        "cluster has CPUs (the same predictions whichever worker runs a fit; not those of a multi-thread fit)",
    )
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


def _fidelity(args: argparse.Namespace) -> None:
    from .fidelity_job import FidelityConfig, evaluate_fidelity

    res = evaluate_fidelity(
        FidelityConfig(
            real=args.real,
            synthetic=args.synthetic,
            encoder=args.encoder,
            out=args.out,
            real_splits=args.real_splits,
            resolution=args.resolution,
            min_per_group=args.min_per_group,
            device=args.device,
            conditional=not args.no_conditional,
            tracking_uri=args.tracking_uri,
            run_name=args.run_name,
            log_mlflow=not args.no_mlflow,
        )
    )
    ca, ch = res["conditional_accuracy"], res["chance"]
    fd = res["fd"]
    print(
        f"FD overall {fd['overall']:.3f}, mean over {len(fd['groups'])} subgroups "
        f"{fd['mean_group_fd']:.3f} ({res['encoder']}, {res['resolution']} px)"
    )
    no_real = [g for g, why in fd["skipped"].items() if why.startswith("0 real")]
    few = [g for g in fd["skipped"] if g not in no_real]
    if no_real:
        print(
            f"  {len(no_real)} subgroups have no real tiles to compare with (pairs unseen in --real-splits), "
            f"e.g. {no_real[0]}"
        )
    if few:
        print(
            f"  {len(few)} subgroups have too few tiles for an FD, e.g. {few[0]}: {fd['skipped'][few[0]]}; "
            "lower --min-per-group or generate more tiles"
        )
    if not ca:
        return
    cal = res["calibrated"]
    if cal:
        print(
            f"calibrated probes ({cal['probes']}; chance: type {ch['type_accuracy']:.3f}, "
            f"stain {ch['site_accuracy']:.3f}), each with its ceiling on fresh ground truth:"
        )
        for part in ("seen", "unseen"):
            c, top = cal["synthetic"][part], cal["ceiling"][part]
            line = (
                f"  {part:6s} pairs (n={c['n']}): type {c['type_accuracy']:.3f} "
                f"(ceiling {top['type_accuracy']:.3f}), "
                f"stain {c['stain_accuracy']:.3f} (ceiling {top['stain_accuracy']:.3f})"
            )
            if part == "unseen":
                line += f", leakage {c['leakage']:.3f} (ground truth {top['leakage']:.3f})"
            print(line)
    print(
        f"probes trained on real tiles{'' if cal else ' (no ground truth for this dataset)'}, CONFOUNDED: each site "
        "belongs to one type there, so the site numbers read morphology too and misjudge unseen pairs "
        f"(chance: type {ch['type_accuracy']:.3f}, site {ch['site_accuracy']:.3f}); "
        "type from features | grayscale features, site from features | stain statistics:"
    )
    for part in ("seen", "unseen"):
        c = ca[part]
        print(
            f"  {part:6s} pairs (n={c['n']}): type {c['type_accuracy']:.3f} | {c['type_accuracy_morphology']:.3f}, "
            f"site {c['site_accuracy']:.3f} | {c['site_accuracy_stain']:.3f}"
        )
    if res["real_reference"]:
        ref = {k: round(v, 3) for k, v in res["real_reference"].items()}
        print("real tiles of held-out slides (the probes' own ceiling): " + json.dumps(ref))


def add_fidelity_parser(evaluate_sub) -> argparse.ArgumentParser:
    f = evaluate_sub.add_parser(
        "fidelity",
        help="Fréchet distance and conditional accuracy of synthetic vs real tiles",
        description="FD per (type, site) subgroup and overall in an encoder's feature space, and how often "
        "synthetic tiles show the requested type and site (probes trained on real tiles), for seen and unseen "
        "pairs. Results go to a JSON file and an MLflow run.",
    )
    f.add_argument("--real", required=True, help="real dataset directory")
    f.add_argument("--synthetic", required=True, help="synthetic dataset directory (from `medi-dist generate`)")
    f.add_argument("--encoder", default="random-conv", help=ENCODERS_HELP)
    f.add_argument("--out", help="results JSON (default: <synthetic>/fidelity.json)")
    f.add_argument("--real-splits", nargs="+", default=["train"])
    f.add_argument("--resolution", type=int, help="compare at this size (default: the synthetic tiles' size)")
    f.add_argument("--min-per-group", type=int, default=10)
    f.add_argument("--device", default="cpu")
    f.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    f.add_argument("--run-name", help="MLflow run name (default: fidelity-<synthetic dir>)")
    f.add_argument("--no-conditional", action="store_true", help="Fréchet distances only (no type/site probes)")
    f.add_argument("--no-mlflow", action="store_true")
    f.set_defaults(func=_fidelity)
    return f


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    ev = subparsers.add_parser("evaluate", help="fidelity of synthetic tiles, downstream classifiers on held-out sites")
    sub = ev.add_subparsers(dest="evaluate_command", required=True)
    add_fidelity_parser(sub)
    add_downstream_parser(sub)
    return ev
