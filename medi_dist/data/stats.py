"""`medi-dist data stats`: what a dataset directory holds, and how confounded it is."""

from __future__ import annotations

import json
from pathlib import Path

from ..storage import Folder, is_remote, local_path
from .shards import SPLIT, load_manifest, read_index, verify_shards


def dataset_stats(dataset_dir: str | Path, verify: bool = False) -> dict:
    root = dataset_dir if is_remote(dataset_dir) else local_path(dataset_dir)
    manifest = load_manifest(root)
    shards = verify_shards(root, checksums=verify)
    index = read_index(root)
    split = json.loads(Folder(root).read_bytes(SPLIT))
    per_type = index.groupby("cancer_type")
    top1 = per_type["tissue_source_site"].agg(lambda s: s.value_counts(normalize=True).iloc[0])
    return {
        "tiles": int(len(index)),
        "shards": len(manifest["shards"]),
        "bytes": int(sum(s["bytes"] for s in manifest["shards"])),
        "skipped": len(manifest.get("skipped", [])),
        "verified": {"shards": len(shards), "tiles": int(sum(s.get("tiles", 0) for s in manifest["shards"]))}
        if verify
        else None,
        "unparsed_values": manifest.get("unparsed_values", []),
        "case_variants": manifest.get("case_variants", {}),
        "cancer_types": int(index["cancer_type"].nunique()),
        "sites": int(index["tissue_source_site"].nunique()),
        "tiles_per_split": {k: int(v) for k, v in index["split"].value_counts().sort_index().items()},
        "sites_per_split": {k: len(v) for k, v in split["sites"].items()},
        "top1_site_share": {k: round(float(v), 3) for k, v in top1.items()},
        "missing_types": split.get("missing_types", {}),
        "share_note": split.get("share_note"),
        "table": index.pivot_table(index="cancer_type", columns="split", values="key", aggfunc="count", fill_value=0),
    }


def format_stats(s: dict) -> str:
    lines = [
        f"tiles {s['tiles']} in {s['shards']} shards ({s['bytes'] / 2**20:.1f} MiB); skipped inputs: {s['skipped']}",
        f"cancer types {s['cancer_types']}, sites {s['sites']}",
        "tiles per split: " + ", ".join(f"{k} {v}" for k, v in s["tiles_per_split"].items()),
        "sites per split: " + ", ".join(f"{k} {v}" for k, v in s["sites_per_split"].items()),
        f"mean top-1 site share per type: {sum(s['top1_site_share'].values()) / len(s['top1_site_share']):.2f} "
        "(how strongly a type comes from one site; TCGA: 0.30)",
    ]
    if s["missing_types"]:
        lines.append(f"types absent from a split (too few sites): {s['missing_types']}")
    if s.get("share_note"):
        lines.append(f"warning: {s['share_note']}")
    lines += format_notes(s)
    lines += ["", "tiles per cancer type and split:", s["table"].to_string()]
    if s.get("verified"):
        v = s["verified"]
        lines.append(f"verified {v['shards']} shards ({v['tiles']} tiles): sha256 and member order OK")
    return "\n".join(lines)


def format_notes(s: dict) -> list[str]:
    """Warnings about metadata that was kept but may not mean what the user thinks."""
    lines = []
    for u in s.get("unparsed_values", []):
        lines.append(
            f"warning: {u['column']} value {u['value']!r} is not a number; read as missing in {u['count']} row(s)"
        )
    for col, groups in s.get("case_variants", {}).items():
        shown = "; ".join(" / ".join(repr(v) for v in g) for g in groups)
        lines.append(
            f"warning: {col} has values that differ only by case, kept as different values: {shown} "
            "(make the spelling consistent if they mean the same)"
        )
    return lines
