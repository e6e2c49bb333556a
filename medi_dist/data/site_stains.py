"""Each training site's stain (Beer-Lambert), and moving a tile into another site's stain.

A pixel's optical density is OD = C_h * h + C_e * e + bg + P(x, y) * (1, 1, 1): the site gives the
unit stain directions h and e, the background bg and its scanner's fixed pattern P (in the stored
tile's frame); the tissue gives the concentrations C. A tile of type t drawn at one of t's own
sites d is moved to site s by unmixing it with d's stain, rescaling the concentrations, and mixing
them with s's stain (`SiteStains.transfer`): the stain half of a composed generator whose network
only ever draws pairs it saw in training (generate/writer.py, composition "stain").

Directions need source resolution: at 32 px a nucleus is 2-3 pixels, blur and JPEG chroma mix the
stains and every estimator is 0.2-0.8 off per component; at 256 px this one is ~0.05 off
(benchmarks/RESULTS.md, "Per-site stain estimators at source resolution"). So `directions` and
`level` take OD at source resolution and `fit_site` the rest at the model's resolution, where the
generator's tiles live; data/stain_estimation.py estimates each training site's stain from a
dataset's shards.

The confound: where each site holds one type, a site's intensity cannot be told from its type's
concentrations; only ratios between sites of one type can. Type t moved to site s takes s's intensity
relative to its own type's sites, times t's (`SiteStains.scale`). The intensity is read as a high
percentile of the concentrations at source resolution (`level`): a mean at the model's resolution is
pulled about by small errors in the directions wherever one stain is faint.

A moved tile is rendered from its concentrations alone (Macenko's reconstruction): the OD off the
stain plane is dropped, and the target site's scanner stores it. Generated tiles at their own site
go through the same rendering (`transfer(..., own="render")`): the site's stain replaces the
network's off-plane colour noise (calibrated stain at seen pairs 0.57 -> 0.79 in the demo's world,
benchmarks/RESULTS.md).

A small network draws a site's tissue a little too light, too dark or too flat. Optionally
(generation's `calibration_tiles`), a generated tile's concentrations are mapped quantile by quantile
onto those of the real tiles of the site it was drawn at before it is rendered (`SiteStains.calibrated`):
that pair was trained, so its real tiles are the ground truth; the map is measured on a few draws there.

What a move gets wrong (directions a few degrees off, a background carrying the leak, the level) is
known where the truth is: between two sites of one type. Each site's share of what such moves miss
corrects every move there (`SiteStains.with_move_corrections`), to a site of another type too.

Each scanner also leaves its own fine detail (blur lowers it, JPEG and sensor noise raise it), and a
moved tile would bring its donor's; a small network draws its own amount. So a rendered tile's high
frequencies are scaled to the target's detail (`SiteStains.stored`), estimated like intensity: a
site's own relative to its type's other sites, times the requested type's.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

DETAIL_SIGMA = 0.7  # px at the model's resolution: the scale of "fine detail" (a site's blur acts there)
GAIN = (0.25, 4.0)  # a tile's detail is scaled by at most this much (a near-empty tile has none to match)
QUANTILES = np.linspace(0.5, 99.5, 100)  # of a site's concentrations: what a network's draws are mapped onto
SITE, TYPE = "tissue_source_site", "cancer_type"


def optical_density(images: np.ndarray, dtype=np.float64) -> np.ndarray:
    return -np.log((images.astype(dtype) + 1) / 256)


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


# a reference-stain model's stain: Ruifrok & Johnston's h and e, a faint background (keeps noise >= 0)
REFERENCE_HED = unit(np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]]))
REFERENCE_BG = 0.05


@dataclass
class Stain:
    """One site: unit OD directions (rows h, e), background OD, fixed pattern (H, W) at the model's
    resolution, concentration level `top` (the site's intensity times its type's: `level`), JPEG quality
    and the fine detail its scanner leaves (`detail`)."""

    hed: np.ndarray
    bg: np.ndarray
    pattern: np.ndarray
    top: np.ndarray
    quality: int | None = None
    detail: float | None = None  # fine-detail energy of its tiles (`detail`)
    quantiles: np.ndarray | None = None  # (QUANTILES, 2) of its tiles' concentrations at the model's resolution
    move: np.ndarray | None = None  # (2, 3): tiles moved here are off by (`SiteStains.with_move_corrections`)

    def unmix(self, od: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(..., H, W, 3) OD -> concentrations (..., H, W, 2) and the OD they leave unexplained."""
        x = od - self.bg - self.pattern[..., None]
        conc = x @ np.linalg.pinv(self.hed)
        return conc, x - conc @ self.hed

    def mix(self, conc: np.ndarray, residual: np.ndarray) -> np.ndarray:
        return conc @ self.hed + residual + self.bg + self.pattern[..., None]

    def to_dict(self) -> dict:
        arrays = {k: np.round(getattr(self, k), 5).tolist() for k in ("hed", "bg", "pattern", "top")}
        q, move = (None if v is None else np.round(v, 5).tolist() for v in (self.quantiles, self.move))
        return {**arrays, "quality": self.quality, "detail": self.detail, "quantiles": q, "move": move}

    @classmethod
    def from_dict(cls, d: dict) -> Stain:
        arrays = (np.asarray(d[k], np.float64) for k in ("hed", "bg", "pattern", "top"))
        q, move = (None if d.get(k) is None else np.asarray(d[k], np.float64) for k in ("quantiles", "move"))
        return cls(*arrays, d.get("quality"), d.get("detail"), q, move)


