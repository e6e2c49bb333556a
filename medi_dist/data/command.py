"""`medi-dist ingest` and `medi-dist data stats`: parsers and handlers (cli.py adds them with
`add_ingest_parser(sub)` and `add_data_parser(sub)`)."""

from __future__ import annotations

import argparse
import json

from ..config_loader import ConfigError


def _ingest(args: argparse.Namespace) -> None:
    from . import sources
    from .ingest import ingest
    from .records import SkipLog
    from .split import SplitConfig
    from .stats import dataset_stats, format_stats

    skips = SkipLog()
    args.source = _pick_source(args)
    if args.source == "procedural":
        from .procedural import ProceduralConfig

        scan = sources.procedural(
            ProceduralConfig(
                n_types=args.types,
                n_sites=args.sites,
                n_tiles=args.tiles,
                size=args.size,
                seed=args.seed,
                scanner_lines=args.scanner_lines,
            )
        )
    elif args.source == "tcga-ut":
        _need(args, "root", "metadata")
        scan = sources.tcga_ut(args.root, args.metadata, skips)
    elif args.source == "manifest":
        _need(args, "manifest")
        scan = sources.manifest(args.manifest, skips, args.image_column, args.categorical, args.continuous)
    else:  # wsi
        _need(args, "slides")
        from .wsi import WSIConfig

        scan = sources.wsi_scan(
            args.slides,
            WSIConfig(
                tile_px=args.tile_px,
                mpp=args.mpp,
                assume_mpp=args.assume_mpp,
                max_tiles_per_slide=args.max_tiles_per_slide,
            ),
            skips,
        )
    split = SplitConfig(args.holdout_fraction, args.val_fraction, args.seed)
    ingest(
        scan,
        args.out,
        split,
        skips,
        shard_mb=args.shard_mb,
        overwrite=args.overwrite,
        max_skipped_fraction=args.max_skipped_fraction,
        workers=args.workers,
    )
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
            raise ConfigError(
                f"{flags} are inputs of different sources ({', '.join(given)}); give one source's "
                "inputs, or name it with --source"
            )
        return next(iter(given), "procedural")
    other = {src: flags for src, flags in given.items() if src != args.source}
    if other:
        src, flags = next(iter(other.items()))
        raise ConfigError(
            f"--source {args.source} does not read {' '.join(flags)} (an input of --source {src}); "
            f"drop {'it' if len(flags) == 1 else 'them'} or drop --source"
        )
    return args.source


def _need(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is None]
    if missing:
        raise ConfigError(f"--source {args.source} needs {' and '.join(missing)}")


def _stats(args: argparse.Namespace) -> None:
    from .stats import dataset_stats, format_stats

    s = dataset_stats(args.dir, verify=args.verify)
    if args.json:
        s["table"] = s["table"].to_dict()
        print(json.dumps(s, indent=2))
    else:
        print(format_stats(s))


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


def add_ingest_parser(sub) -> argparse.ArgumentParser:
    ing = sub.add_parser(
        "ingest",
        help="turn tiles into a sharded, site-split dataset directory",
        description="Read tiles from a source, split sites (disjoint, seeded), write WebDataset "
        "shards + index.parquet + vocab.json + split.json into --out.",
        epilog=INGEST_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ing.add_argument(
        "--source",
        choices=["procedural", "tcga-ut", "manifest", "wsi"],
        default=None,
        help="default: the source whose input is given (--manifest, --root/--metadata, --slides); "
        "procedural when none is",
    )
    ing.add_argument("--out", required=True, help="dataset directory to create: a path, s3://, gs:// or file:// URI")
    ing.add_argument("--seed", type=int, default=0, help="seed for the split (and procedural tiles)")
    ing.add_argument("--holdout-fraction", type=float, default=0.3, help="share of tiles in held-out sites")
    ing.add_argument("--val-fraction", type=float, default=0.0, help="share of tiles in validation sites (0: none)")
    ing.add_argument("--shard-mb", type=float, default=64, help="target shard size in MiB")
    ing.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ing.add_argument(
        "--workers",
        type=int,
        default=0,
        help="0 (default): read and check in this process; N: as Ray tasks, N at a time, across the Ray "
        "cluster (a slide or a few hundred tiles each; the output is the same for any N). An "
        "interrupted ingest run again reuses the finished pieces",
    )
    ing.add_argument(
        "--max-skipped-fraction",
        type=float,
        default=0.2,
        help="stop, writing nothing, if more than this share of the inputs is skipped (default 0.2: a "
        "few bad tiles are normal; past a fifth the cause is usually one systematic mistake, such as "
        "paths relative to the wrong folder, and the split would be planned on what is left)",
    )
    g = ing.add_argument_group("procedural (the built-in dataset; the default when no input is given)")
    g.add_argument("--types", type=int, default=4)
    g.add_argument("--sites", type=int, default=12)
    g.add_argument("--tiles", type=int, default=2000)
    g.add_argument("--size", type=int, default=64, help="tile size in pixels")
    g.add_argument(
        "--scanner-lines",
        action="store_true",
        help="each site's scanner also leaves a faint line pattern: a site shortcut that is not colour",
    )
    g = ing.add_argument_group("tcga-ut")
    g.add_argument("--root", help="folder of <cancer type>/<slide_submitter_id>/*.jpg (or .png, .tif, ...)")
    g.add_argument(
        "--metadata", help="GDC slide metadata CSV/TSV/Parquet (slide_submitter_id, tissue_source_site, ...)"
    )
    g = ing.add_argument_group("manifest")
    g.add_argument(
        "--manifest",
        help="CSV/Parquet, one row per tile: an image path (relative paths are read from "
        "the manifest's folder), cancer_type, tissue_source_site; optional columns below",
    )
    g.add_argument("--image-column", default="path")
    g.add_argument("--categorical", nargs="*", default=[], help="extra categorical metadata columns")
    g.add_argument("--continuous", nargs="*", default=[], help="continuous metadata columns (default: age if present)")
    g = ing.add_argument_group("wsi")
    g.add_argument(
        "--slides",
        help="CSV/Parquet: path (relative to the table's folder), cancer_type, "
        "tissue_source_site; optional slide_id, sex, race, age",
    )
    g.add_argument("--tile-px", type=int, default=256)
    g.add_argument("--mpp", type=float, default=0.5, help="microns per pixel of the tiles (0.5 ~ 20x)")
    g.add_argument("--assume-mpp", type=float, default=None, help="mpp to use for slides that do not record it")
    g.add_argument("--max-tiles-per-slide", type=int, default=None)
    ing.set_defaults(func=_ingest)

    return ing


def add_data_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("data", help="inspect datasets")
    data = p.add_subparsers(dest="data_command", required=True)
    st = data.add_parser("stats", help="tiles, sites, splits and site-type confounding of a dataset directory")
    st.add_argument("dir")
    st.add_argument("--verify", action="store_true", help="also check every shard's sha256")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_stats)
    return p
