"""Procedural H&E-like tiles with known ground truth: the built-in default dataset.

Tests, demos and benchmarks need data with TCGA's structure (each site belongs to one cancer type,
long-tailed site shares) but with a ground truth we control. Here the cancer type sets *morphology*
only and the tissue source site sets *stain, blur and JPEG quality* only. A classifier can then learn
the type from shape, and the site<->type confound gives the same colour shortcut that real TCGA does.
The types' morphology (their stain concentration maps) is drawn in morphology.py; this module adds
the sites, the plan and the rendering.

Rendering uses a Beer-Lambert stain model. Per-pixel hematoxylin (nuclei) and eosin (cytoplasm,
stroma) concentrations become RGB = 255 * exp(-(C_h * h * I_h + C_e * e * I_e + bg)), where the
site gives the stain vectors h, e, the intensities I and the background bg.
"""

from __future__ import annotations

import io
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from ..metadata import MIN_TILE_PX, check_key
from .morphology import _grid, _parse_type, cancer_types, concentrations
from .records import TileRecord

# (number of sites, top-1 site share) for each of the 32 TCGA projects. Computed from
# ../shared/data/tcga_site_statistics.csv (8,726 diagnostic slides); the mean top-1 share is 0.30.
# The table is hard-coded so that the package needs no data files at runtime.
TCGA_SITE_SHARES = (
    (16, 0.32),
    (25, 0.35),
    (37, 0.15),
    (33, 0.18),
    (35, 0.10),
    (32, 0.58),
    (28, 0.15),
    (17, 0.26),
    (22, 0.18),
    (25, 0.20),
    (30, 0.14),
    (25, 0.26),
    (24, 0.15),
    (31, 0.45),
    (19, 0.32),
    (29, 0.11),
    (22, 0.17),
    (26, 0.23),
    (15, 0.63),
    (3, 0.90),
    (26, 0.20),
    (16, 0.29),
    (16, 0.25),
    (8, 0.46),
    (6, 0.24),
    (9, 0.20),
    (12, 0.20),
    (13, 0.24),
    (6, 0.40),
    (5, 0.78),
    (8, 0.43),
    (6, 0.21),
)
H_REF = np.array([0.65, 0.70, 0.29])  # Ruifrok & Johnston hematoxylin OD vector
E_REF = np.array([0.07, 0.99, 0.11])  # ... and eosin
_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass
class ProceduralConfig:
    n_types: int = 4
    n_sites: int | None = 12  # None: n_types * sites_per_type
    n_tiles: int = 2000  # total tiles when counts is None
    size: int = 64  # pixels, square; the field of view is the same at every size
    seed: int = 0
    counts: dict[tuple[str, str], int] | None = None  # explicit (type, site) -> count
    sites_per_type: int = 3  # used only when n_sites is None; otherwise the sites are split evenly
    imbalance: str = "tcga"  # "tcga" (long-tailed site shares, as in TCGA_SITE_SHARES) or "uniform"
    tiles_per_slide: int = 8
    extra_metadata: bool = True  # also emit sex (male/female) and age (int, ~5% None)
    # Each site's scanner also leaves a faint periodic line pattern (its own period, angle, strength):
    # a site shortcut that is not colour, so stain augmentation and normalisation cannot remove it.
    scanner_lines: bool = False

    def __post_init__(self) -> None:
        if self.size < MIN_TILE_PX:
            raise ValueError(
                f"--size {self.size}: procedural tiles must be at least {MIN_TILE_PX} px (the smallest "
                "model's resolution; smaller tiles hold no tissue structure)"
            )


def site_codes(n: int) -> list[str]:
    """TCGA-like site codes: A1..Z1, A2..Z2, ... (two characters for the first 234 codes)."""
    return [f"{chr(65 + i % 26)}{i // 26 + 1}" for i in range(n)]


def _crc(s: str) -> int:
    return zlib.crc32(s.encode())  # stable across processes, unlike hash()


# ---------------------------------------------------------------- site: stain, blur, compression
@dataclass(frozen=True)
class SiteStain:
    h: np.ndarray  # unit hematoxylin OD vector times its intensity
    e: np.ndarray  # unit eosin OD vector times its intensity
    bg: np.ndarray  # background OD (slide glass / white balance tint)
    blur: float  # Gaussian sigma in pixels at 64 px
    quality: int  # JPEG quality
    lines: tuple[float, float, float]  # scanner line pattern: period (64-px units), angle, OD amplitude


