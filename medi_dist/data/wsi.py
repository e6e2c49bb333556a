"""Whole-slide image source: tissue tiles at a fixed physical resolution, read with OpenSlide.

For each slide we
  1. find microns per pixel (``openslide.mpp-x/-y``; or ``WSIConfig.assume_mpp`` if the file has none),
  2. lay a non-overlapping grid of tiles that each cover ``tile_px * mpp`` microns,
  3. keep tiles whose tissue fraction (Otsu threshold on the saturation of a thumbnail) is at least
     ``tissue_threshold``,
  4. read each kept tile at the coarsest pyramid level that is still at least as fine as the target,
     resize to ``tile_px`` and JPEG-encode it.

Unreadable slides (missing, corrupt, unsupported) are recorded in the SkipLog, never a crash. A slide
without a resolution is an error: guessing the magnification would silently mix scales.

Needs the ``openslide-python`` and ``openslide-bin`` packages (the latter ships the C library).
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..metadata import SchemaError, check_key
from .records import SkipLog, TileRecord

log = logging.getLogger("medi_dist.data.wsi")

# Longest side of the thumbnail used for the tissue mask, and its resolution relative to a tile.
_THUMB_MAX_SIDE = 4096
_THUMB_PX_PER_TILE = 16
# Saturation (0-255) below which a pixel is background whatever Otsu says (blank slides, glass).
_MIN_SATURATION = 15
# Files OpenSlide does not read that we still accept as single-level images (with assume_mpp).
_PLAIN_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


@dataclass
class WSIConfig:
    tile_px: int = 256  # output tile size in pixels
    mpp: float = 0.5  # target microns per pixel (0.5 ~ 20x, 0.25 ~ 40x)
    tissue_threshold: float = 0.5  # minimum tissue fraction of a kept tile
    max_tiles_per_slide: int | None = None  # keep at most this many, spread evenly over the slide
    jpeg_quality: int = 95
    assume_mpp: float | None = None  # level-0 mpp for slides whose file does not record one

    def __post_init__(self) -> None:
        if self.tile_px <= 0:
            raise ValueError(f"tile_px must be positive, got {self.tile_px}")
        if not self.mpp > 0:
            raise ValueError(f"mpp must be positive, got {self.mpp}")
        if not 0.0 <= self.tissue_threshold <= 1.0:
            raise ValueError(f"tissue_threshold must be in [0, 1], got {self.tissue_threshold}")
        if self.max_tiles_per_slide is not None and self.max_tiles_per_slide <= 0:
            raise ValueError(f"max_tiles_per_slide must be positive, got {self.max_tiles_per_slide}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.assume_mpp is not None and not self.assume_mpp > 0:
            raise ValueError(f"assume_mpp must be positive, got {self.assume_mpp}")


def _openslide():
    try:
        import openslide
    except ImportError as e:  # openslide-python missing, or the C library not found
        raise ImportError(
            f"WSI tiling needs OpenSlide: pip install openslide-python openslide-bin (import failed: {e})"
        ) from e
    return openslide


def sanitize_key_part(text: str) -> str:
    """Map text onto [A-Za-z0-9_-] so that it is a valid, dot-free WebDataset key part."""
    out = re.sub(r"[^A-Za-z0-9_-]", "_", str(text)).lstrip("_")
    return out or "slide"


def _default_slide_id(path: str | Path) -> str:
    return Path(str(path)).name.split(".")[0]  # TCGA-XX-....svs -> TCGA-XX-...


def slide_mpp(slide, path: str | Path, assume_mpp: float | None) -> tuple[float, float]:
    """Level-0 microns per pixel (x, y); raises SchemaError if unknown and not assumed."""
    props = slide.properties
    try:
        mx = float(props.get("openslide.mpp-x", "nan"))
        my = float(props.get("openslide.mpp-y", "nan"))
    except ValueError:
        mx = my = float("nan")
    if math.isfinite(mx) and mx > 0 and not (math.isfinite(my) and my > 0):
        my = mx
    if math.isfinite(mx) and mx > 0:
        return mx, my
    if assume_mpp is not None:
        return assume_mpp, assume_mpp
    power = props.get("openslide.objective-power")
    hint = f" (the file says objective power {power}x; 20x is usually ~0.5 mpp, 40x ~0.25)" if power else ""
    raise SchemaError(
        f"{path}: slide has no resolution (no openslide.mpp-x property){hint}. Pass --assume-mpp "
        "MICRONS_PER_PIXEL (WSIConfig.assume_mpp) to say what level 0 is, e.g. --assume-mpp 0.5"
    )


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values (maximises the between-class variance)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)  # pixels at or below t
    w1 = total - w0
    m0 = np.cumsum(hist * levels)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(np.argmax(between))  # class 1 is values > t


def tissue_mask(thumb: Image.Image) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail: saturation above Otsu's threshold."""
    sat = np.asarray(thumb.convert("RGB").convert("HSV"))[..., 1]
    thr = max(otsu_threshold(sat), _MIN_SATURATION)
    return sat > thr


