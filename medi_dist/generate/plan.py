"""Generation plans: which (cancer type, site, ...) subgroups to generate, and how many tiles each.

A plan is resolved against the model directory before any work starts: every value must be in the
model's vocabularies (UnknownValueError lists the valid ones), and every type and site must have had
training tiles, because a vocabulary entry with no training tiles has an untrained embedding (the
dataset's vocabularies also hold held-out sites), and a continuous value (age) must lie in the range
the model was trained on (refused otherwise, naming the range). Each resolved row is flagged `seen` when its
(type, site) pair occurred in training, so fidelity can be reported separately for unseen pairs.

A model conditioned on cancer type only (a class-only baseline) takes explicit rows without sites;
its tiles record the site as `Unknown`.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config_loader import yaml_problem
from ..data.shards import INDEX, read_index
from ..metadata import UNKNOWN, ConditioningSpec, SchemaError, UnknownValueError, clean_category, clean_continuous
from ..model.model_dir import read_model_info
from ..storage import Folder

TYPE, SITE = "cancer_type", "tissue_source_site"
MODES = ("explicit", "unseen-pairs", "balance")
NUMERIC = {"count", "target", "seed", "include_unseen", "null_site"}  # plan fields that are not condition values
# Shard tasks hold spans, so planning is cheap at any size; a count like 1e11 is a slip (years of
# sampling, ~4 x 10^8 shards), refused before any work.
MAX_TILES = 50_000_000


class PlanError(ValueError):
    """A plan that cannot be run as written (the message says what to change)."""


@dataclass
class GenerationPlan:
    mode: str = "explicit"  # explicit | unseen-pairs | balance
    rows: list[dict] = field(default_factory=list)  # explicit: {cancer_type, tissue_source_site, [more], count}
    types: list[str] | None = None  # unseen-pairs / balance: None = every trained type
    sites: list[str] | None = None  # None = every trained site
    count: int = 8  # unseen-pairs: tiles per (type, site)
    target: int = 100  # balance: top each subgroup up to this many tiles (training tiles count)
    include_unseen: bool = False  # balance: also fill (type, site) pairs absent from training
    extra: dict = field(default_factory=dict)  # more conditions, e.g. {sex: [female, male]}: one row per value
    seed: int = 0
    null_site: bool = False  # explicit rows without a site: the site-conditioned model with its site nulled

    @classmethod
    def from_dict(cls, d: dict) -> GenerationPlan:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise PlanError(f"unknown plan field(s) {unknown}; valid: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> GenerationPlan:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"plan file {p} does not exist")
        # Read as text: TCGA site codes such as 05 or 44 must stay strings (YAML would read 05 as the
        # number 5); only the numeric fields are parsed, as on the command line.
        try:
            data = yaml.load(p.read_text(), Loader=yaml.BaseLoader) or {}
        except yaml.YAMLError as e:
            raise PlanError(f"plan file {p} is not valid YAML: {yaml_problem(e)}") from None
        if not isinstance(data, dict):
            raise PlanError(f"plan file {p} must hold a mapping (mode, rows | types/sites/count, seed)")
        numeric = lambda d: {k: yaml.safe_load(v) if k in NUMERIC and isinstance(v, str) else v for k, v in d.items()}  # noqa: E731
        data = numeric(data)
        if isinstance(data.get("rows"), list):
            data["rows"] = [numeric(r) if isinstance(r, dict) else r for r in data["rows"]]
        return cls.from_dict(data)


@dataclass(frozen=True)
class PlanRow:
    conditions: dict  # condition column -> value, exactly what the sampler is asked for
    count: int
    seen: bool  # the (type, site) pair had training tiles
    real_count: int  # training tiles of this (type, site) pair


@dataclass
class TrainingData:
    """What the model was trained on: (type, site) -> training tiles (0 where only the pair is known)."""

    pairs: dict
    source: str  # where the pairs come from
    counts_known: bool = True  # False: pairs recorded in the model directory, dataset not readable

    @property
    def types(self) -> list[str]:
        return sorted({t for t, _ in self.pairs})

    @property
    def sites(self) -> list[str]:
        return sorted({s for _, s in self.pairs})


def _train_counts(dataset: str | Path) -> Counter:
    idx = read_index(dataset, columns=[TYPE, SITE, "split"])  # a local folder or an object-storage URI
    idx = idx[idx["split"] == "train"]
    return Counter(zip(idx[TYPE].astype(str), idx[SITE].astype(str)))


def training_data(model_dir: str | Path | None, dataset: str | Path | None = None) -> TrainingData:
    """The model's training pairs (config.json `train_pairs`, else the train split of its dataset),
    with tile counts from the dataset's index where it can be read (`dataset` overrides the recorded one)."""
    if model_dir is None:  # a reference pool (oracle, noise): the dataset's own train split
        return TrainingData(dict(_train_counts(dataset)), str(dataset))
    info = read_model_info(model_dir).get("info", {})
    recorded = {tuple(map(str, p)) for p in info.get("train_pairs") or []} or None
    path = dataset or info.get("dataset")
    try:
        has_index = bool(path) and Folder(path).exists(INDEX)  # a local folder or an object-storage URI
    except OSError:  # the recorded dataset's store is unreachable: fall back to the recorded pairs
        if dataset is not None:
            raise
        has_index = False
    if dataset is not None and not has_index:
        raise FileNotFoundError(f"--dataset {dataset} has no index.parquet; point it at the model's training dataset")
    if has_index:
        counts = _train_counts(path)
        if recorded is None or recorded <= set(counts):
            return TrainingData({p: counts[p] for p in (recorded or counts)}, str(path))
    if recorded is not None:  # the dataset moved or changed: pairs are still known, counts are not
        return TrainingData({p: 0 for p in recorded}, f"{model_dir}/config.json", counts_known=False)
    raise PlanError(
        f"{model_dir} records neither its training pairs nor a readable training dataset ({path}); pass --dataset DIR"
    )


