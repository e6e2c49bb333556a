"""`medi-dist` command line: a thin layer over the package; user errors print one clear line."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .metadata import SchemaError, UnknownValueError
from .config import ConfigError

# ModelDirError and CheckpointError (bad model directory / checkpoint) are ValueErrors too.
USER_ERRORS = (SchemaError, UnknownValueError, ConfigError, OSError, ValueError)


def _ingest(args: argparse.Namespace) -> None:
    from .data import sources
    from .data.ingest import ingest
    from .data.records import SkipLog
    from .data.split import SplitConfig
    from .data.stats import dataset_stats, format_stats

    skips = SkipLog()
    args.source = _pick_source(args)
    if args.source == "procedural":
        from .data.procedural import ProceduralConfig

        scan = sources.procedural(ProceduralConfig(
            n_types=args.types, n_sites=args.sites, n_tiles=args.tiles, size=args.size, seed=args.seed,
            scanner_lines=args.scanner_lines))
    elif args.source == "tcga-ut":
        _need(args, "root", "metadata")
        scan = sources.tcga_ut(args.root, args.metadata, skips)
    elif args.source == "manifest":
        _need(args, "manifest")
        scan = sources.manifest(args.manifest, skips, args.image_column, args.categorical, args.continuous)
    else:  # wsi
        _need(args, "slides")
        from .data.wsi import WSIConfig

        scan = sources.wsi_scan(args.slides, WSIConfig(tile_px=args.tile_px, mpp=args.mpp, assume_mpp=args.assume_mpp,
                                               max_tiles_per_slide=args.max_tiles_per_slide), skips)
    split = SplitConfig(args.holdout_fraction, args.val_fraction, args.seed)
    ingest(scan, args.out, split, skips, shard_mb=args.shard_mb, overwrite=args.overwrite,
           max_skipped_fraction=args.max_skipped_fraction, workers=args.workers)
    print(f"wrote {args.out}")
    if skips.entries:
        print(skips.summary())
    print(format_stats(dataset_stats(args.out)))


# The flags that name each source's input; --source defaults to the one whose input is given.
SOURCE_INPUTS = {"manifest": ("manifest",), "tcga-ut": ("root", "metadata"), "wsi": ("slides",)}


def _pick_source(args: argparse.Namespace) -> str:
    given = {src: [f"--{f}" for f in flags if getattr(args, f) is not None] for src, flags in SOURCE_INPUTS.items()}
    given = {src: flags for src, flags in given.items() if flags}
    if args.source is None:
        if len(given) > 1:
            flags = " and ".join(f for fl in given.values() for f in fl)
            raise ConfigError(f"{flags} are inputs of different sources ({', '.join(given)}); give one source's "
                              "inputs, or name it with --source")
        return next(iter(given), "procedural")
    other = {src: flags for src, flags in given.items() if src != args.source}
    if other:
        src, flags = next(iter(other.items()))
        raise ConfigError(f"--source {args.source} does not read {' '.join(flags)} (an input of --source {src}); "
                          f"drop {'it' if len(flags) == 1 else 'them'} or drop --source")
    return args.source


def _need(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is None]
    if missing:
        raise ConfigError(f"--source {args.source} needs {' and '.join(missing)}")


def _stats(args: argparse.Namespace) -> None:
    from .data.stats import dataset_stats, format_stats

    s = dataset_stats(args.dir, verify=args.verify)
    if args.json:
        s["table"] = s["table"].to_dict()
        print(json.dumps(s, indent=2))
    else:
        print(format_stats(s))


def _train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .train.config import TrainConfig

    cfg = load_config(TrainConfig, args.config, args.overrides)  # fail fast, before heavy imports
    from .train.trainer import train

    res = train(cfg)
    m = res.metrics
    if res.finished_before:
        print(f"run {cfg.run.name} already finished at step {m['step']}; model directory: {res.model_dir} "
              "(raise steps to train further)")
        return
    print(f"run {cfg.run.name}: step {m.get('step')} of {cfg.steps}, loss {m.get('loss', float('nan')):.4f}, "
          f"ranks in sync: {bool(m.get('ranks_in_sync'))}, worker nodes: {m.get('worker_nodes')}, "
          f"skipped tiles: {res.skipped_tiles}")
    if res.model_dir:
        print(f"model directory: {res.model_dir}")
    else:
        print(f"stopped early; run the same command again to resume run {cfg.run.name!r}")
    print(f"MLflow run {res.mlflow_run_id}: `mlflow ui --backend-store-uri {_uri(cfg.run.tracking_uri)}`")


def _demo(args: argparse.Namespace) -> None:
    from .demo import QUICK_DEMO, DemoConfig, format_summary, run_demo

    cfg = DemoConfig(**QUICK_DEMO) if args.quick else DemoConfig()
    for name in ("out", "types", "sites", "tiles", "seed", "train_steps", "seeds"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    cfg.separate_class_only = args.separate_class_only
    cfg.scanner_lines = not args.stain_only
    print(format_summary(run_demo(cfg)))


def _uri(uri: str | None) -> str:
    from .tracking import tracking_uri

    return tracking_uri(uri)


INGEST_EPILOG = """\
manifest columns (--source manifest; the --slides table of --source wsi takes the same metadata):
  path                image file (--image-column names another column); JPEG/PNG stored as is,
                      TIFF/BMP/WebP re-encoded as PNG. A relative path is read from the manifest's
                      folder, not from the current directory.
  cancer_type         required
  tissue_source_site  required (the hospital; splits never share one)
  key                 optional unique tile name; default <slide_id>-<file name without extension>
  slide_id            optional; without it the key is <file name>-<file name>, so two slides'
                      0_0.png collide: add slide_id (or key) when tile names repeat across slides
  sex, race           optional categorical conditions (--categorical adds more)
  age                 optional number (--continuous names others). Empty, NA, N/A, '--,
                      not reported, unknown (any case) are missing; '>89' and '90+' are 90; other
                      words are read as missing and listed in the summary and dataset.json
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medi-dist", description=__doc__.split(":")[0] + ": metadata-guided diffusion "
                                "for histopathology tiles on Ray.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    ing = sub.add_parser("ingest", help="turn tiles into a sharded, site-split dataset directory",
                         description="Read tiles from a source, split sites (disjoint, seeded), write WebDataset "
                         "shards + index.parquet + vocab.json + split.json into --out.",
                         epilog=INGEST_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ing.add_argument("--source", choices=["procedural", "tcga-ut", "manifest", "wsi"], default=None,
                     help="default: the source whose input is given (--manifest, --root/--metadata, --slides); "
                     "procedural when none is")
    ing.add_argument("--out", required=True, help="dataset directory to create: a path, s3://, gs:// or file:// URI")
    ing.add_argument("--seed", type=int, default=0, help="seed for the split (and procedural tiles)")
    ing.add_argument("--holdout-fraction", type=float, default=0.3, help="share of tiles in held-out sites")
    ing.add_argument("--val-fraction", type=float, default=0.0, help="share of tiles in validation sites (0: none)")
    ing.add_argument("--shard-mb", type=float, default=64, help="target shard size in MiB")
    ing.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ing.add_argument("--workers", type=int, default=0,
                     help="0 (default): read and check in this process; N: as Ray tasks, N at a time, across the Ray "
                     "cluster (a slide or a few hundred tiles each; the output is the same for any N). An "
                     "interrupted ingest run again reuses the finished pieces")
    ing.add_argument("--max-skipped-fraction", type=float, default=0.2,
                     help="stop, writing nothing, if more than this share of the inputs is skipped (default 0.2: a "
                     "few bad tiles are normal; past a fifth the cause is usually one systematic mistake, such as "
                     "paths relative to the wrong folder, and the split would be planned on what is left)")
    g = ing.add_argument_group("procedural (the built-in dataset; the default when no input is given)")
    g.add_argument("--types", type=int, default=4)
    g.add_argument("--sites", type=int, default=12)
    g.add_argument("--tiles", type=int, default=2000)
    g.add_argument("--size", type=int, default=64, help="tile size in pixels")
    g.add_argument("--scanner-lines", action="store_true",
                   help="each site's scanner also leaves a faint line pattern: a site shortcut that is not colour")
    g = ing.add_argument_group("tcga-ut")
    g.add_argument("--root", help="folder of <cancer type>/<slide_submitter_id>/*.jpg (or .png, .tif, ...)")
    g.add_argument("--metadata", help="GDC slide metadata CSV/TSV/Parquet (slide_submitter_id, tissue_source_site, ...)")
    g = ing.add_argument_group("manifest")
    g.add_argument("--manifest", help="CSV/Parquet, one row per tile: an image path (relative paths are read from "
                   "the manifest's folder), cancer_type, tissue_source_site; optional columns below")
    g.add_argument("--image-column", default="path")
    g.add_argument("--categorical", nargs="*", default=[], help="extra categorical metadata columns")
    g.add_argument("--continuous", nargs="*", default=[], help="continuous metadata columns (default: age if present)")
    g = ing.add_argument_group("wsi")
    g.add_argument("--slides", help="CSV/Parquet: path (relative to the table's folder), cancer_type, "
                   "tissue_source_site; optional slide_id, sex, race, age")
    g.add_argument("--tile-px", type=int, default=256)
    g.add_argument("--mpp", type=float, default=0.5, help="microns per pixel of the tiles (0.5 ~ 20x)")
    g.add_argument("--assume-mpp", type=float, default=None, help="mpp to use for slides that do not record it")
    g.add_argument("--max-tiles-per-slide", type=int, default=None)
    ing.set_defaults(func=_ingest)

    data = sub.add_parser("data", help="inspect datasets").add_subparsers(dest="data_command", required=True)
    st = data.add_parser("stats", help="tiles, sites, splits and site-type confounding of a dataset directory")
    st.add_argument("dir")
    st.add_argument("--verify", action="store_true", help="also check every shard's sha256")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_stats)
    tr = sub.add_parser("train", help="train a MeDi diffusion model with Ray Train",
                        description="Train on a dataset directory with N Ray Train workers. Settings come from "
                        "--config (YAML, see jobs/) and overrides like steps=200 run.num_workers=2 data.dataset=DIR.")
    tr.add_argument("--config", help="YAML training config (sections: data, model, optim, run)")
    tr.add_argument("overrides", nargs="*", help="section.field=value overrides")
    tr.set_defaults(func=_train)

    from .evaluate.command import add_downstream_parser, add_tune_parser
    from .generate.command import add_fidelity_parser, add_generate_parser

    add_generate_parser(sub)
    ev = sub.add_parser("evaluate", help="fidelity of synthetic tiles, downstream classifiers on held-out sites")
    evs = ev.add_subparsers(dest="evaluate_command", required=True)
    add_fidelity_parser(evs)
    add_downstream_parser(evs)
    add_tune_parser(sub)

    demo = sub.add_parser("demo", help="the whole MeDi story on the built-in dataset (about 10-12 min on 2 cores)",
                          description="Ingest a procedural H&E dataset with a site<->type confound, train a MeDi and a "
                          "class-only model, generate unseen (type, site) pairs, and compare classifiers on held-out "
                          "sites. Re-running continues from what --out already holds.")
    demo.add_argument("--out", default=None, help="output folder (default demo-output, demo-quick with --quick)")
    demo.add_argument("--types", type=int, default=None, help="cancer types of the procedural world (default 4)")
    demo.add_argument("--sites", type=int, default=None, help="tissue source sites, dealt out over the types (default 12)")
    demo.add_argument("--tiles", type=int, default=None, help="procedural tiles to ingest (default 3000)")
    demo.add_argument("--seed", type=int, default=None, help="the world (tiles, split) and the generator's training")
    demo.add_argument("--train-steps", type=int, default=None, help="generator training steps")
    demo.add_argument("--seeds", type=int, nargs="+", default=None, help="classifier seeds (default 0 1 2 3 4)")
    demo.add_argument("--stain-only", action="store_true",
                      help="a world whose sites differ by stain only (no scanner lines): stain baselines saturate it")
    demo.add_argument("--separate-class-only", action="store_true",
                      help="also train a class-only model (the MeDi paper's comparison) besides the site-nulled arm")
    demo.add_argument("--quick", action="store_true",
                      help="a smoke run in a few minutes (small world, short training); its numbers mean nothing")
    demo.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
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
