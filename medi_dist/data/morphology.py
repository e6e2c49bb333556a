"""Each procedural cancer type's morphology, as haematoxylin and eosin concentration maps.

The procedural world (procedural.py) keeps type and site apart: the cancer type sets *morphology*
only, drawn here as per-pixel stain concentrations in 64-px units at any tile size; the tissue source
site sets *stain, blur and JPEG quality* only, and procedural.py renders these concentrations through it.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
from scipy.ndimage import gaussian_filter

ARCHETYPES = ("GLAND", "SHEET", "STROMA", "PAPIL", "SMALL", "CLEAR")


def cancer_types(n: int) -> list[str]:
    """GLAND, SHEET, STROMA, PAPIL, SMALL, CLEAR, then variants GLAND2, ... (larger nuclei)."""
    k = len(ARCHETYPES)
    return [ARCHETYPES[i % k] + (str(i // k + 1) if i >= k else "") for i in range(n)]


@lru_cache(maxsize=16)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in 64-px units, so geometry below is written once for every tile size."""
    c = (np.arange(n, dtype=np.float32) + 0.5) * (64 / n)
    return c[:, None], c[None, :]


def _nuclei(n, cy, cx, a, b, theta, dark) -> np.ndarray:
    """Hematoxylin map of soft ellipses (centres and semi-axes in 64-px units). Each nucleus is
    drawn on a small patch around its centre and scattered with bincount: no per-pixel loops."""
    if len(cy) == 0:
        return np.zeros((n, n), np.float32)
    s = n / 64
    o = np.arange(-(int(np.ceil(a.max() * s)) + 1), int(np.ceil(a.max() * s)) + 2)
    py = np.floor(cy * s).astype(int)[:, None, None] + o[None, :, None]
    px = np.floor(cx * s).astype(int)[:, None, None] + o[None, None, :]
    dy, dx = (py + 0.5) / s - cy[:, None, None], (px + 0.5) / s - cx[:, None, None]
    c, sn = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    d = np.hypot((dx * c + dy * sn) / a[:, None, None], (dy * c - dx * sn) / b[:, None, None])
    val = np.clip((1.1 - d) * 4, 0, 1) * dark[:, None, None]  # soft rim ~1/4 of the radius
    ok = (py >= 0) & (py < n) & (px >= 0) & (px < n) & (val > 0)
    idx = np.broadcast_to(py * n + px, val.shape)[ok]
    return np.bincount(idx, weights=val[ok], minlength=n * n).reshape(n, n).astype(np.float32)


def _jgrid(rng, spacing, jitter):
    """Cell centres on a randomly shifted, jittered square grid covering the tile."""
    g = np.arange(-1, 64 / spacing + 1) * spacing
    cy, cx = (v.ravel() + rng.uniform(0, spacing) for v in np.meshgrid(g, g, indexing="ij"))
    return cy + rng.uniform(-jitter, jitter, cy.size), cx + rng.uniform(-jitter, jitter, cx.size)


def _fibres(rng, yy, xx, period=5.0):
    """Wavy parallel collagen bands in [0, 1] at a random angle."""
    t = rng.uniform(0, np.pi)
    w = yy * np.cos(t) - xx * np.sin(t)
    along = xx * np.cos(t) + yy * np.sin(t)
    phase = 1.5 * np.sin(along / 7 + rng.uniform(0, 6)) + 1.2 * _noise(rng, yy.size, 4.0)  # irregular waves
    return np.clip(np.sin(2 * np.pi * w / period + phase), 0, 1), t


def _gland(rng, n, f):
    """Adenocarcinoma: rings of basal, radially oriented nuclei around white lumens in stroma."""
    yy, xx = _grid(n)
    g = int(rng.integers(2, 4))
    gy, gx, rl = rng.uniform(8, 56, g), rng.uniform(8, 56, g), rng.uniform(5, 9, g)
    rel = (np.hypot(yy[None] - gy[:, None, None], xx[None] - gx[:, None, None]) - rl[:, None, None]).min(0)
    fib, _ = _fibres(rng, yy, xx)
    e = np.where(rel < 0, 0.02, np.where(rel < 6, 0.65, 0.2 + 0.25 * fib))
    m = (2 * np.pi * (rl + 4) / (3.3 * f)).astype(int)
    phi = np.concatenate([np.linspace(0, 2 * np.pi, k, endpoint=False) + rng.uniform(0, 6) for k in m])
    r = np.repeat(rl + 4, m) + rng.normal(0, 0.4, phi.size)
    cy, cx = np.repeat(gy, m) + r * np.sin(phi), np.repeat(gx, m) + r * np.cos(phi)
    keep = (np.hypot(cy[:, None] - gy, cx[:, None] - gx) - rl).min(1) > 1.5  # not inside another lumen
    k = int(keep.sum())
    h = _nuclei(n, cy[keep], cx[keep], np.full(k, 2.3 * f), np.full(k, 1.4 * f), phi[keep], rng.uniform(0.9, 1.2, k))
    return h, e


def _sheet(rng, n, f):
    """Solid carcinoma: dense sheet of large, round, pleomorphic nuclei in pink cytoplasm."""
    cy, cx = _jgrid(rng, 8.5 * f**0.5, 2.0)
    a = 3.0 * f * rng.lognormal(0, 0.18, cy.size)
    h = _nuclei(
        n, cy, cx, a, a * rng.uniform(0.75, 1, cy.size), rng.uniform(0, np.pi, cy.size), rng.uniform(0.8, 1.2, cy.size)
    )
    return h, np.full((n, n), 0.6, np.float32)


