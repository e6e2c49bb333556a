"""The baselines a pathologist reaches for first against stain shortcuts, on uint8 tiles (N, H, W, 3).

- HED jitter (Tellez et al. 2018/2019): each tile's haematoxylin, eosin and DAB channels (scikit-image's
  colour deconvolution) scaled by a ~ U(1 - s, 1 + s) and shifted by b ~ U(-s, s).
- Macenko normalisation (torchstain): every slide's stain matrix is estimated from all its tiles and
  mapped onto one reference stain (fitted on the training tiles), train and test alike.
- Re-staining: real tiles of one site mapped into another training site's stain (Macenko fitted per
  site): the non-generative twin of MeDi's unseen (type, site) pairs.
- Re-staining with the sites' stains (`restain-sites`): the same, moved with the per-site stains MeDi's
  stain composition uses (data/site_stains.py, directions at source resolution): its exact twin.

Stain matrices are estimated per group (a slide or a site), never per 32-px tile, where too few
pixels make Macenko's angle percentiles noisy: a group's tiles are stacked into one image.
"""

from __future__ import annotations

import numpy as np

AUGMENTS = ("none", "hed-jitter", "restain", "restain-sites")
NORMALIZERS = ("none", "macenko")


def hed_jitter(images: np.ndarray, rng: np.random.Generator, sigma: float = 0.05) -> np.ndarray:
    from skimage.color import hed2rgb, rgb2hed

    out = np.empty_like(images)
    for i, img in enumerate(images):
        hed = rgb2hed(img)
        a, b = rng.uniform(1 - sigma, 1 + sigma, 3), rng.uniform(-sigma, sigma, 3)
        # add the jitter's change only: skimage's rgb2hed clips negative stain amounts, so a plain
        # round trip would already shift near-white pixels by up to ~10 %
        change = (hed2rgb(hed * a + b) - hed2rgb(hed)) * 255
        out[i] = np.clip(img + change + 0.5, 0, 255).astype(np.uint8)
    return out


def fit_macenko(images: np.ndarray):
    """A torchstain Macenko normalizer fitted on the stacked tiles, or None where the tiles are too
    pale to estimate a stain (no pixel above the optical-density threshold)."""
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    n = NumpyMacenkoNormalizer()
    try:
        n.fit(images.reshape(-1, images.shape[2], 3))
    except (ValueError, IndexError, np.linalg.LinAlgError):
        return None
    return n


def _apply(norm, images: np.ndarray) -> np.ndarray:
    """Map a group's tiles (one stain, estimated from all of them) onto `norm`'s reference stain."""
    if norm is None:
        return images
    try:
        out, _, _ = norm.normalize(images.reshape(-1, images.shape[2], 3), stains=False)
    except (ValueError, IndexError, np.linalg.LinAlgError):
        return images  # a group too pale for Macenko stays as it is
    return out.reshape(images.shape)


def _groups(keys) -> dict:
    out: dict = {}
    for i, k in enumerate(map(str, keys)):
        out.setdefault(k, []).append(i)
    return {k: np.array(v) for k, v in out.items()}


def macenko_normalize(images: np.ndarray, groups, reference: np.ndarray) -> np.ndarray:
    """Every group (slide) of `images` mapped onto the stain of `reference` tiles."""
    target = fit_macenko(reference)
    out = images.copy()
    for rows in _groups(groups).values():
        out[rows] = _apply(target, images[rows])
    return out


def restain(images: np.ndarray, slides, sites, seed: int) -> np.ndarray:
    """Each slide's tiles re-stained into the stain of another site of `sites` (seeded per slide)."""
    sites = np.asarray(sites).astype(str)
    targets = {s: fit_macenko(images[rows]) for s, rows in _groups(sites).items()}
    names = sorted(targets)
    rng = np.random.default_rng([seed, 5])
    out = images.copy()
    for _slide, rows in sorted(_groups(slides).items()):
        others = [s for s in names if s != sites[rows[0]]] or names
        out[rows] = _apply(targets[others[int(rng.integers(len(others)))]], images[rows])
    return out


def restain_sites(images: np.ndarray, types, slides, sites, stains, seed: int) -> np.ndarray:
    """Each slide's tiles moved into another training site's stain (seeded per slide) with `stains`
    (a data.site_stains.SiteStains); tiles of a site it does not hold are kept as they are. Real tiles
    keep their own scanner's fine detail: rescaling it to the target's (what generated tiles get) cost
    this baseline 0.017 balanced / 0.068 worst-site accuracy in the demo (benchmarks/RESULTS.md)."""
    types, sites = np.asarray(types).astype(str), np.asarray(sites).astype(str)
    stains = stains.without_detail()
    names = sorted(stains.stains)
    rng = np.random.default_rng([seed, 6])
    out = images.copy()
    for _slide, rows in sorted(_groups(slides).items()):
        own = sites[rows[0]]
        if own in stains.stains and len(names) > 1:
            to = [s for s in names if s != own][int(rng.integers(len(names) - 1))]
            out[rows] = stains.transfer(images[rows], types[rows], [own] * len(rows), [to] * len(rows))
    return out
