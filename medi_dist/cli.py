"""`medi-dist` command line: a thin layer over the package; user errors print one clear line.

Each command's parser and handler live with its package (`data/command.py`, `train/command.py`,
`generate/command.py`, `evaluate/command.py`, `tune/command.py`); this module wires them together.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .config_loader import ConfigError
from .metadata import SchemaError, UnknownValueError

# ModelDirError and CheckpointError (bad model directory / checkpoint) are ValueErrors too.
USER_ERRORS = (SchemaError, UnknownValueError, ConfigError, OSError, ValueError)


def _demo(args: argparse.Namespace) -> None:
    from .demo import QUICK_DEMO, DemoConfig, run_demo
    from .demo_report import format_summary
    from .storage import is_remote, local_path

    cfg = DemoConfig(**QUICK_DEMO) if args.quick else DemoConfig()
    given = (
        "out types sites tiles seed train_steps seeds composition calibration_tiles stain min_snr_gamma guidance "
        "guidance_interval"
    )
    for name in given.split():
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    cfg.separate_class_only = args.separate_class_only
    cfg.scanner_lines = not args.stain_only
    uri = cfg.out if is_remote(cfg.out) else None
    if uri:  # object storage: run in a local staging folder, upload at the end (demo_storage.py)
        from .demo_storage import check_remote_out, staging_dir, upload_demo

        check_remote_out(uri)
        cfg.out = str(staging_dir(uri))
    else:
        cfg.out = str(local_path(cfg.out))  # file://
    summary = run_demo(cfg)
    if uri:
        upload_demo(Path(cfg.out), uri)
    print(format_summary(summary))
    if uri:
        print(f"uploaded to {uri} (a re-run continues from the local copy {cfg.out})")


def _check_ray(args: argparse.Namespace) -> None:
    from .ray_setup import check_ray

    print(check_ray(args.address))


def build_parser() -> argparse.ArgumentParser:
    from .data.command import add_data_parser, add_ingest_parser
    from .evaluate.command import add_evaluate_parser
    from .generate.command import add_generate_parser
    from .train.command import add_train_parser
    from .tune.command import add_tune_parser

    p = argparse.ArgumentParser(
        prog="medi-dist",
        description=__doc__.split(":")[0] + ": metadata-guided diffusion for histopathology tiles on Ray.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    p.add_argument(
        "--parent-run",
        metavar="NAME",
        help="MLflow: make this command's runs children of the job run NAME (created by the first command that "
        "names it; same as $MEDI_DIST_PARENT_RUN=NAME)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    add_ingest_parser(sub)
    add_data_parser(sub)
    add_train_parser(sub)
    add_generate_parser(sub)
    add_evaluate_parser(sub)
    add_tune_parser(sub)
    demo = sub.add_parser(
        "demo",
        help="the whole MeDi story on the built-in dataset (about 15 min on 2 cores)",
        description="Ingest a procedural H&E dataset with a site<->type confound, train a MeDi model (its "
        "site-nulled branch is the class-only arm), generate unseen (type, site) pairs and reference "
        "pools, and compare classifiers and stain baselines on held-out sites. Re-running continues "
        "from what --out already holds.",
    )
    demo.add_argument(
        "--out",
        default=None,
        help="output folder or s3:// / gs:// URI (run in a local copy, uploaded at the end; default "
        "demo-output, demo-quick with --quick)",
    )
    demo.add_argument("--types", type=int, default=None, help="cancer types of the procedural world (default 4)")
    demo.add_argument(
        "--sites", type=int, default=None, help="tissue source sites, dealt out over the types (default 12)"
    )
    demo.add_argument("--tiles", type=int, default=None, help="procedural tiles to ingest (default 3000)")
    demo.add_argument("--seed", type=int, default=None, help="the world (tiles, split) and the generator's training")
    demo.add_argument("--train-steps", type=int, default=None, help="generator training steps (default 600)")
    demo.add_argument(
        "--min-snr",
        dest="min_snr_gamma",
        type=float,
        default=None,
        help="Min-SNR loss weighting gamma of the generator's training (default 5; 0: plain loss)",
    )
    demo.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance of both model pools (default 1.5; 1: none, ~0.5 min less)",
    )
    demo.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="guide only at diffusion times t/T in [LO, HI] (1: pure noise; default 0 0.5)",
    )
    demo.add_argument("--seeds", type=int, nargs="+", default=None, help="classifier seeds (default 0 1 2 3)")
    demo.add_argument(
        "--composition",
        choices=["stain", "joint"],
        default=None,
        help="MeDi's pool: stain (default: each type drawn at its own training sites, moved to the requested "
        "site by the sites' estimated stains) or joint (the network's own (type, site) prediction)",
    )
    demo.add_argument(
        "--calibration-tiles",
        type=int,
        default=None,
        help="stain composition: the network's draws per training site that map its stain concentrations onto "
        "the site's real ones (default 32; 0: not calibrated)",
    )
    demo.add_argument(
        "--stain",
        choices=["reference", "as-stored"],
        default=None,
        help="as-stored (default: the network draws each site's stain itself) or reference (it draws in one "
        "reference stain and each tile is rendered in its site's: data.stain=reference)",
    )
    demo.add_argument(
        "--stain-only",
        action="store_true",
        help="a world whose sites differ by stain only (no scanner lines): stain baselines saturate it",
    )
    demo.add_argument(
        "--separate-class-only",
        action="store_true",
        help="also train a class-only model (the MeDi paper's comparison) besides the site-nulled arm",
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run in a few minutes (small world, short training); its numbers mean nothing",
    )
    demo.set_defaults(func=_demo)

    chk = sub.add_parser(
        "check-ray",
        help="check in seconds that Ray can be joined, or that `ray job submit` reaches a cluster's job API",
        description="Without --address: join the cluster train/generate/tune/demo "
        "would join (RAY_ADDRESS, else the one `ray start` recorded; none: they start a local "
        "instance). With --address: check `ray job submit --address URL` (reachable, Ray's "
        "dashboard, token accepted). A problem is one line naming the fix, exit 2.",
    )
    chk.add_argument("--address", help="the job API address given to `ray job submit`, e.g. http://127.0.0.1:8265")
    chk.set_defaults(func=_check_ray)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.parent_run:
        from .tracking import PARENT_ENV

        os.environ[PARENT_ENV] = args.parent_run
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        args.func(args)
    except USER_ERRORS as e:
        if args.verbose:
            raise
        where = f" ({e.filename})" if isinstance(e, OSError) and e.filename and str(e.filename) not in str(e) else ""
        print(f"medi-dist {args.command}: error: {e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: one line (train says how to resume), the shell's 130
        if args.verbose:
            raise
        print(f"medi-dist {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
