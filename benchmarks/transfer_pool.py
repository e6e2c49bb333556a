"""A "composed generator" upper bound for the downstream protocol (issue 13): ground-truth donor tiles
moved to the requested site by `stain_space.StainSpace.transfer`, as a pool in the reference pools'
plan and format.

For each tile of the plan (a reference pool's `generation.json`: its plan, seed, tiles per shard), a
training tile of the requested type is drawn at one of that type's own sites (seeded by the tile's
seed) and moved to the requested site, with per-site stains from (i) the renderer's true stains
(`true`, the ceiling), (ii) the best all-estimated 32-px estimator (`est32`: Macenko e after a
faint-pixel background, regression h; stain_scale.py), (iii) with --source, the same estimator's
directions from the world ingested at 256 px (`est256`), the rest at 32 px. Every stain carries its
site's JPEG quality. With --donors POOL the donors are a generated pool's tiles (`medi-dist generate
--mode explicit` at each type's own training sites), each moved tile its own donor while they last,
and the pools are OUT/transfer-generated-<kind>. The pool goes through the generate job's shard writer
and dataset files (the reference-pool path, with this class as its tile source), so `medi-dist
evaluate downstream --synthetic DIR` reads it like the demo's pools.

    python benchmarks/transfer_pool.py --dataset /tmp/demo17/demo-output/data \
        --like /tmp/demo17/demo-output/reference-oracle --out /tmp/xfer --kind true est32 est256 \
        --source /tmp/stain2/world256
    # then `medi-dist evaluate downstream --synthetic POOL --out RUN` per pool (and the oracle pool), and
    python benchmarks/transfer_pool.py --summarise oracle=RUN0 true=RUN1 est32=RUN2 --out JSON
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import stain_space as ss  # noqa: E402
from stain_bounds import SITE, TYPE, site_files  # noqa: E402
from stain_scale import ESTIMATORS, directions, site_od  # noqa: E402

import medi_dist.generate.reference as reference  # noqa: E402
from medi_dist.evaluate.fidelity_job import read_tiles  # noqa: E402
from medi_dist.evaluate.metrics import mean_sem  # noqa: E402
from medi_dist.generate.job import GenerateConfig, generate  # noqa: E402
from medi_dist.generate.plan import GenerationPlan  # noqa: E402
from medi_dist.generate.writer import SamplingSettings, ShardGenerator  # noqa: E402

BEST = ESTIMATORS["Macenko e after a faint-pixel background, regression h"]


class TransferPool(ShardGenerator):
    """Tiles: a seeded training tile of the requested type at its own site, moved to the requested site."""

    space: ss.StainSpace
    tiles: np.ndarray
    sites: np.ndarray
    by_type: dict
    offset: dict = {}  # plan row -> its first donor among its type's (with --donors)

    def __init__(self, kind: str, dataset, out_dir):
        self.kind, self.out, self.s = kind, Path(out_dir), SamplingSettings(sampler=kind, steps=0)

    def sample_tiles(self, tiles: list[dict], task: dict | None = None) -> np.ndarray:
        if self.offset:  # --donors: the type's donors in turn, one per moved tile while they last
            idx = [self.by_type[t["conditions"][TYPE]] for t in tiles]
            idx = [d[(self.offset[t["row"]] + t["index"]) % len(d)] for d, t in zip(idx, tiles)]
        else:
            idx = [np.random.default_rng(t["seed"]).choice(self.by_type[t["conditions"][TYPE]]) for t in tiles]
        want = [t["conditions"] for t in tiles]
        return self.space.transfer(self.tiles[idx], [c[TYPE] for c in want], self.sites[idx], [c[SITE] for c in want])


def stains(kind: str, od32: dict, lines: bool, size: int, source: str | None, owner: dict) -> dict:
    if kind == "true":
        return {s: ss.true_stain(s, size, lines, od) for s, od in od32.items()}
    if kind == "est32":
        hed = {s: directions(od, lines, BEST, size)[0] for s, od in od32.items()}
    else:
        src_size = json.loads((Path(source) / "dataset.json").read_text())["renderer"]["size"]
        od, _ = site_od(source, src_size, owner, 1 << 23)
        hed = {s: directions(od[s], lines, BEST, src_size)[0] for s in owner}
    return {s: ss.estimate(od32[s], lines, hed=hed[s]) for s in od32}


def summarise(runs: dict[str, str], out: str) -> None:
    """Arms from `medi-dist evaluate downstream --out` directories (name -> dir, each real only + one
    pool; "oracle" among them): mean ± SEM, paired differences vs real only, the oracle arm and a
    "medi" arm if given, and the share of the real-only -> oracle gap closed (ratio of the mean paired
    differences)."""
    names = ("balanced_accuracy", "worst_site_accuracy")
    per_seed = lambda r: {x["seed"]: x for x in r["per_seed"]}  # noqa: E731
    res = {k: json.loads((Path(d) / "results.json").read_text()) for k, d in runs.items()}
    real = [per_seed(r["real only"]) for r in res.values()]
    arms = {"real only": real[0], **{k: per_seed(r[list(r)[-1]]) for k, r in res.items()}}
    seeds = sorted(real[0])
    diff = lambda k, ref: mean_sem([{m: arms[k][s][m] - arms[ref][s][m] for m in names} for s in seeds])  # noqa: E731
    gap = diff("oracle", "real only")
    table: dict = {"real only identical in every run": all(r == real[0] for r in real), "seeds": seeds, "arms": {}}
    for k in arms:
        up = diff(k, "real only")
        table["arms"][k] = {
            "mean_sem": mean_sem([{m: arms[k][s][m] for m in names} for s in seeds]),
            "vs real only": up,
            **{f"vs {ref}": diff(k, ref) for ref in ("oracle", "medi") if ref in arms},
            "gap_closed": {m: up[m][0] / gap[m][0] for m in names if gap[m][0]},
        }
        r = table["arms"][k]
        print(k, *(f"{c} {m} {r[c][m][0]:+.3f} ± {r[c][m][1]:.3f}" for c in list(r)[:-1] for m in names), sep="; ")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    for k, d in [("real only", next(iter(runs.values()))), *runs.items()]:  # per held-out (type, site)
        csv = Path(d) / ("subgroups_real_only.csv" if k == "real only" else "subgroups_r1_uniform.csv")
        table["arms"][k]["held_out"] = csv.read_text().splitlines() if csv.exists() else None
    Path(out).write_text(json.dumps({"runs": runs, **table}, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", help="the real (procedural, 32-px) dataset")
    p.add_argument("--like", help="a reference pool whose plan to copy (generation.json)")
    p.add_argument("--out", required=True, help="pools are written to OUT/transfer-<kind> (the JSON with --summarise)")
    p.add_argument("--kind", nargs="+", default=["true", "est32"], choices=["true", "est32", "est256"])
    p.add_argument("--source", help="the same world at 256 px (for est256)")
    p.add_argument("--donors", metavar="POOL", help="donors from a generated pool at each type's own sites")
    p.add_argument("--summarise", nargs="+", metavar="NAME=DIR", help="only summarise downstream runs into --out")
    args = p.parse_args(argv)
    if args.summarise:
        summarise(dict(a.split("=", 1) for a in args.summarise), args.out)
        return 0
    header = json.loads((Path(args.like) / "generation.json").read_text())
    meta = json.loads((Path(args.dataset) / "dataset.json").read_text())["renderer"]
    size, lines = meta["size"], bool(meta["scanner_lines"])
    tiles, index = read_tiles(args.dataset, ["train"], size)
    sites, types = index[SITE].to_numpy().astype(str), index[TYPE].to_numpy().astype(str)
    owner = {s: str(types[sites == s][0]) for s in sorted(set(sites))}
    counts = {s: int((sites == s).sum()) for s in owner}
    od32 = {s: ss.optical_density(tiles[sites == s]) for s in owner}
    quality = {s: ss.jpeg_quality(f) for s, f in site_files(args.dataset, index).items()}
    TransferPool.tiles, TransferPool.sites = tiles, sites
    TransferPool.by_type = {t: np.flatnonzero(types == t) for t in sorted(set(types))}
    if args.donors:  # generated donors (at each type's own sites) instead of the training split
        tiles, index = read_tiles(args.donors, None, size)
        sites, types = index[SITE].to_numpy().astype(str), index[TYPE].to_numpy().astype(str)
        assert all(owner[s] == t for s, t in zip(sites, types)), "donors must be at their type's own sites"
        TransferPool.tiles, TransferPool.sites = tiles, sites
        rng = np.random.default_rng(0)  # each requested site gets donors from all of the type's sites
        TransferPool.by_type = {t: rng.permutation(np.flatnonzero(types == t)) for t in sorted(set(types))}
        first: dict = {}
        for i, r in enumerate(header["rows"]):
            t = r["conditions"][TYPE]
            TransferPool.offset[i], first[t] = first.get(t, 0), first.get(t, 0) + r["count"]
        print("donors per type:", {t: len(d) for t, d in TransferPool.by_type.items()}, "moved:", first, flush=True)
    for kind in args.kind:
        st = stains(kind, od32, lines, size, args.source, owner)
        for s in st:
            st[s].quality = quality[s]
        TransferPool.space = ss.StainSpace(st, owner, counts)
        name = f"transfer-{'generated-' if args.donors else ''}{kind}"
        # the reference-pool path of the generate job, with this class as the tile source
        reference.KINDS, reference.ReferenceGenerator = (*reference.KINDS, name), TransferPool
        res = generate(
            GenerateConfig(
                model=None,
                out=str(Path(args.out) / name),
                plan=GenerationPlan(**header["plan"]),
                dataset=args.dataset,
                tiles_per_shard=header["tiles_per_shard"],
                reference=name,
                overwrite=True,
            )
        )
        print(f"{name}: {res.tiles} tiles in {res.shards} shards at {res.out} ({res.seconds:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