def _count(value: Any, where: str) -> int:
    if isinstance(value, str):  # YAML 1.1 reads 1e3 (no dot) as text
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise PlanError(f"{where}: count must be a whole number, got {value!r}")
    if value < 0:
        raise PlanError(f"{where}: count {int(value)} is negative; counts must be >= 0")
    return int(value)


def _check_trained(spec: ConditioningSpec, train: TrainingData, column: str, value: str, where: str) -> str:
    v = clean_category(value)
    trained = train.types if column == TYPE else train.sites
    if v not in spec.vocab(column).values:
        raise UnknownValueError(
            f"{where}: unknown {column} {v!r}; this model was trained on ({len(trained)}): {', '.join(trained)}"
        )
    if v not in trained:
        raise UnknownValueError(
            f"{where}: {column} {v!r} is in the model's vocabulary but had no training tiles "
            f"({train.source}), so its embedding is untrained; trained values ({len(trained)}): {', '.join(trained)}"
        )
    return v


def check_conditions(spec: ConditioningSpec, cond: dict, where: str) -> dict:
    names = spec.categorical_names + spec.continuous_names
    bad = sorted(set(cond) - set(names))
    if bad:
        raise UnknownValueError(f"{where}: {bad} are not condition columns of this model; it has {names}")
    out = {}
    for k, v in cond.items():
        if k in spec.categorical_names:
            spec.vocab(k).encode(v)
            out[k] = clean_category(v)
        else:
            try:  # the ingest parser: '>89' is 90, missing spellings are the null condition
                x = clean_continuous(v)
            except (SchemaError, ValueError):
                raise PlanError(f"{where}: {k} must be a number (or missing), got {v!r}") from None
            c = next(c for c in spec.continuous if c.name == k)
            if c.min is not None and not math.isnan(x) and not c.min <= x <= c.max:
                # refused, not clamped: a clamped tile would be recorded with an age it was not made for
                raise PlanError(
                    f"{where}: {k} {x:g} is outside the range the model was trained on "
                    f"({c.min:g} to {c.max:g}); choose a value in it"
                )
            out[k] = None if math.isnan(x) else x
    return out


def _extra_combos(spec: ConditioningSpec, extra: dict) -> list[dict]:
    """{sex: [female, male], age: 60} -> [{sex: female, age: 60.0}, {sex: male, age: 60.0}]."""
    if {TYPE, SITE} & set(extra):
        raise PlanError("extra is for columns other than cancer_type and tissue_source_site")
    lists = {k: list(v) if isinstance(v, (list, tuple)) else [v] for k, v in extra.items()}
    combos = [dict(zip(lists, vals)) for vals in itertools.product(*lists.values())]
    return [check_conditions(spec, c, "extra") for c in combos]


def _check_complete(spec: ConditioningSpec, cond: dict, where: str, nulled: tuple = ()) -> None:
    """A tile's metadata must read back through the model's vocabularies: a categorical column left
    unconditional becomes `Unknown`, so it may only be left out where `Unknown` is a trained value
    (or where the plan nulls it on purpose)."""
    for v in spec.categorical:
        if v.name not in cond and v.name not in nulled and UNKNOWN not in v.values:
            raise PlanError(
                f"{where}: the model is conditioned on {v.name} (values: {', '.join(v.values)}); "
                f"give it per row or in extra, e.g. extra: {{{v.name}: [{', '.join(v.values[:2])}]}}"
            )


