"""Tile sources behind one interface: a Scan says which (type, site) groups exist before any pixel is
read (so the site-disjoint split is known up front) and then yields TileRecords lazily.

  tcga-ut    folders <cancer type>/<slide_submitter_id>/*.jpg joined with a GDC slide-metadata table
  manifest   a CSV/Parquet table with an image-path column and any metadata columns
  procedural the built-in H&E-like dataset with known ground truth (the default)
  wsi        whole-slide images tiled with OpenSlide (see wsi.py)
"""

from __future__ import annotations

import io
import itertools
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pandas as pd
from PIL import Image

from ..metadata import SchemaError, clean_category, clean_continuous
from .records import SkipLog, TileRecord

TILE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}
OTHER_IMAGE_SUFFIXES = {".tif", ".tiff", ".bmp", ".webp"}  # re-encoded as PNG
IMAGE_SUFFIXES = set(TILE_SUFFIXES) | OTHER_IMAGE_SUFFIXES


UNIT_TILES = 512  # tiles per unit of work for file sources (a slide is one unit for wsi)

Unit = Callable[[SkipLog], Iterator[TileRecord]]  # picklable: runs as a Ray task on any node


@dataclass
class Scan:
    groups: Counter  # tiles (or slides) per (cancer_type, tissue_source_site)
    records: Callable[[], Iterator[TileRecord]]  # reads pixels lazily
    categorical: list[str] = field(default_factory=lambda: ["cancer_type", "tissue_source_site"])
    continuous: list[str] = field(default_factory=list)
    name: str = ""
    inputs: int = 0  # inputs listed, in the unit skips count (tiles; slides for wsi); 0: sum of groups
    renderer: dict | None = None  # procedural: what the renderer needs to draw more of this world
    # The same tiles cut into independent pieces of work, in order (`records` = all of them in turn);
    # each logs its skips into the SkipLog it is given. None: `records` is one piece.
    units: list[Unit] | None = None

    @property
    def total_inputs(self) -> int:
        return self.inputs or sum(self.groups.values())


def _in_units(units: list[Unit], skips: SkipLog) -> Callable[[], Iterator[TileRecord]]:
    return lambda: itertools.chain.from_iterable(u(skips) for u in units)


