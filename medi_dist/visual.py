"""Pictures a person looks at: tile grids labelled by (cancer type, site)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw


def tile_grid(
    tiles: dict[tuple[str, str], list[np.ndarray]],
    rows: list[str],
    cols: list[str],
    tile_px: int = 64,
    per_cell: int = 1,
) -> Image.Image:
    """A grid with one row per cancer type and one column per site; empty cells stay grey."""
    label_w, label_h = 90, 16
    cell = tile_px * per_cell
    img = Image.new("RGB", (label_w + cell * len(cols), label_h + tile_px * len(rows)), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    for j, c in enumerate(cols):
        draw.text((label_w + j * cell + 2, 2), str(c)[:12], fill=(0, 0, 0))
    for i, r in enumerate(rows):
        draw.text((2, label_h + i * tile_px + tile_px // 2 - 6), str(r)[:14], fill=(0, 0, 0))
        for j, c in enumerate(cols):
            for k, t in enumerate(tiles.get((r, c), [])[:per_cell]):
                im = Image.fromarray(t).resize((tile_px, tile_px), Image.BILINEAR)
                img.paste(im, (label_w + j * cell + k * tile_px, label_h + i * tile_px))
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def model_sample_grid(
    model, spec, pairs: list[tuple[str, str]], steps: int = 25, seed: int = 0, max_types: int = 8, max_sites: int = 12
) -> Image.Image:
    """One generated tile per (type, site) pair, laid out as types x sites."""
    from .model import encode_conditions, sample

    types = sorted({t for t, _ in pairs})[:max_types]
    sites = sorted({s for _, s in pairs})[:max_sites]
    pairs = [(t, s) for t, s in pairs if t in types and s in sites]
    rows = [{"cancer_type": t, "tissue_source_site": s} for t, s in pairs]
    cols = [n for n in ("cancer_type", "tissue_source_site") if n in spec.categorical_names]
    cond = encode_conditions(spec, [{k: r[k] for k in cols} for r in rows])
    imgs = sample(model, cond, seeds=[seed + i for i in range(len(rows))], sampler="ddim", steps=steps)
    tiles = {p: [im] for p, im in zip(pairs, imgs)}
    return tile_grid(tiles, types, sites)