def resolve(plan: GenerationPlan, spec: ConditioningSpec, train: TrainingData) -> list[PlanRow]:
    """Validate the plan against the model and expand it into rows (raises before any work)."""
    if plan.mode not in MODES:
        raise PlanError(f"plan mode must be one of {MODES}, got {plan.mode!r}")
    if TYPE not in spec.categorical_names:
        raise PlanError(f"the model is not conditioned on {TYPE} (it has {spec.categorical_names})")
    if plan.null_site and (plan.mode != "explicit" or SITE not in spec.categorical_names):
        raise PlanError(
            "null_site is for explicit rows of a model conditioned on tissue_source_site (a class-only "
            "arm from the same network): use mode explicit with rows of cancer_type and count"
        )
    # False: class-only model or site nulled (condition dropout trained that branch); rows name no site
    by_site = SITE in spec.categorical_names and not plan.null_site
    if plan.mode != "explicit" and SITE not in spec.categorical_names:
        raise PlanError(
            f"{plan.mode} plans need a model conditioned on {SITE}; this one is conditioned on "
            f"{spec.categorical_names}: use explicit rows (cancer_type, count)"
        )
    if plan.mode != "explicit" and plan.rows:
        raise PlanError(
            f"rows are for mode explicit; mode {plan.mode} takes types, sites and "
            f"{'count' if plan.mode == 'unseen-pairs' else 'target'}: drop the rows or use mode explicit"
        )
    if plan.mode == "balance" and not train.counts_known:
        raise PlanError(
            f"balance needs the training tile counts, but the training dataset is not readable "
            f"(pairs from {train.source}); pass --dataset DIR"
        )
    if not isinstance(plan.seed, int) or isinstance(plan.seed, bool):
        raise PlanError(f"plan seed must be an integer, got {plan.seed!r}")
    if not isinstance(plan.extra, dict):
        raise PlanError(f"extra must be a mapping of column -> value(s), got {plan.extra!r}")
    extras = _extra_combos(spec, plan.extra)  # validated even when explicit rows override them
    real_of_type = Counter()
    for (t, _), n in train.pairs.items():
        real_of_type[t] += n
    rows: list[PlanRow] = []
    if plan.mode == "explicit":
        if not plan.rows:
            raise PlanError("an explicit plan needs rows: [{cancer_type, tissue_source_site, count}, ...]")
        need = [TYPE, SITE, "count"] if by_site else [TYPE, "count"]
        for i, r in enumerate(plan.rows):
            where = f"row {i + 1}"
            if not isinstance(r, dict) or any(k not in r for k in need):
                raise PlanError(f"{where}: need {', '.join(need)}, got {r!r}")
            if plan.null_site and SITE in r:
                raise PlanError(f"{where}: null_site plans leave the site out; drop {SITE} from the row")
            r = dict(r)
            n = _count(r.pop("count"), where)
            t = _check_trained(spec, train, TYPE, r[TYPE], where)
            s = _check_trained(spec, train, SITE, r[SITE], where) if by_site else None
            cond = check_conditions(spec, r, where)  # unknown columns (e.g. a site for a class-only model)
            cond[TYPE] = t
            if by_site:
                cond[SITE] = s
                seen, real = (t, s) in train.pairs, train.pairs.get((t, s), 0)
            else:
                seen, real = True, real_of_type[t]
            for extra in _extra_combos(spec, {k: v for k, v in plan.extra.items() if k not in r}):
                _check_complete(spec, {**extra, **cond}, where, (SITE,) if plan.null_site else ())
                rows.append(PlanRow({**extra, **cond}, n, seen, real))
    else:
        types = [_check_trained(spec, train, TYPE, t, "types") for t in (plan.types or train.types)]
        sites = [_check_trained(spec, train, SITE, s, "sites") for s in (plan.sites or train.sites)]
        n = _count(plan.count if plan.mode == "unseen-pairs" else plan.target, plan.mode)
        for t in dict.fromkeys(types):
            for s in dict.fromkeys(sites):
                real = train.pairs.get((t, s), 0)
                seen = (t, s) in train.pairs
                if plan.mode == "balance" and not seen and not plan.include_unseen:
                    continue
                c, k = (n, 1) if plan.mode == "unseen-pairs" else (max(0, n - real), len(extras))
                for j, extra in enumerate(extras):  # balance: the top-up is shared by the extra values
                    _check_complete(spec, {**extra, TYPE: t, SITE: s}, plan.mode)
                    rows.append(PlanRow({**extra, TYPE: t, SITE: s}, c // k + (j < c % k), seen, real))
    total = sum(r.count for r in rows)
    if total == 0:
        raise PlanError(f"the plan asks for no tiles ({len(rows)} rows, all with count 0)")
    if total > MAX_TILES:
        raise PlanError(
            f"the plan asks for {total:,} tiles, more than {MAX_TILES:,} per plan; check the counts, "
            "or split the plan (e.g. by types or sites) into runs with separate --out folders"
        )
    return rows


def describe(rows: list[PlanRow], limit: int = 20) -> str:
    lines = [
        f"{sum(r.count for r in rows)} tiles in {len(rows)} rows "
        f"({sum(r.count for r in rows if not r.seen)} at unseen pairs):"
    ]
    for r in rows[:limit]:
        cond = ", ".join(f"{k}={v}" for k, v in r.conditions.items())
        lines.append(f"  {cond}: {r.count} ({'seen' if r.seen else 'unseen'}, {r.real_count} training tiles)")
    if len(rows) > limit:
        lines.append(f"  ... and {len(rows) - limit} more rows")
    return "\n".join(lines)