def _stroma(rng, n, f):
    """Sarcoma: wavy eosinophilic fibres with sparse spindle nuclei aligned to them."""
    yy, xx = _grid(n)
    fib, t = _fibres(rng, yy, xx, 5.5)
    k = int(rng.integers(8, 14))
    h = _nuclei(
        n,
        rng.uniform(0, 64, k),
        rng.uniform(0, 64, k),
        np.full(k, 4.5 * f),
        np.full(k, 1.0 * f),
        t + rng.normal(0, 0.15, k),
        rng.uniform(1.0, 1.3, k),
    )
    return h, 0.1 + 0.6 * fib**0.7


def _papil(rng, n, f):
    """Papillary: straight fibrovascular cores lined on both sides by columnar nuclei, white space
    between fronds (linear architecture, unlike the rings of GLAND)."""
    yy, xx = _grid(n)
    k = int(rng.integers(1, 3))
    py, px, al, w = rng.uniform(20, 44, k), rng.uniform(20, 44, k), rng.uniform(0, np.pi, k), rng.uniform(3, 5, k)
    dist = np.abs(
        (yy[None] - py[:, None, None]) * np.cos(al)[:, None, None]
        - (xx[None] - px[:, None, None]) * np.sin(al)[:, None, None]
    )
    rel = (dist - w[:, None, None]).min(0)
    fib, _ = _fibres(rng, yy, xx)
    e = np.where(rel < 0, 0.3 + 0.25 * fib, np.where(rel < 5.5, 0.6, 0.03))
    t = np.arange(-48, 48, 3.0 * f)
    side = np.array([-1.0, 1.0])
    off = ((w + 2.8)[:, None, None] * side[None, :, None]) + rng.normal(0, 0.3, (k, 2, t.size))
    tt = np.broadcast_to(t, off.shape)
    c, s = np.cos(al)[:, None, None], np.sin(al)[:, None, None]
    cy, cx = (py[:, None, None] + tt * s + off * c).ravel(), (px[:, None, None] + tt * c - off * s).ravel()
    ang = np.broadcast_to(al[:, None, None] + np.pi / 2, off.shape).ravel()
    m = cy.size
    h = _nuclei(n, cy, cx, np.full(m, 2.4 * f), np.full(m, 1.3 * f), ang, rng.uniform(0.9, 1.2, m))
    return h, e


def _small(rng, n, f):
    """Small-cell carcinoma: very dense, small, dark nuclei with scant cytoplasm."""
    cy, cx = _jgrid(rng, 5.2 * f**0.5, 1.4)
    a = 1.9 * f * rng.lognormal(0, 0.12, cy.size)
    h = _nuclei(
        n, cy, cx, a, a * rng.uniform(0.7, 1, cy.size), rng.uniform(0, np.pi, cy.size), rng.uniform(1.2, 1.5, cy.size)
    )
    return h, np.full((n, n), 0.22, np.float32)


def _clear(rng, n, f):
    """Clear-cell carcinoma: polygonal cells with empty cytoplasm, thin pink membranes, small
    central nuclei. Cells are a Worley (Voronoi) pattern on a jittered grid: 3x3 neighbour cells."""
    yy, xx = _grid(n)
    cell, g = 10.0, int(np.ceil(64 / 10.0)) + 2
    sy = (np.arange(g)[:, None] - 1 + 0.5) * cell + rng.uniform(-3, 3, (g, g))
    sx = (np.arange(g)[None, :] - 1 + 0.5) * cell + rng.uniform(-3, 3, (g, g))
    iy, ix = (yy // cell).astype(int) + 1, (xx // cell).astype(int) + 1
    d = np.sort(
        np.stack([np.hypot(yy - sy[iy + a, ix + b], xx - sx[iy + a, ix + b]) for a in (-1, 0, 1) for b in (-1, 0, 1)]),
        axis=0,
    )
    e = np.where(d[1] - d[0] < 1.2, 0.6, 0.06)
    cy, cx = sy.ravel() + rng.normal(0, 1, g * g), sx.ravel() + rng.normal(0, 1, g * g)
    r = 1.7 * f * rng.lognormal(0, 0.1, cy.size)
    return _nuclei(n, cy, cx, r, r, np.zeros(cy.size), rng.uniform(1.1, 1.4, cy.size)), e


_DRAW = {"GLAND": _gland, "SHEET": _sheet, "STROMA": _stroma, "PAPIL": _papil, "SMALL": _small, "CLEAR": _clear}


def _parse_type(name: str):
    m = re.fullmatch(r"([A-Z]+)([2-9]|[1-9]\d+)?", name)
    if not m or m[1] not in _DRAW:
        raise ValueError(
            f"unknown procedural cancer type {name!r}: expected one of {', '.join(ARCHETYPES)}, "
            "optionally followed by a variant number >= 2 (e.g. GLAND2)"
        )
    return _DRAW[m[1]], 1.25 ** (int(m[2]) - 1 if m[2] else 0)  # variants: same architecture, larger nuclei


def _noise(rng, n, sigma):
    x = gaussian_filter(rng.standard_normal((n, n), dtype=np.float32), sigma * n / 64, mode="wrap")
    return x / (x.std() + 1e-6)


def concentrations(cancer_type: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A tile's haematoxylin and eosin concentrations (size x size each): the type's tissue, before any
    site. `render_tile`'s first draws from `rng`."""
    draw, f = _parse_type(cancer_type)
    h, e = draw(rng, size, f)
    h = np.clip(h, 0, 1.6) * np.clip(0.85 + 0.25 * _noise(rng, size, 0.6), 0.3, None)  # chromatin grain
    e = np.clip(e * (1 + 0.12 * _noise(rng, size, 3.0)), 0, None)  # uneven eosin uptake
    return h, e
