"""Diffusion in stain-concentration space (issue 13 experiment; benchmarks only until it is shown).

Beer-Lambert: a pixel's optical density is OD = C_h * h + C_e * e + bg, where the site gives the stain
vectors h, e and the background bg, and the tissue (the type) gives the concentrations C. Each
site's h, e (Macenko: the extreme angles of its OD pixels in their top-2 principal plane) and bg (a low
OD percentile) are estimated from its training tiles. A tile becomes (C_h, C_e, C_r) with its own
site's stain (C_r: the residual along h x e), the concentrations divided by the site's 99th
percentile, so the denoiser sees concentration maps in which the site's stain is gone. A tile is
drawn for (type, site) in that space and rendered with the requested site's stain.

The confound: in this data each site belongs to one type, so a site's intensity cannot be told from
its type's concentrations; only ratios between sites of one type can. Rendering (type B, site s)
uses s's percentile relative to the mean over its own type's sites, times B's mean
(`benchmarks/stain_bounds.py` scores that ideal at 0.93 calibrated stain accuracy).
"""

from __future__ import annotations

import numpy as np
import torch

RANGE = 1.6  # normalised concentrations in [0, RANGE] map to model range [-1, 1]
RESIDUAL_GAIN = 4.0


def optical_density(images: np.ndarray) -> np.ndarray:
    return -np.log((images.reshape(-1, 3).astype(np.float64) + 1) / 256)


def macenko_vectors(od: np.ndarray, beta: float = 0.15, alpha: float = 1.0) -> np.ndarray:
    """Unit OD vectors of haematoxylin and eosin (rows), from background-free OD pixels."""
    od = od[np.linalg.norm(od, axis=1) > beta]
    _, vecs = np.linalg.eigh(np.cov(od.T))
    plane = vecs[:, [2, 1]]
    plane *= np.sign(plane.sum(0, keepdims=True))  # OD vectors point into the positive octant
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])
    v1, v2 = plane @ [np.cos(lo), np.sin(lo)], plane @ [np.cos(hi), np.sin(hi)]
    h, e = (v1, v2) if v1[0] > v2[0] else (v2, v1)  # haematoxylin absorbs more red
    return np.stack([h / np.linalg.norm(h), e / np.linalg.norm(e)])


class StainSpace:
    def __init__(self, tiles: np.ndarray, sites: np.ndarray, types: np.ndarray, bg_percentile: float | None = None):
        self.basis, self.bg, self.top = {}, {}, {}
        for s in sorted(set(sites)):
            od = optical_density(tiles[sites == s])
            bg = np.zeros(3) if bg_percentile is None else np.percentile(od, bg_percentile, axis=0)
            he = macenko_vectors(od - bg)
            r = np.cross(he[0], he[1])
            basis = np.stack([he[0], he[1], r / np.linalg.norm(r)])
            conc = (od - bg) @ np.linalg.inv(basis)
            self.basis[s], self.bg[s] = basis, bg
            self.top[s] = np.maximum(np.percentile(conc[:, :2], 99, axis=0), 1e-3)
        self.owner = {s: str(types[sites == s][0]) for s in self.basis}
        by_type: dict = {}
        for s, t in self.owner.items():
            by_type.setdefault(t, []).append(self.top[s])
        self.type_top = {t: np.mean(v, 0) for t, v in by_type.items()}
        self.donor = {
            t: max((s for s in self.owner if self.owner[s] == t), key=lambda s: (sites == s).sum()) for t in by_type
        }

    def to_model(self, images: np.ndarray, sites) -> torch.Tensor:
        """uint8 (N, H, W, 3) tiles of their own sites -> float (N, 3, H, W) in about [-1, 1]."""
        out = np.empty(images.shape, np.float32)
        for i, (img, s) in enumerate(zip(images, sites)):
            conc = (optical_density(img) - self.bg[s]) @ np.linalg.inv(self.basis[s])
            conc[:, :2] = conc[:, :2] / self.top[s] * (2 / RANGE) - 1
            conc[:, 2] *= RESIDUAL_GAIN
            out[i] = conc.reshape(img.shape)
        return torch.from_numpy(np.clip(out, -1, 1)).permute(0, 3, 1, 2).contiguous()

    def to_rgb(self, x: torch.Tensor, types, sites) -> np.ndarray:
        """Model-range concentration maps -> uint8 tiles in each requested (type, site)'s stain; a row
        without a site is rendered at its type's largest training site."""
        x = x.detach().float().permute(0, 2, 3, 1).cpu().numpy()
        out = np.empty(x.shape, np.uint8)
        for i, (c, t, s) in enumerate(zip(x, types, sites)):
            s = s if s in self.basis else self.donor[t]
            conc = c.reshape(-1, 3).astype(np.float64)
            scale = self.type_top[t] * self.top[s] / self.type_top[self.owner[s]]
            conc[:, :2] = (conc[:, :2] + 1) * (RANGE / 2) * scale
            conc[:, 2] /= RESIDUAL_GAIN
            od = conc @ self.basis[s] + self.bg[s]
            out[i] = np.clip(256 * np.exp(-od) - 1 + 0.5, 0, 255).astype(np.uint8).reshape(c.shape)
        return out