def _background(slide) -> tuple[int, int, int]:
    hex_ = slide.properties.get("openslide.background-color", "FFFFFF")
    try:
        return tuple(int(hex_[i : i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]
    except ValueError:
        return (255, 255, 255)


def _best_level(slide, downsample: float) -> int:
    """Coarsest level whose downsample does not exceed `downsample` (never upsample a coarse level)."""
    best = 0
    for i, d in enumerate(slide.level_downsamples):
        if d <= downsample * 1.01 and d >= slide.level_downsamples[best]:
            best = i
    return best


def _encode(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def iter_wsi_tiles(
    slide_path: str | Path, meta: dict[str, Any], cfg: WSIConfig, skips: SkipLog
) -> Iterator[TileRecord]:
    """Tissue tiles of one slide. Unreadable slides go to `skips`; no mpp and no assume_mpp raises."""
    openslide = _openslide()
    path = str(slide_path)
    meta = dict(meta)
    if not meta.get("slide_id"):
        meta["slide_id"] = _default_slide_id(path)
    slide_key = sanitize_key_part(meta["slide_id"])
    if not Path(path).is_file():
        skips.skip(path, "slide file not found")
        return
    try:
        slide = openslide.OpenSlide(path)
    except openslide.OpenSlideUnsupportedFormatError as e:
        if Path(path).suffix.lower() not in _PLAIN_IMAGE_SUFFIXES:
            skips.skip(path, f"not a slide format OpenSlide can read ({e})")
            return
        try:  # a plain image (PNG/JPEG/...) through PIL; it has no mpp, so assume_mpp is needed
            slide = openslide.ImageSlide(path)
        except (OSError, Image.DecompressionBombError) as e2:
            skips.skip(path, f"cannot open image: {type(e2).__name__}: {e2}")
            return
    except (openslide.OpenSlideError, OSError) as e:
        skips.skip(path, f"cannot open slide: {type(e).__name__}: {e}")
        return
    with slide:
        mpp_x, mpp_y = slide_mpp(slide, path, cfg.assume_mpp)
        W, H = slide.dimensions
        # Level-0 pixels one output tile spans.
        span_x, span_y = cfg.tile_px * cfg.mpp / mpp_x, cfg.tile_px * cfg.mpp / mpp_y
        nx, ny = int(W // span_x), int(H // span_y)
        if nx == 0 or ny == 0:
            skips.skip(path, f"slide {W}x{H} px is smaller than one {cfg.tile_px}px tile at {cfg.mpp} mpp")
            return
        if min(span_x, span_y) < cfg.tile_px * 0.99:
            log.warning(
                "%s: level 0 is %.3f mpp, coarser than the target %.3f; tiles are upsampled", path, mpp_x, cfg.mpp
            )
        level = _best_level(slide, min(span_x, span_y) / cfg.tile_px)
        ds = slide.level_downsamples[level]
        read_w, read_h = max(1, round(span_x / ds)), max(1, round(span_y / ds))
        bg = _background(slide)

        try:
            # Tissue fraction of every grid cell from a thumbnail.
            tds = max(min(span_x, span_y) / _THUMB_PX_PER_TILE, max(W, H) / _THUMB_MAX_SIDE, 1.0)
            thumb = slide.get_thumbnail((max(1, round(W / tds)), max(1, round(H / tds))))
            mask = tissue_mask(thumb)
            sx, sy = thumb.width / W, thumb.height / H  # thumbnail px per level-0 px
            cells = []  # (fraction, x0, y0) in level-0 px
            for j in range(ny):
                y0 = round(j * span_y)
                r0, r1 = int(y0 * sy), max(int(y0 * sy) + 1, int(round((y0 + span_y) * sy)))
                for i in range(nx):
                    x0 = round(i * span_x)
                    c0, c1 = int(x0 * sx), max(int(x0 * sx) + 1, int(round((x0 + span_x) * sx)))
                    frac = float(mask[r0:r1, c0:c1].mean())
                    if frac >= cfg.tissue_threshold:
                        cells.append((frac, x0, y0))
            if not cells:
                skips.skip(path, f"no tile has tissue fraction >= {cfg.tissue_threshold}")
                return
            if cfg.max_tiles_per_slide is not None and len(cells) > cfg.max_tiles_per_slide:
                idx = np.linspace(0, len(cells) - 1, cfg.max_tiles_per_slide).round().astype(int)
                cells = [cells[k] for k in idx]

            for _, x0, y0 in cells:
                region = slide.read_region((x0, y0), level, (read_w, read_h))
                img = Image.new("RGB", region.size, bg)
                img.paste(region, mask=region.getchannel("A"))
                if img.size != (cfg.tile_px, cfg.tile_px):
                    img = img.resize((cfg.tile_px, cfg.tile_px), Image.Resampling.LANCZOS)
                yield TileRecord(
                    key=check_key(f"{slide_key}-x{x0}-y{y0}"),
                    image_bytes=_encode(img, cfg.jpeg_quality),
                    image_format="jpg",
                    meta=dict(meta),
                    origin=f"{path}@x{x0},y{y0},level{level}",
                )
        except (openslide.OpenSlideError, OSError) as e:  # corrupt data partway; the handle is dead
            skips.skip(path, f"read failed, rest of slide skipped: {type(e).__name__}: {e}")


def wsi_source(
    slides: Iterable[tuple[str | Path, dict[str, Any]]], cfg: WSIConfig, skips: SkipLog
) -> Iterator[TileRecord]:
    """Tiles of many slides, in order. A repeated slide_id (after key sanitising) is skipped so that
    keys stay unique."""
    seen: dict[str, str] = {}
    for path, meta in slides:
        sid = sanitize_key_part(meta.get("slide_id") or _default_slide_id(path))
        if sid in seen:
            skips.skip(str(path), f"slide_id {sid!r} already used by {seen[sid]}; keys would collide")
            continue
        seen[sid] = str(path)
        yield from iter_wsi_tiles(path, meta, cfg, skips)