@lru_cache(maxsize=4096)
def site_stain(site: str) -> SiteStain:
    """The stain of one site depends only on its code (a lab's protocol), not on the seed or type."""
    rng = np.random.default_rng([_crc(site), 1])

    def unit(v):
        return np.clip(v, 0.01, None) / np.linalg.norm(np.clip(v, 0.01, None))

    h = unit(H_REF + rng.normal(0, 0.1, 3)) * rng.uniform(0.7, 1.4)
    e = unit(E_REF + rng.normal(0, 0.1, 3)) * rng.uniform(0.6, 1.45)
    stain = (h, e, rng.uniform(0, 0.08, 3), float(rng.uniform(0, 1.0)), int(rng.integers(55, 96)))
    lines = tuple(np.random.default_rng([_crc(site), 2]).uniform((5.0, 0.0, 0.2), (12.0, np.pi, 0.4)))
    return SiteStain(*stain, lines)  # lines drawn apart: the stains of existing datasets stay as they were


def line_pattern(st: SiteStain, size: int) -> np.ndarray:
    """A site's scanner lines (size x size OD, 0 to the amplitude)."""
    yy, xx = _grid(size)
    period, angle, amp = st.lines
    return amp * (1 + np.sin(2 * np.pi * (yy * np.cos(angle) + xx * np.sin(angle)) / period)) / 2


# ---------------------------------------------------------------- render: the type's tissue at the site
def render_tile(
    cancer_type: str, site: str, rng: np.random.Generator, size: int = 64, scanner_lines: bool = False
) -> np.ndarray:
    """One HxWx3 uint8 tile (before JPEG): the type draws the stain concentrations, the site stains,
    blurs them (and, with scanner_lines, adds its scanner's line pattern). Every random draw comes
    from `rng`."""
    h, e = concentrations(cancer_type, rng, size)
    st = site_stain(site)
    od = h[..., None] * st.h + e[..., None] * st.e + st.bg
    if scanner_lines:  # neutral density (no colour), fixed in the scanner's frame: the same on every tile
        od = od + line_pattern(st, size)[..., None]
    rgb = 255 * np.exp(-od)
    if st.blur > 0.05:
        rgb = gaussian_filter(rgb, (st.blur * size / 64, st.blur * size / 64, 0))
    rgb += rng.normal(0, 2.0, rgb.shape)  # sensor noise
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- plan and generate
def _powerlaw_shares(rng, k: int) -> np.ndarray:
    """Site shares p_j ~ j^-a; a is fitted so a random TCGA project's own top-1 share is met with
    its own site count, then applied to k sites (for k ~ 20 the top-1 share is then ~0.3)."""
    m, top1 = TCGA_SITE_SHARES[int(rng.integers(len(TCGA_SITE_SHARES)))]
    j = np.arange(1, m + 1)
    lo, hi = 0.0, 12.0
    for _ in range(40):  # bisection: top-1 share grows with a
        a = (lo + hi) / 2
        lo, hi = (a, hi) if 1 / np.sum(j**-a) < top1 else (lo, a)
    return rng.permutation(np.arange(1, k + 1) ** -lo)


def _apportion(total: int, p: np.ndarray) -> np.ndarray:
    """Largest-remainder rounding of total * p, every entry at least 1."""
    raw = (total - len(p)) * p / p.sum()
    c = np.floor(raw).astype(int)
    c[np.argsort(-(raw - c), kind="stable")[: total - len(p) - c.sum()]] += 1
    return c + 1