# ---------------------------------------------------------------- estimators
def fixed_pattern(od: np.ndarray) -> np.ndarray:
    """A scanner's pattern fixed in its frame: the per-pixel mean OD over a site's tiles (the tissue
    averages out), less its 2nd percentile (the pattern adds density and is zero somewhere)."""
    m = od.mean(axis=(0, 3))
    return m - np.percentile(m, 2)


def macenko_vectors(od: np.ndarray, beta: float = 0.15, alpha: float = 1.0) -> np.ndarray:
    """Unit OD vectors of haematoxylin and eosin (rows), from background-free (N, 3) OD pixels."""
    od = od[np.linalg.norm(od, axis=1) > beta]
    _, vecs = np.linalg.eigh(np.cov(od.T))
    plane = vecs[:, [2, 1]]
    plane *= np.sign(plane.sum(0, keepdims=True))  # OD vectors point into the positive octant
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])
    v1, v2 = plane @ [np.cos(lo), np.sin(lo)], plane @ [np.cos(hi), np.sin(hi)]
    h, e = (v1, v2) if v1[0] > v2[0] else (v2, v1)  # haematoxylin absorbs more red
    return np.stack([unit(h), unit(e)])


def faint_background(x: np.ndarray, share: float = 0.5) -> np.ndarray:
    """Background OD of the faintest pixels (median OD of the `share` % with the least density)."""
    flat = x.reshape(-1, 3)
    total = flat.sum(1)
    return np.median(flat[total <= np.percentile(total, share)], 0)


def regress_h(x: np.ndarray, e: np.ndarray, sigma: float = 4.0, share: float = 10.0) -> np.ndarray:
    """Haematoxylin given eosin: in the stain plane, h = n + k e with n the in-plane normal to e; k is
    the slope of the high-pass OD along e on the high-pass OD along n over the `share` % of pixels
    with the most high-pass density along n (fine, mostly nuclear texture, where eosin varies little)."""
    flat = x.reshape(-1, 3)
    flat = flat[np.linalg.norm(flat, axis=1) > 0.15]
    _, vecs = np.linalg.eigh(np.cov(flat.T))
    plane = vecs[:, [2, 1]]
    e = unit(plane @ (plane.T @ e))
    n = np.cross(np.cross(plane[:, 0], plane[:, 1]), e)
    n = n * np.sign(n[0] - n[1])  # haematoxylin absorbs more red than eosin does
    hp = x - gaussian_filter(x, (0, sigma, sigma, 0))
    a, b = (hp @ n).ravel(), (hp @ e).ravel()
    m = np.abs(a) >= np.percentile(np.abs(a), 100 - share)
    return unit(n + np.sum(a[m] * b[m]) / np.sum(a[m] ** 2) * e)


def directions(od: np.ndarray) -> np.ndarray:
    """Unit h and e rows of one site from its (N, H, W, 3) OD at source resolution: Macenko's eosin
    extreme of the OD less the faintest pixels' OD, haematoxylin by regression."""
    x = od - fixed_pattern(od)[..., None]
    e = macenko_vectors((x - faint_background(x)).reshape(-1, 3), beta=0.2)[1]
    return np.stack([regress_h(x, e), e])


