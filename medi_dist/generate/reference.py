"""Reference pools made without a generative model, in the same plan and pool format as a generator's:

- ``oracle``: ground truth. On a procedural dataset the renderer can draw any (type, site) pair, so
  this is what a perfect MeDi generator would return for the plan (the ceiling of every table).
  Refused for any other dataset: real data has no renderer.
- ``noise``: a control. Smoothed noise in the stain of the requested site, labelled with the
  requested type: haematoxylin and eosin amounts drawn from their spread over *all* training tiles
  (so the amounts say nothing about the type), mixed with the site's own stain vectors (Macenko,
  fitted on the site's training tiles). It carries the site's colour and the labels but no
  morphology: an arm must beat it before its gain is about the tiles. (Per-site colour statistics
  alone would not do: a site's mean colour carries its owner type's nuclei density.)

Tiles are a function of (dataset, plan, tile seed) only, like a generator's, and go through the same
shard writer, resume and dataset files (generate/job.py).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from ..data.shards import VOCAB, load_manifest
from ..metadata import ConditioningSpec
from .plan import SITE, TYPE, PlanError
from .writer import SamplingSettings, ShardGenerator

KINDS = ("oracle", "noise")


def check_reference(kind: str, dataset: str | Path) -> dict:
    """The dataset's manifest, after refusing what cannot work (message says what to use instead)."""
    if kind not in KINDS:
        raise PlanError(f"reference pool must be one of {KINDS}, got {kind!r}")
    manifest = load_manifest(dataset)
    if manifest.get("synthetic"):
        raise PlanError(f"{dataset} is a synthetic pool; the {kind} pool is made from the real dataset it imitates")
    if kind == "oracle" and manifest.get("source") != "procedural":
        raise PlanError(
            f"an oracle pool renders ground truth with the procedural renderer, but {dataset} was "
            f"ingested from {manifest.get('source')!r} data, which has no renderer; use --reference "
            "noise for a control, or a generator model (--model)"
        )
    return manifest


def reference_spec(dataset: str | Path) -> ConditioningSpec:
    """Pools are planned over (type, site) only: other columns are not rendered."""
    return ConditioningSpec.load(Path(dataset) / VOCAB).subset([TYPE, SITE])


IO = 240  # transmitted light, as torchstain's Macenko


def site_stains(dataset: str | Path) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Per training site its stain matrix (3 x 2 optical densities of H and E, Macenko), and the mean
    and spread of the (H, E) amounts per pixel over every training tile of every site."""
    from ..evaluate.fidelity_job import read_tiles
    from ..evaluate.stain import fit_macenko

    images, index = read_tiles(dataset, ["train"], None)
    stains, amounts = {}, []
    for site, rows in index.groupby(SITE).indices.items():
        he = fit_macenko(images[rows])
        if he is None:
            raise PlanError(
                f"{dataset}: the tiles of site {site} are too pale to estimate a stain; "
                "a noise control needs every training site's stain"
            )
        stains[str(site)] = he.HERef
        od = -np.log((images[rows].reshape(-1, 3).astype(np.float64) + 1) / IO)
        amounts.append(np.linalg.lstsq(he.HERef, od.T, rcond=None)[0].T[:: max(1, len(od) // 20000)])
    amounts = np.clip(np.concatenate(amounts), 0, None)
    return stains, amounts.mean(0), amounts.std(0)


class ReferenceGenerator(ShardGenerator):
    """`ShardGenerator` whose tiles come from the renderer (oracle) or coloured noise (noise)."""

    def __init__(self, kind: str, dataset: str | Path, out_dir: str | Path):
        from ..evaluate.fidelity_job import scanner_lines, tile_size

        self.kind, self.out = kind, Path(out_dir)
        self.s = SamplingSettings(sampler=kind, steps=0)
        self.size = tile_size(dataset)
        self.stains, self.mean, self.std = site_stains(dataset) if kind == "noise" else ({}, None, None)
        self.lines = scanner_lines(dataset)

    def sample_tiles(self, tiles: list[dict], task: dict | None = None) -> np.ndarray:
        from ..data.procedural import render_jpeg

        out = np.empty((len(tiles), self.size, self.size, 3), np.uint8)
        for i, t in enumerate(tiles):
            rng = np.random.default_rng(t["seed"])
            c = t["conditions"]
            if self.kind == "oracle":
                with Image.open(io.BytesIO(render_jpeg(c[TYPE], c[SITE], rng, self.size, self.lines))) as im:
                    out[i] = np.asarray(im.convert("RGB"))
            else:  # type-neutral H and E amounts, the requested site's stain vectors
                z = gaussian_filter(rng.standard_normal((self.size, self.size, 2)), (1, 1, 0))
                amount = np.clip(self.mean + self.std * z / (z.std(axis=(0, 1)) + 1e-6), 0, None)
                od = amount @ self.stains[c[SITE]].T
                out[i] = np.clip(IO * np.exp(-od) + 0.5, 0, 255).astype(np.uint8)
        return out