def plan_counts(cfg: ProceduralConfig) -> dict[tuple[str, str], int]:
    """(type, site) -> tile count. Deterministic per seed; each site belongs to exactly one type."""
    if cfg.counts is not None:
        out = {}
        for (t, s), c in cfg.counts.items():
            _parse_type(t)
            if not _NAME.fullmatch(s) or int(c) < 0:
                raise ValueError(f"bad counts entry {(t, s)!r}: {c!r} (site codes use [A-Za-z0-9_-], counts >= 0)")
            if int(c):
                out[(t, s)] = int(c)
        return out
    if cfg.imbalance not in ("tcga", "uniform"):
        raise ValueError(f"imbalance must be 'tcga' or 'uniform', not {cfg.imbalance!r}")
    types = cancer_types(cfg.n_types)
    n_sites = cfg.n_types * cfg.sites_per_type if cfg.n_sites is None else cfg.n_sites
    if not 1 <= cfg.n_types <= n_sites <= cfg.n_tiles:
        raise ValueError(f"need 1 <= n_types ({cfg.n_types}) <= n_sites ({n_sites}) <= n_tiles ({cfg.n_tiles})")
    sites = site_codes(n_sites)
    rng = np.random.default_rng([cfg.seed, 7])
    owner = np.empty(n_sites, int)
    owner[rng.permutation(n_sites)] = np.arange(n_sites) % cfg.n_types  # deal sites out evenly
    per_type = _apportion(cfg.n_tiles, np.ones(cfg.n_types))
    out = {}
    for ti, t in enumerate(types):
        mine = [s for s, o in zip(sites, owner) if o == ti]
        p = _powerlaw_shares(rng, len(mine)) if cfg.imbalance == "tcga" else np.ones(len(mine))
        if per_type[ti] < len(mine):
            raise ValueError(f"n_tiles={cfg.n_tiles} is too small to give each (type, site) pair a tile")
        out.update({(t, s): int(c) for s, c in zip(mine, _apportion(per_type[ti], p))})
    return out


def _patient(seed: int, ct: int, cs: int, slide: int) -> dict:
    rng = np.random.default_rng([seed, ct, cs, 1, slide])
    sex = "male" if rng.random() < 0.5 else "female"
    age = int(np.clip(rng.normal(62, 12), 18, 90))
    return {"sex": sex, "age": None if rng.random() < 0.05 else age}


def render_jpeg(cancer_type: str, site: str, rng: np.random.Generator, size: int, scanner_lines: bool = False) -> bytes:
    """A tile as the site's scanner stores it: rendered, then JPEG-compressed at the site's quality."""
    buf = io.BytesIO()
    Image.fromarray(render_tile(cancer_type, site, rng, size, scanner_lines)).save(
        buf, "JPEG", quality=site_stain(site).quality
    )
    return buf.getvalue()


def render_tiles(pairs: list[tuple[str, str]], seeds: list, size: int, scanner_lines: bool = False) -> np.ndarray:
    """Decoded ground-truth tiles (N, size, size, 3) for (type, site) pairs, one seed (int or list) each:
    what the real dataset would hold for any pair, including pairs it never has."""
    out = np.empty((len(pairs), size, size, 3), np.uint8)
    for i, ((t, s), seed) in enumerate(zip(pairs, seeds)):
        with Image.open(io.BytesIO(render_jpeg(t, s, np.random.default_rng(seed), size, scanner_lines))) as im:
            out[i] = np.asarray(im.convert("RGB"))
    return out


def generate(cfg: ProceduralConfig, part: tuple[int, int] = (0, 1)) -> Iterator[TileRecord]:
    """Tiles in plan order; `part=(j, n)`: only every n-th tile from the j-th (a unit of a distributed
    ingest). Each tile's RNG derives from (seed, type, site, index), so any subset rendered in any
    process gives the same bytes."""
    pos = -1
    for (t, site), count in plan_counts(cfg).items():
        ct, cs = _crc(t), _crc(site)
        for i in range(count):
            pos += 1
            if pos % part[1] != part[0]:
                continue
            slide = i // cfg.tiles_per_slide
            jpeg = render_jpeg(t, site, np.random.default_rng([cfg.seed, ct, cs, 0, i]), cfg.size, cfg.scanner_lines)
            meta = {"slide_id": f"proc-{t}-{site}-{slide:04d}", "cancer_type": t, "tissue_source_site": site}
            if cfg.extra_metadata:
                meta.update(_patient(cfg.seed, ct, cs, slide))
            key = check_key(f"proc-{t}-{site}-{slide:04d}-{i:04d}")
            yield TileRecord(key, jpeg, "jpg", meta, origin=f"procedural {t}/{site}/{i}")


if __name__ == "__main__":  # timing: python -m medi_dist.data.procedural [n_tiles] [size]
    import sys
    import time

    n, size = (int(a) for a in (sys.argv[1:] + ["10000", "64"][len(sys.argv) - 1 :])[:2])
    t0, c0 = time.perf_counter(), time.process_time()
    nbytes = sum(len(r.image_bytes) for r in generate(ProceduralConfig(n_tiles=n, size=size)))
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(
        f"{n} tiles of {size} px in {dt:.1f} s wall ({n / dt:.0f} tiles/s), {cpu:.1f} s CPU "
        f"({n / cpu:.0f} tiles/s per core), {nbytes / n:.0f} B/tile"
    )