def level(od: np.ndarray, hed: np.ndarray, q: float = 90) -> np.ndarray:
    """A site's concentration level from its (N, H, W, 3) OD at source resolution: the q-th percentile
    of each stain's concentration (after the fixed pattern and the faintest pixels' OD)."""
    x = od - fixed_pattern(od)[..., None]
    conc = ((x - faint_background(x)).reshape(-1, 3) @ np.linalg.pinv(hed)).astype(np.float64)
    return np.maximum(np.percentile(conc, q, axis=0), 1e-3)


def high_pass(rgb: np.ndarray) -> np.ndarray:
    """The fine detail of (..., H, W, 3) tiles: what a blur of DETAIL_SIGMA px removes."""
    sigma = [0] * (rgb.ndim - 3) + [DETAIL_SIGMA, DETAIL_SIGMA, 0]
    return rgb - gaussian_filter(rgb, sigma)


def detail(rgb: np.ndarray) -> float:
    """A site's fine-detail energy: the mean square high-pass of its (N, H, W, 3) tiles' RGB. Its
    scanner's blur lowers it; JPEG, sensor noise and a stronger stain raise it."""
    return float(np.mean(high_pass(rgb.astype(np.float64)) ** 2))


def concentration_quantiles(conc: np.ndarray) -> np.ndarray:
    """(QUANTILES, 2): the distribution of each stain's concentration over (..., 2) pixels."""
    return np.percentile(conc.reshape(-1, 2), QUANTILES, axis=0)


def fit_site(od: np.ndarray, hed: np.ndarray, top: np.ndarray, quality: int | None = None) -> Stain:
    """The rest of a site's stain at the model's resolution, given its directions and level: fixed
    pattern, background (median OD off the stain plane), fine detail, its concentrations' quantiles."""
    pattern = fixed_pattern(od)
    _, res = Stain(hed, np.zeros(3), pattern, top).unmix(od)
    st = Stain(hed, np.median(res.reshape(-1, 3), 0), pattern, top, quality, detail(256 * np.exp(-od) - 1))
    return replace(st, quantiles=concentration_quantiles(st.unmix(od)[0]))


def _od_stats(rgb: np.ndarray) -> np.ndarray:
    """(2, 3): the mean OD and the log of its spread, per channel, over (N, H, W, 3) uint8 tiles."""
    od = optical_density(rgb).reshape(-1, 3)
    return np.stack([od.mean(0), np.log(od.std(0))])


