"""Site-disjoint splits: every tissue source site lies on exactly one side.

Sites are assigned in a seeded random order (never file order). First each cancer type gets a site
on every side its site count allows, then the remaining sites go where the tile share is furthest
below its target. A classifier tested on `holdout` therefore never saw those hospitals' stains.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass


@dataclass
class SplitConfig:
    holdout_fraction: float = 0.3
    val_fraction: float = 0.0  # > 0 adds a validation split of further sites (e.g. for Tune)
    seed: int = 0

    def targets(self) -> dict[str, float]:
        if not (0 < self.holdout_fraction < 1 and 0 <= self.val_fraction < 1 - self.holdout_fraction):
            raise ValueError(
                f"split fractions must satisfy 0 < holdout ({self.holdout_fraction}) and "
                f"holdout + val ({self.val_fraction}) < 1"
            )
        t = {"train": 1 - self.holdout_fraction - self.val_fraction, "holdout": self.holdout_fraction}
        if self.val_fraction > 0:
            t["val"] = self.val_fraction
        return t


def site_split(groups: Counter, cfg: SplitConfig) -> dict[str, str]:
    """Map each site to a split. `groups` counts tiles (or slides) per (cancer_type, site)."""
    targets = cfg.targets()
    rng = random.Random(cfg.seed)
    sites_of: dict[str, list[str]] = defaultdict(list)
    site_total: Counter = Counter()
    for (ctype, site), n in sorted(groups.items()):
        sites_of[ctype].append(site)
        site_total[site] += n
    assign: dict[str, str] = {}

    # Coverage: each type on every side (train first), as far as its own sites allow.
    order = list(targets)
    types = sorted(sites_of)
    rng.shuffle(types)
    for split in order:
        for ctype in types:
            if any(assign.get(s) == split for s in sites_of[ctype]):
                continue
            free = [s for s in sites_of[ctype] if s not in assign]
            # keep one free site back for train if the type has no train site yet
            has_train = any(assign.get(s) == "train" for s in sites_of[ctype])
            if split != "train" and not has_train and len(free) < 2:
                continue
            if free:
                assign[rng.choice(free)] = split

    # Fill: remaining sites to the split furthest below its tile share.
    total = sum(site_total.values()) or 1
    have: Counter = Counter()
    for s, split in assign.items():
        have[split] += site_total[s]
    rest = sorted(s for s in site_total if s not in assign)
    rng.shuffle(rest)
    for s in rest:
        split = max(order, key=lambda k: targets[k] - have[k] / total)
        assign[s] = split
        have[split] += site_total[s]
    return assign


# Sites are assigned whole, so shares are never exact; past this absolute gap the user is told.
SHARE_TOLERANCE = 0.1


def share_note(groups: Counter, requested: dict[str, float], achieved: dict[str, float]) -> str | None:
    """One line when an achieved tile share is more than SHARE_TOLERANCE off the requested one, with why."""
    if all(abs(achieved.get(sp, 0.0) - r) <= SHARE_TOLERANCE for sp, r in requested.items()):
        return None
    sites_of: dict[str, set] = defaultdict(set)
    site_total: Counter = Counter()
    for (ctype, site), n in groups.items():
        sites_of[ctype].add(site)
        site_total[site] += n
    per_type = sorted(len(v) for v in sites_of.values())
    few = f"{per_type[0]}" if per_type[0] == per_type[-1] else f"{per_type[0]}-{per_type[-1]}"
    largest = max(site_total.values()) / (sum(site_total.values()) or 1)
    shares = ", ".join(f"{sp} {achieved.get(sp, 0.0):.0%} (requested {r:.0%})" for sp, r in requested.items())
    return (
        f"split tile shares differ from the requested ones: {shares}; sites are assigned whole and each cancer "
        f"type keeps a site on every side where it can, with only {few} sites per type for {len(requested)} "
        f"sides (largest site: {largest:.0%} of the tiles); more sites per type would get closer"
    )


def split_report(groups: Counter, assign: dict[str, str], cfg: SplitConfig) -> dict:
    """JSON-ready counts per (type, site, split), sites per split, and types missing from a side."""
    rows = [
        {"cancer_type": t, "tissue_source_site": s, "split": assign[s], "count": int(n)}
        for (t, s), n in sorted(groups.items())
    ]
    splits = sorted(set(assign.values()))
    types = sorted({t for t, _ in groups})
    covered = {sp: {r["cancer_type"] for r in rows if r["split"] == sp} for sp in splits}
    counts = {sp: sum(r["count"] for r in rows if r["split"] == sp) for sp in splits}
    total = sum(counts.values()) or 1
    requested = {sp: round(v, 4) for sp, v in cfg.targets().items()}
    achieved = {sp: round(counts.get(sp, 0) / total, 4) for sp in requested}
    return {
        "seed": cfg.seed,
        "holdout_fraction": cfg.holdout_fraction,
        "val_fraction": cfg.val_fraction,
        "sites": {sp: sorted(s for s, a in assign.items() if a == sp) for sp in splits},
        "counts": counts,
        "requested_shares": requested,
        "achieved_shares": achieved,
        "share_note": share_note(groups, requested, achieved),  # None when within SHARE_TOLERANCE
        "missing_types": {sp: sorted(set(types) - covered[sp]) for sp in splits if set(types) - covered[sp]},
        "groups": rows,
    }
