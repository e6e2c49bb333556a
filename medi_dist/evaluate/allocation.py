"""Which tiles a downstream classifier trains on: the real subsample and the synthetic allocation.

The real subsample depends only on (seed, k_sites, max_per_class) and the dataset, never on the
synthetic ratio or pool, so every comparison across ratios/pools is paired on identical real tiles.
Synthetic tiles are drawn per subgroup (cancer type, site) from a seeded permutation, so a smaller
ratio takes a prefix of what a larger ratio takes (nested, again paired).

Allocation policies split ``round(r * n_real)`` synthetic tiles over the pool's subgroups:
  unseen-pairs       only (type, site) pairs absent from the real subsample, equal shares
  inverse-frequency  every pool subgroup, weight 1 / (1 + real tiles of that subgroup)
  uniform            every pool subgroup, equal shares
A subgroup never gets more tiles than the pool holds; the excess goes to the other subgroups.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter

import numpy as np
import pandas as pd

TYPE, SITE = "cancer_type", "tissue_source_site"
ALLOCATIONS = ("unseen-pairs", "inverse-frequency", "uniform")


def _rng(seed: int, *salt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *salt])


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())  # stable across processes, unlike hash()


def pick_sites(sites_by_type: dict[str, list[str]], k: int, seed: int) -> list[str]:
    """k random sites, taken round-robin over types (seeded order), so every class has a site
    whenever k >= number of types (site and type are confounded: a plain draw can miss a class)."""
    rng = _rng(seed, 1)
    types = sorted(sites_by_type)
    pools = {t: [str(s) for s in rng.permutation(sorted(sites_by_type[t]))] for t in types}
    order = [str(t) for t in rng.permutation(types)]
    chosen: list[str] = []
    while len(chosen) < k and any(pools.values()):
        for t in order:
            if pools[t] and len(chosen) < k:
                s = pools[t].pop(0)
                if s not in chosen:
                    chosen.append(s)
    return sorted(chosen)


def real_subsample(
    meta: pd.DataFrame, seed: int, k_sites: int | None = None, max_per_class: int | None = None
) -> np.ndarray:
    """Row positions (into `meta`) of the real training tiles for this seed.

    Only the seed and the dataset decide the result (rows are handled in key order, so the order in
    which shards were read does not matter either)."""
    order = np.argsort(meta["key"].to_numpy().astype(str), kind="stable")
    m = meta.iloc[order]
    if k_sites is not None:
        by_type: dict[str, list[str]] = {}
        for t, s in set(zip(m[TYPE].astype(str), m[SITE].astype(str))):
            by_type.setdefault(t, []).append(s)
        keep = set(pick_sites(by_type, k_sites, seed))
        mask = m[SITE].astype(str).isin(keep).to_numpy()
        m, order = m[mask], order[mask]
    if max_per_class is not None:
        rng = _rng(seed, 2)
        picked = []
        for t in sorted(m[TYPE].astype(str).unique()):
            pos = np.flatnonzero(m[TYPE].astype(str).to_numpy() == t)
            if len(pos) > max_per_class:
                pos = np.sort(rng.choice(pos, max_per_class, replace=False))
            picked.append(pos)
        order = order[np.sort(np.concatenate(picked))] if picked else order[:0]
    return np.sort(order)


def policy_weights(policy: str, pool_groups: list[tuple[str, str]], real_counts: Counter) -> dict:
    if policy not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {policy!r}")
    if policy == "unseen-pairs":
        return {g: 1.0 for g in pool_groups if real_counts.get(g, 0) == 0}
    if policy == "inverse-frequency":
        return {g: 1.0 / (1 + real_counts.get(g, 0)) for g in pool_groups}
    return {g: 1.0 for g in pool_groups}


def allocate(total: int, weights: dict, capacity: dict) -> dict:
    """Split `total` over groups in proportion to `weights`, capped by `capacity` (water-filling),
    rounded by largest remainder with ties broken by group order. Returns every weighted group."""
    groups = sorted(g for g in weights if weights[g] > 0 and capacity.get(g, 0) > 0)
    counts = {g: 0 for g in sorted(weights)}
    left = min(int(total), sum(capacity[g] for g in groups))
    active = list(groups)
    while left > 0 and active:
        wsum = sum(weights[g] for g in active)
        quota = {g: left * weights[g] / wsum for g in active}
        full = [g for g in active if counts[g] + quota[g] >= capacity[g]]
        if full:  # saturate these, then share what is left among the rest
            for g in full:
                left -= capacity[g] - counts[g]
                counts[g] = capacity[g]
            active = [g for g in active if g not in full]
            continue
        base = {g: math.floor(quota[g]) for g in active}
        extra = left - sum(base.values())
        for g in sorted(active, key=lambda g: (-(quota[g] - base[g]), groups.index(g)))[:extra]:
            base[g] += 1
        for g in active:
            counts[g] += base[g]
        left = 0
    return counts


def synthetic_subsample(
    pool: pd.DataFrame, real_counts: Counter, total: int, policy: str, seed: int
) -> tuple[np.ndarray, dict]:
    """Row positions (into `pool`) of the synthetic tiles for this seed, and the count per subgroup."""
    if total <= 0 or pool.empty:
        return np.zeros(0, dtype=np.int64), {}
    types, sites = pool[TYPE].astype(str).to_numpy(), pool[SITE].astype(str).to_numpy()
    uid = (pool["pool"].astype(str) + "/" + pool["key"].astype(str)).to_numpy()
    rows: dict[tuple[str, str], np.ndarray] = {}
    for g in sorted(set(zip(types, sites))):
        pos = np.flatnonzero((types == g[0]) & (sites == g[1]))
        rows[g] = pos[np.argsort(uid[pos], kind="stable")]
    weights = policy_weights(policy, sorted(rows), real_counts)
    counts = allocate(total, weights, {g: len(p) for g, p in rows.items()})
    picked = []
    for g, n in counts.items():
        if n:  # seeded per subgroup: a smaller count takes a prefix of a larger one
            perm = _rng(seed, 3, _crc("|".join(g))).permutation(len(rows[g]))
            picked.append(rows[g][perm[:n]])
    idx = np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)
    return idx, {g: n for g, n in counts.items() if n}