def _luma_table(quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG", quality=quality)
    with Image.open(buf) as im:
        return np.array(im.quantization[0])


def jpeg_quality(files: list[bytes]) -> int | None:
    """The JPEG quality a site's scanner stores at (the standard luma table nearest the median one of
    its files); None where its files are not JPEG."""
    tables = []
    for data in files:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG":
                tables.append(im.quantization[0])
    if not tables:
        return None
    median = np.median(np.array(tables), 0)
    return min(range(1, 101), key=lambda q: np.abs(_luma_table(q) - median).sum())


def store(rgb: np.ndarray, quality: int | None) -> np.ndarray:
    """Float RGB -> uint8, as a scanner storing JPEG at `quality` (None: no JPEG) would keep it."""
    rgb = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    if quality is None:
        return rgb
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------- a training set's stains
class SiteStains:
    """Per-site stains of a training set and the type -> site moves they allow."""

    def __init__(self, stains: dict[str, Stain], owner: dict[str, str]):
        self.stains, self.owner = stains, owner
        self.type_top = self._by_type(lambda st: st.top)  # geometric: levels are ratios
        with_detail = all(st.detail for st in stains.values())  # stains estimated before it had no detail
        self.type_detail = self._by_type(lambda st: st.detail) if with_detail else None

    def _by_type(self, part) -> dict:
        """Each type's geometric mean of a part of its sites' stains."""
        by_type: dict = {}
        for s, t in self.owner.items():
            by_type.setdefault(t, []).append(np.log(part(self.stains[s])))
        return {t: np.exp(np.mean(v, 0)) for t, v in by_type.items()}

    def scale(self, t: str, s: str) -> np.ndarray:
        """Concentration scale of type t at site s: s's intensity relative to its own type's sites, times t's."""
        return self.type_top.get(t, self.type_top[self.owner[s]]) * self.stains[s].top / self.type_top[self.owner[s]]

    def stored(self, rgb: np.ndarray, t: str, s: str) -> np.ndarray:
        """A float (H, W, 3) tile of type t in s's stain as s's scanner stores it: its fine detail scaled
        to what that scanner leaves on t (s's detail relative to its own type's sites, times t's, as
        `scale`: blur, like intensity, is confounded with type where each site holds one), then JPEG at
        s's quality. JPEG takes some detail back: the gain is corrected once on the stored tile."""
        st = self.stains[s]
        if self.type_detail is None:  # stains recorded before the detail was estimated
            return store(rgb, st.quality)
        want = self.type_detail.get(t, self.type_detail[self.owner[s]]) * st.detail / self.type_detail[self.owner[s]]
        hp = high_pass(rgb)
        gain = np.clip(np.sqrt(want / max(float(np.mean(hp**2)), 1e-12)), *GAIN)
        first = store(rgb + (gain - 1) * hp, st.quality)
        gain = np.clip(gain * np.sqrt(want / max(detail(first), 1e-12)), *GAIN)
        return store(rgb + (gain - 1) * hp, st.quality)

    def without_detail(self) -> SiteStains:
        """The same stains, tiles stored at the target's JPEG quality with their detail as it is."""
        flat = copy.copy(self)
        flat.type_detail = None
        return flat

    def nearest(self, site: str, candidates: list[str]) -> str:
        """The candidate whose stain directions lie closest to `site`'s (sum of the h and e angles): the
        donor a moved tile is drawn at. With the moves corrected, it beat a donor chosen at random in
        three worlds (RESULTS.md "The donor nearest in stain direction"; session 24, "Choosing the donor")."""
        to = self.stains[site].hed
        return min(
            candidates, key=lambda d: (float(np.arccos(np.clip((self.stains[d].hed * to).sum(1), -1, 1)).sum()), d)
        )

    def _unpatterned(self) -> dict[str, Stain]:
        """The stains as a network's draws carry them: a convolutional network cannot place a pattern
        fixed in the scanner's frame, so it draws only the pattern's mean density, in the tissue's colour."""
        return {d: replace(st, pattern=np.full_like(st.pattern, st.pattern.mean())) for d, st in self.stains.items()}

    def drawn_quantiles(self, images: np.ndarray, sites) -> dict[str, np.ndarray]:
        """Per site, the quantiles of the concentrations in a network's uint8 draws there (`calibrated`)."""
        sites, stains = np.asarray(sites), self._unpatterned()
        return {d: concentration_quantiles(stains[d].unmix(optical_density(images[sites == d]))[0]) for d in set(sites)}

    def calibrated(self, conc: np.ndarray, site: str, drawn: np.ndarray) -> np.ndarray:
        """A network's concentrations at `site` mapped, quantile by quantile and stain by stain, onto the
        site's real ones: what it draws too light, too dark or too flat there is put right before a
        tile is moved (at its own site, a seen pair, the real tiles are the ground truth)."""
        real = self.stains[site].quantiles
        return np.stack([np.interp(conc[..., k], drawn[:, k], real[:, k]) for k in range(2)], -1)

    def transfer(
        self, images: np.ndarray, types, donors, sites, own: str = "keep", patterned: bool = True, drawn=None
    ) -> np.ndarray:
        """uint8 tiles of type t at site `donor` -> the same tissue in site s's stain (its concentrations
        only), with s's fixed pattern, fine detail and JPEG quality (`stored`). Tiles already at s: kept
        (`own="keep"`) or rendered in s's stain all the same (`own="render"`, for generated tiles).
        `patterned=False`: the tiles carry no scanner pattern to unmix away. A network's draws do not: a
        convolutional network cannot place a pattern fixed in the scanner's frame, so it draws none, and
        subtracting the donor's would leave its negative in the moved tile (RESULTS.md "scanner pattern").
        `drawn`: donor site -> the network's concentration quantiles there (`drawn_quantiles`): each
        tile's concentrations are `calibrated` onto the donor's real ones first."""
        out = np.empty_like(images)
        source = self.stains if patterned else self._unpatterned()
        for i, (img, t, d, s) in enumerate(zip(images, types, donors, sites)):
            if d == s and own == "keep":
                out[i] = img
                continue
            conc, _ = source[d].unmix(optical_density(img))
            if drawn is not None:
                conc = self.calibrated(conc, d, drawn[d])
            scale = 1 if d == s else self.scale(t, s) / self.stains[d].top
            od = self.stains[s].mix(conc * scale, 0)
            out[i] = self.stored(256 * np.exp(-(od if d == s else self._corrected(od, d, s))) - 1, t, s)
        return out

    def _corrected(self, od: np.ndarray, d: str, s: str) -> np.ndarray:
        """A tile's (H, W, 3) OD moved from d to s with the moves' measured errors taken out: its mean
        shifted by s's correction less d's, its spread about its mean scaled likewise."""
        to, of = self.stains[s].move, self.stains[d].move
        if to is None or of is None:  # stains recorded before the corrections
            return od
        m = od.mean((0, 1))
        return np.exp(to[1] - of[1]) * (od - m) + m + to[0] - of[0]

    def with_move_corrections(self, tiles: dict[str, np.ndarray], n: int = 256) -> SiteStains:
        """The same stains with each site's move correction (`Stain.move`), from its real uint8 tiles
        (`tiles`, at the model's resolution): a type's tiles moved between its own sites, where the
        truth is known. A move q -> s misses s's real tiles' mean OD and log spread by c[q -> s] (per
        channel); read as u_s - u_q, least squares with u summing to zero over the type's sites (the
        confound leaves a type's common part unknown) gives u_s = sum_q (c[q -> s] - c[s -> q]) / 2k.
        A move d -> s is then corrected by u_s - u_d, whatever the types; a type's only site gets 0.
        Unseen stain of moved ground-truth donors 0.74 / 0.60 / 0.35 -> 0.79 / 0.74 / 0.45 in three
        worlds, seen pairs untouched (benchmarks/RESULTS.md, session 24)."""
        plain = SiteStains({s: replace(st, move=None) for s, st in self.stains.items()}, self.owner)
        stats = {s: _od_stats(tiles[s][:n]) for s in self.owner}
        move = {s: np.zeros((2, 3)) for s in self.owner}
        for t in sorted(set(self.owner.values())):
            mine = sorted(s for s in self.owner if self.owner[s] == t)
            miss = {}
            for q in mine:
                for s in mine:
                    if q != s:
                        k = min(n, len(tiles[q]))
                        miss[q, s] = stats[s] - _od_stats(plain.transfer(tiles[q][:k], [t] * k, [q] * k, [s] * k))
            for s in mine:
                move[s] += sum((miss[q, s] - miss[s, q]) / (2 * len(mine)) for q in mine if q != s)
        return SiteStains({s: replace(st, move=move[s]) for s, st in self.stains.items()}, self.owner)

    def to_reference(self, images: np.ndarray, sites) -> np.ndarray:
        """uint8 training tiles -> float32 RGB in the reference stain: each tile's concentrations (its
        site's pattern, background and off-plane OD dropped) at its type's level, so the network sees no
        site's colour, intensity or scanner pattern. A tile of a site without a stain is kept."""
        out = images.astype(np.float32)
        for i, s in enumerate(sites):
            if s in self.stains:
                conc, _ = self.stains[s].unmix(optical_density(images[i]))
                conc *= self.type_top[self.owner[s]] / self.stains[s].top
                out[i] = np.clip(256 * np.exp(-conc @ REFERENCE_HED - REFERENCE_BG) - 1, 0, 255)
        return out

    def from_reference(self, images: np.ndarray, types, sites) -> np.ndarray:
        """uint8 tiles drawn in the reference stain -> uint8 tiles of type t in site s's stain at t's
        scale there, stored with s's fine detail and JPEG quality (`stored`)."""
        conc = (optical_density(images) - REFERENCE_BG) @ np.linalg.pinv(REFERENCE_HED)
        out = np.empty(images.shape, np.uint8)
        for i, (c, t, s) in enumerate(zip(conc, types, sites)):
            k = self.scale(t, s) / self.type_top.get(t, self.type_top[self.owner[s]])
            out[i] = self.stored(256 * np.exp(-self.stains[s].mix(c * k, 0)) - 1, t, s)
        return out

    def to_dict(self) -> dict:
        return {"owner": self.owner, "stains": {s: st.to_dict() for s, st in self.stains.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> SiteStains:
        return cls({s: Stain.from_dict(v) for s, v in d["stains"].items()}, d["owner"])