def _parts(n_items: int) -> int:
    return max(1, -(-n_items // UNIT_TILES))


def _chunks(items: list) -> list[list]:
    """Every n-th item per unit (not runs of neighbours): each unit, hence each of its shards, mixes
    types, sites and slides as the whole list does."""
    n = _parts(len(items))
    return [items[j::n] for j in range(n)]


def safe_key(text: str) -> str:
    """A WebDataset-safe key: only letters, digits, '-' and '_' (no dots)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text).strip("_") or "tile"


def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"metadata table {path} does not exist")
    if path.suffix.lower() == ".parquet":
        df = pd.read_parquet(path)
        return df.astype(object).where(df.notna(), None)
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    return df.rename(columns=lambda c: c.strip())  # 'cancer_type ' in a hand-edited header


def require_columns(df: pd.DataFrame, columns: list[str], path: str | Path, hint: str = "") -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SchemaError(
            f"{path}: missing required column(s) {missing}; present: {list(df.columns)[:30]}"
            + (f". {hint}" if hint else "")
        )


def read_tile_bytes(path: Path) -> tuple[bytes, str]:
    """The file's bytes as stored in a shard: JPEG/PNG as is, other formats re-encoded as PNG."""
    data = path.read_bytes()
    fmt = TILE_SUFFIXES.get(path.suffix.lower())
    if fmt:
        return data, fmt
    try:
        with Image.open(io.BytesIO(data)) as im:
            buf = io.BytesIO()
            im.save(buf, format="PNG")
    except Exception as e:  # PIL raises many types for broken files, bombs included
        raise SchemaError(f"cannot decode image ({type(e).__name__}: {e}); re-export or remove it") from None
    return buf.getvalue(), "png"


def listed_path(value, table: Path) -> Path:
    """A path from a table: absolute as is, relative to the table's folder (not the current directory)."""
    p = Path(str(value))
    return p if p.is_absolute() else table.parent / p


def missing_file_reason(value, table: Path) -> tuple[str, str] | None:
    """(reason, kind) if the file a table lists does not exist; names the likely mistake of writing
    paths relative to the current directory."""
    p = listed_path(value, table)
    if p.exists():
        return None
    raw = Path(str(value))
    if not raw.is_absolute() and raw.exists():
        return (
            f"not found relative to the table's folder ({p}), but {raw} exists relative to the current "
            f"directory; paths in {table.name} are read relative to its folder: make them relative to "
            f"{table.parent} or absolute",
            "path relative to the current directory, not to the table's folder",
        )
    return f"file not found: {p}", "file not found"


def _metadata_fields(row: dict, categorical: list[str], continuous: list[str], skips: SkipLog) -> dict:
    meta = {c: clean_category(row.get(c)) for c in categorical}
    for c in continuous:
        try:
            x = clean_continuous(row.get(c))
        except SchemaError:  # a word in a number column: the value is missing, the tile is fine
            skips.unparsed_value(c, row.get(c))
            x = float("nan")
        meta[c] = None if x != x else x  # NaN -> None in JSON
    return meta


# ---- tcga-ut -------------------------------------------------------------------------------------

# GDC column -> tile schema column
TCGA_COLUMNS = {"tissue_source_site": "tissue_source_site", "gender": "sex", "race": "race", "age_at_index": "age"}


def tcga_ut(root: str | Path, metadata: str | Path, skips: SkipLog) -> Scan:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"tile folder {root} does not exist")
    table = read_table(metadata)
    require_columns(
        table,
        ["slide_submitter_id", "tissue_source_site"],
        metadata,
        "Export the GDC slide metadata (the format: tests/data/tcga_slide_metadata_sample.csv in the "
        "medi-dist repository)",
    )
    table = table.rename(columns=TCGA_COLUMNS)
    table["slide_submitter_id"] = table["slide_submitter_id"].map(lambda v: str(v).strip())  # join key
    table = table.drop_duplicates("slide_submitter_id").set_index("slide_submitter_id")
    cat = ["cancer_type", "tissue_source_site"] + [c for c in ("sex", "race") if c in table.columns]
    cont = ["age"] if "age" in table.columns else []

    tiles: list[tuple[Path, str, str]] = []  # (file, type, slide)
    groups: Counter = Counter()
    inputs = 0
    for type_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for slide_dir in sorted(p for p in type_dir.iterdir() if p.is_dir()):
            # the same image types as the manifest source; TIFF/BMP/WebP are re-encoded as PNG
            files = sorted(f for f in slide_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                continue
            inputs += len(files)
            slide = slide_dir.name
            if slide not in table.index:
                skips.skip(
                    str(slide_dir),
                    f"slide {slide} has no row in {metadata}; {len(files)} tiles not ingested "
                    "(add the slide's metadata or remove the folder)",
                    count=len(files),
                    kind=f"slide folder without a row in {Path(metadata).name}",
                )
                continue
            site = clean_category(table.at[slide, "tissue_source_site"])
            groups[(type_dir.name, site)] += len(files)
            tiles += [(f, type_dir.name, slide) for f in files]
    if not tiles:
        raise SchemaError(
            f"no ingestible tiles under {root}; expected <cancer type>/<slide_submitter_id>/*.jpg "
            f"(or .png/.tif) with slides listed in {metadata}"
        )

    units = [
        partial(
            _tcga_records, chunk, {s: table.loc[s].to_dict() for s in dict.fromkeys(t[2] for t in chunk)}, cat, cont
        )
        for chunk in _chunks(tiles)
    ]
    return Scan(groups, _in_units(units, skips), cat, cont, f"tcga-ut:{root}", inputs, units=units)


def _tcga_records(
    tiles: list[tuple[Path, str, str]], rows: dict, cat: list[str], cont: list[str], skips: SkipLog
) -> Iterator[TileRecord]:
    for f, ctype, slide in tiles:
        row = {"cancer_type": ctype, **rows[slide]}
        meta = {"slide_id": slide, **_metadata_fields(row, cat, cont, skips)}
        try:
            data, fmt = read_tile_bytes(f)
        except OSError as e:
            skips.skip(str(f), f"unreadable file ({e})")
            continue
        except SchemaError as e:
            skips.skip(str(f), str(e))
            continue
        yield TileRecord(safe_key(f"{slide}-{f.stem}"), data, fmt, meta, str(f))


# ---- manifest ------------------------------------------------------------------------------------


def manifest(
    path: str | Path,
    skips: SkipLog,
    image_column: str = "path",
    categorical: list[str] = (),
    continuous: list[str] = (),
) -> Scan:
    path = Path(path)
    table = read_table(path)
    require_columns(
        table,
        [image_column, "cancer_type", "tissue_source_site", *categorical, *continuous],
        path,
        f"Use --image-column to name the image-path column (now {image_column!r})",
    )
    if table.empty:
        raise SchemaError(f"{path}: the manifest has no rows")
    optional = [c for c in ("sex", "race") if c in table.columns and c not in categorical]
    cat = ["cancer_type", "tissue_source_site"] + optional + list(categorical)
    cont = list(continuous) or (["age"] if "age" in table.columns else [])
    rows = table.to_dict("records")
    groups: Counter = Counter((clean_category(r["cancer_type"]), clean_category(r["tissue_source_site"])) for r in rows)

    numbered = list(enumerate(rows, start=2))  # row 1 is the header in a CSV
    units = [partial(_manifest_records, chunk, path, image_column, cat, cont) for chunk in _chunks(numbered)]
    return Scan(groups, _in_units(units, skips), cat, cont, f"manifest:{path}", len(rows), units=units)


def _manifest_records(
    rows: list[tuple[int, dict]], path: Path, image_column: str, cat: list[str], cont: list[str], skips: SkipLog
) -> Iterator[TileRecord]:
    for i, r in rows:
        origin = f"{path} row {i} ({r[image_column]})"
        img = listed_path(r[image_column], path)
        missing = missing_file_reason(r[image_column], path)
        if missing:
            skips.skip(origin, missing[0], kind=missing[1])
            continue
        meta = _metadata_fields(r, cat, cont, skips)
        try:
            data, fmt = read_tile_bytes(img)
        except SchemaError as e:
            skips.skip(origin, str(e))
            continue
        except OSError as e:
            skips.skip(origin, f"{type(e).__name__}: {e}")
            continue
        slide = clean_category(r.get("slide_id")) if "slide_id" in r else img.stem
        key = safe_key(str(r["key"])) if r.get("key") else safe_key(f"{slide}-{img.stem}")
        yield TileRecord(key, data, fmt, {"slide_id": slide, **meta}, origin)


# ---- procedural ----------------------------------------------------------------------------------


def procedural(cfg) -> Scan:
    from .procedural import generate, plan_counts

    counts = plan_counts(cfg)
    cat = ["cancer_type", "tissue_source_site"] + (["sex"] if cfg.extra_metadata else [])
    cont = ["age"] if cfg.extra_metadata else []
    n = _parts(sum(counts.values()))
    units = [partial(_procedural_records, cfg, (j, n)) for j in range(n)]
    return Scan(
        Counter(counts),
        lambda: generate(cfg),
        cat,
        cont,
        "procedural",
        units=units,
        renderer={"size": cfg.size, "scanner_lines": cfg.scanner_lines},
    )


def _procedural_records(cfg, part: tuple[int, int], skips: SkipLog) -> Iterator[TileRecord]:
    from .procedural import generate

    return generate(cfg, part)


# ---- wsi -----------------------------------------------------------------------------------------


def wsi_scan(slides_table: str | Path, cfg, skips: SkipLog) -> Scan:
    """Slides listed in a table (path, cancer_type, tissue_source_site, optional slide_id/sex/race/age)."""
    from .wsi import sanitize_key_part, wsi_source

    path = Path(slides_table)
    table = read_table(path)
    require_columns(table, ["path", "cancer_type", "tissue_source_site"], path)
    cat = ["cancer_type", "tissue_source_site"] + [c for c in ("sex", "race") if c in table.columns]
    cont = ["age"] if "age" in table.columns else []
    rows = table.to_dict("records")
    slides = []
    for i, r in enumerate(rows, start=2):
        missing = missing_file_reason(r["path"], path)
        if missing:  # listed once here, with the likely cause, rather than as a bare "not found" later
            skips.skip(f"{path} row {i} ({r['path']})", missing[0], kind=missing[1])
            continue
        p = listed_path(r["path"], path)
        sid = clean_category(r.get("slide_id")) if r.get("slide_id") else safe_key(p.stem)
        slides.append((p, {"slide_id": sid, **_metadata_fields(r, cat, cont, skips)}))
    # One unit per slide, so a repeated slide_id is skipped here (as wsi_source does): keys stay unique.
    first: dict[str, str] = {}
    for p, m in list(slides):
        sid = sanitize_key_part(m["slide_id"])
        if sid in first:
            skips.skip(str(p), f"slide_id {sid!r} already used by {first[sid]}; keys would collide")
            slides.remove((p, m))
        first.setdefault(sid, str(p))
    groups = Counter((m["cancer_type"], m["tissue_source_site"]) for _, m in slides)  # slides, not tiles
    units = [partial(wsi_source, [s], cfg) for s in slides]
    return Scan(groups, lambda: wsi_source(slides, cfg, skips), cat, cont, f"wsi:{path}", len(rows), units=units)
