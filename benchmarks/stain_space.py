"""Diffusion in stain-concentration space (issue 13 experiment; benchmarks only until it is shown).

Beer-Lambert: a pixel's optical density is OD = C_h * h + C_e * e + bg + L(x, y) * (1, 1, 1), where
the site gives the stain vectors h, e, the background bg and its scanner's neutral line pattern L
(fixed in the scanner's frame), and the tissue (the type) gives the concentrations C. Each site's
stain is estimated from its training tiles (`estimate`); a tile becomes (C_h, C_e, residual) with its
own site's stain, so the denoiser sees concentration maps in which the site's stain is gone, and a
tile drawn for (type, site) in that space is rendered with the requested site's stain.

The confound: in this data each site belongs to one type, so a site's intensity cannot be told from
its type's concentrations; only ratios between sites of one type can. Rendering (type B, site s)
uses s's intensity relative to the mean over its own type's sites, times B's mean
(`benchmarks/stain_bounds.py` scores that ideal at 0.93 calibrated stain accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from medi_dist.data.site_stains import (  # noqa: F401  (the product's copies; used here and by other benchmarks)
    fixed_pattern,
    jpeg_quality,
    macenko_vectors,
    optical_density,
    store,
    unit,
)

H_REF = np.array([0.65, 0.70, 0.29])  # Ruifrok & Johnston haematoxylin OD vector
E_REF = np.array([0.07, 0.99, 0.11])  # ... and eosin
RANGE = 1.6  # normalised concentrations in [0, RANGE] map to model range [-1, 1]
RESIDUAL_GAIN = 4.0


@dataclass
class Stain:
    """One site's stain: unit OD directions (rows h, e), background OD, neutral line pattern (H, W),
    and `top`, the 99th percentile of each concentration (the site's intensity times its type's)."""

    hed: np.ndarray
    bg: np.ndarray
    lines: np.ndarray
    top: np.ndarray | None = None
    quality: int | None = None  # JPEG quality of the site's files

    def unmix(self, od: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W, 3) OD -> concentrations (N, H, W, 2) and the OD they leave unexplained."""
        x = od - self.bg - self.lines[..., None]
        conc = x @ np.linalg.pinv(self.hed)
        return conc, x - conc @ self.hed

    def mix(self, conc: np.ndarray, residual: np.ndarray) -> np.ndarray:
        return conc @ self.hed + residual + self.bg + self.lines[..., None]


def to_uint8(od: np.ndarray) -> np.ndarray:
    return np.clip(256 * np.exp(-od) - 1 + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- estimators
def with_top(stain: Stain, od: np.ndarray, stat: str = "mean") -> Stain:
    """The site's intensity (times its type's): the mean concentration (blur lowers peaks such as the
    99th percentile, which the first cut used, and keeps the mean)."""
    conc = stain.unmix(od)[0].reshape(-1, 2)
    stain.top = np.maximum(conc.mean(0) if stat == "mean" else np.percentile(conc, 99, axis=0), 1e-3)
    return stain


def estimate_macenko(od: np.ndarray, lines: bool = False) -> Stain:
    """The first cut: Macenko vectors of the raw OD, background 0 (and no line pattern)."""
    pattern = fixed_pattern(od) if lines else np.zeros(od.shape[1:3])
    x = (od - pattern[..., None]).reshape(-1, 3)
    return with_top(Stain(macenko_vectors(x), np.zeros(3), pattern), od, "p99")


def contrast_vector(x: np.ndarray, sigma: float = 1.5, share: float = 2.0) -> np.ndarray:
    """Haematoxylin direction from local contrast: eosin varies slowly at the scale of a nucleus, so
    where a pixel is much denser than its neighbourhood (the top `share` % of pixels), the excess OD
    is mostly haematoxylin. x: (N, H, W, 3) OD without background and line pattern."""
    hp = (x - gaussian_filter(x, (0, sigma, sigma, 0))).reshape(-1, 3)
    dense = hp.sum(1)
    return unit(hp[dense >= np.percentile(dense, 100 - share)].mean(0))


def eosin_vector(x: np.ndarray, sigma: float = 1.5, share: float = 30.0) -> np.ndarray:
    """Eosin direction: the main axis of OD variation over pixels far from any nucleus (the `share` %
    whose 3x3 neighbourhood has the least local excess density); independent of the background."""
    from scipy.ndimage import maximum_filter

    dense = (x - gaussian_filter(x, (0, sigma, sigma, 0))).sum(-1)
    near = maximum_filter(dense, (1, 3, 3)).ravel()
    px = x.reshape(-1, 3)[near <= np.percentile(near, share)]
    _, vecs = np.linalg.eigh(np.cov(px.T))
    return unit(vecs[:, -1] * np.sign(vecs[:, -1].sum()))


def estimate(
    od: np.ndarray,
    lines: bool = False,
    h: str = "contrast",
    e: str = "axis",
    rounds: int = 1,
    hed=None,
    floor=None,
    **kw,
) -> Stain:
    """A site's stain from its training tiles (N, H, W, 3) OD: the scanner's fixed line pattern
    (`lines`), the eosin direction (Macenko's eosin extreme), the haematoxylin direction (`h`:
    "contrast", "macenko", or "prior": Ruifrok's vector projected on the stain plane), and the
    background: the OD off the stain plane (with `floor`, plus that percentile of the haematoxylin
    concentration along h: every tissue has pixels without nuclei; measured worse, off by default)."""
    pattern = fixed_pattern(od) if lines else np.zeros(od.shape[1:3])
    x = od - pattern[..., None]
    bg, given = np.zeros(3), hed
    for _ in range(rounds):
        mac = macenko_vectors((x - bg).reshape(-1, 3))
        if e == "axis":
            mac[1] = eosin_vector(x)
        if h == "contrast":
            hed = np.stack([contrast_vector(x, **kw), mac[1]])
        elif h == "prior":
            q, _ = np.linalg.qr(mac.T)
            hed = np.stack([unit(q @ q.T @ H_REF), mac[1]])
        else:
            hed = mac
        hed = hed if given is None else given
        conc, res = Stain(hed, np.zeros(3), pattern).unmix(od)
        bg = np.median(res.reshape(-1, 3), 0)
        if floor is not None:
            bg = bg + np.percentile(conc[..., 0], floor) * hed[0]
    return with_top(Stain(hed, bg, pattern), od)


def true_stain(site: str, size: int, lines: bool, od: np.ndarray) -> Stain:
    """The renderer's own stain for a site (for checking estimators; not available on real data)."""
    import medi_dist.data.procedural as procedural
    from medi_dist.data.morphology import _grid

    st = procedural.site_stain(site)
    pattern = np.zeros((size, size))
    if lines:
        yy, xx = _grid(size)
        period, angle, amp = st.lines
        pattern = amp * (1 + np.sin(2 * np.pi * (yy * np.cos(angle) + xx * np.sin(angle)) / period)) / 2
    out = Stain(np.stack([unit(st.h), unit(st.e)]), st.bg.copy(), pattern)
    return with_top(out, od)


ESTIMATORS = {"macenko": estimate_macenko, "fit": estimate}


# ---------------------------------------------------------------- the space
class StainSpace:
    """Per-site stains of a training set, and the maps between tiles and concentration space."""

    def __init__(self, stains: dict[str, Stain], owner: dict[str, str], counts: dict[str, int]):
        self.stains, self.owner = stains, owner
        by_type: dict = {}
        for s, t in owner.items():
            by_type.setdefault(t, []).append(stains[s].top)
        self.type_top = {t: np.mean(v, 0) for t, v in by_type.items()}
        self.donor = {t: max((s for s in owner if owner[s] == t), key=counts.get) for t in by_type}

    @classmethod
    def fit(cls, tiles: np.ndarray, sites: np.ndarray, types: np.ndarray, estimator: str = "macenko", **kw):
        owner = {s: str(types[sites == s][0]) for s in sorted(set(sites))}
        od = {s: optical_density(tiles[sites == s]) for s in owner}
        stains = ESTIMATORS[estimator](od, owner, **kw) if estimator in JOINT else None
        if stains is None:
            stains = {s: ESTIMATORS[estimator](od[s], **kw) for s in owner}
        return cls(stains, owner, {s: int((sites == s).sum()) for s in owner})

    def scale(self, t: str, s: str) -> np.ndarray:
        """Concentration scale of type t rendered at site s: s's intensity relative to its own type's
        average site, times t's (all the data identify)."""
        return self.type_top[t] * self.stains[s].top / self.type_top[self.owner[s]]

    def to_model(self, images: np.ndarray, sites) -> torch.Tensor:
        """uint8 (N, H, W, 3) tiles of their own sites -> float (N, 3, H, W) in about [-1, 1]:
        concentrations over the site's `top`, and the residual's length along h x e."""
        out = np.empty(images.shape, np.float32)
        for i, (img, s) in enumerate(zip(images, sites)):
            st = self.stains[s]
            conc, res = st.unmix(optical_density(img))
            out[i, ..., :2] = conc / st.top * (2 / RANGE) - 1
            out[i, ..., 2] = res @ unit(np.cross(*st.hed)) * RESIDUAL_GAIN
        return torch.from_numpy(np.clip(out, -1, 1)).permute(0, 3, 1, 2).contiguous()

    def to_rgb(self, x: torch.Tensor, types, sites) -> np.ndarray:
        """Model-range concentration maps -> uint8 tiles in each requested (type, site)'s stain; a row
        without a site is rendered at its type's largest training site."""
        x = x.detach().float().permute(0, 2, 3, 1).cpu().numpy().astype(np.float64)
        out = np.empty(x.shape, np.uint8)
        for i, (c, t, s) in enumerate(zip(x, types, sites)):
            s = s if s in self.stains else self.donor[t]
            conc = (c[..., :2] + 1) * (RANGE / 2) * self.scale(t, s)
            res = c[..., 2:] / RESIDUAL_GAIN * unit(np.cross(*self.stains[s].hed))
            out[i] = to_uint8(self.stains[s].mix(conc, res))
        return out

    def transfer(self, images: np.ndarray, types, donors, sites) -> np.ndarray:
        """Tiles of type t at their site `donor` re-stained into site s: unmixed with the donor's stain,
        concentrations rescaled, mixed with s's stain (the OD residual carried over unchanged), then
        stored at s's JPEG quality."""
        out = np.empty_like(images)
        for i, (img, t, d, s) in enumerate(zip(images, types, donors, sites)):
            conc, res = self.stains[d].unmix(optical_density(img))
            rgb = 256 * np.exp(-self.stains[s].mix(conc / self.stains[d].top * self.scale(t, s), res)) - 1
            out[i] = store(rgb, self.stains[s].quality)
        return out


JOINT: set = set()
