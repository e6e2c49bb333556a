"""Downstream protocol: does adding synthetic tiles help a classifier on hospitals it never saw?

Per seed: real train-split tiles (optionally k random sites, at most m per class; see allocation.py)
plus round(r * n_real) synthetic tiles allocated over subgroups by a policy; fit a linear probe on
frozen-encoder features or a small CNN on pixels; score on the tiles of `test_split` (held-out
sites; a study selects on "val" and touches "holdout" once at the end). Metrics come from
evaluate.metrics, reported as mean ± SEM over seeds plus a per-(type, site) table.

Everything that can be wrong with the inputs is checked before a pixel is read (``validate``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from .allocation import ALLOCATIONS, SITE, TYPE, real_subsample, synthetic_subsample
from .metrics import METRIC_NAMES, all_metrics, balanced_accuracy, format_table, mean_sem
from .stain import AUGMENTS, NORMALIZERS, hed_jitter, macenko_normalize, restain, restain_sites
from .tile_reader import Inputs, Part, foreign_values, load_inputs, pool_index, read_index

CLASSIFIERS = ("linear", "cnn")
BALANCES = ("none", "type-site")
# Fields that decide which tiles/features are loaded; `compare` arms may not change them.
DATA_FIELDS = {"real", "classifier", "encoder", "train_split", "test_split", "image_size", "cache_dir"}


class DownstreamError(ValueError):
    """Bad protocol input (message says what to change)."""


@dataclass
class DownstreamConfig:
    real: str
    synthetic: list[str] = field(default_factory=list)  # pool dataset dirs (generated tiles)
    classifier: str = "linear"  # linear (probe on encoder features) | cnn (end to end)
    encoder: str = "random-conv"  # linear only: random-conv | openclip:NAME:PATH | inception:PATH
    ratio: float = 0.0  # synthetic tiles per real training tile
    allocation: str = "inverse-frequency"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    k_sites: int | None = None
    max_per_class: int | None = None
    train_split: str = "train"
    test_split: str = "holdout"
    C: float = 1.0  # linear probe: inverse regularisation
    lr: float = 3e-3  # cnn: learning rate
    epochs: int = 8
    width: int = 16
    image_size: int = 32
    cache_dir: str = "medi-dist-cache"
    # Baselines without a generator (stain.py); augment and normalize transform pixels: cnn only.
    augment: str = "none"  # none | hed-jitter | restain | restain-sites: transformed copies of the real training tiles
    augment_ratio: float = 1.0  # copies per real training tile
    jitter: float = 0.05  # hed-jitter strength (Tellez's HED-light 0.05, HED-strong 0.2)
    normalize: str = "none"  # none | macenko: every slide, train and test, onto the training tiles' stain
    balance: str = "none"  # none | type-site: each (type, site) weighs the same within its type


# Named baselines (arms on real tiles only, or added to a synthetic arm) -> config overrides
BASELINES = {
    "none": {},
    "hed-jitter": {"augment": "hed-jitter"},
    "restain": {"augment": "restain"},
    "restain-sites": {"augment": "restain-sites"},
    "macenko": {"normalize": "macenko"},
    "type-site-balance": {"balance": "type-site"},
}


def baseline(name: str) -> dict:
    if name not in BASELINES:
        raise DownstreamError(f"baseline must be one of {sorted(BASELINES)}, got {name!r}")
    return dict(BASELINES[name])


def validate(cfg: DownstreamConfig, build_encoder: bool = True):
    """Check the config and inputs without reading pixels; returns the encoder (linear) or None."""
    if not (cfg.ratio >= 0):
        raise DownstreamError(f"ratio must be >= 0 (synthetic tiles per real tile), got {cfg.ratio}")
    if cfg.allocation not in ALLOCATIONS:
        raise DownstreamError(f"allocation must be one of {ALLOCATIONS}, got {cfg.allocation!r}")
    if cfg.classifier not in CLASSIFIERS:
        raise DownstreamError(f"classifier must be one of {CLASSIFIERS}, got {cfg.classifier!r}")
    if not cfg.seeds:
        raise DownstreamError("give at least one seed")
    for name in ("k_sites", "max_per_class"):
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise DownstreamError(f"{name} must be >= 1 or unset, got {v}")
    for name, value, valid in (
        ("augment", cfg.augment, AUGMENTS),
        ("normalize", cfg.normalize, NORMALIZERS),
        ("balance", cfg.balance, BALANCES),
    ):
        if value not in valid:
            raise DownstreamError(f"{name} must be one of {valid}, got {value!r}")
    if cfg.classifier != "cnn" and (cfg.augment != "none" or cfg.normalize != "none"):
        raise DownstreamError(
            f"augment={cfg.augment} / normalize={cfg.normalize} transform pixels, and the linear "
            "classifier sees cached encoder features: use --classifier cnn"
        )
    if not (cfg.augment_ratio > 0 and 0 <= cfg.jitter < 1):
        raise DownstreamError(f"augment_ratio must be > 0 and jitter in [0, 1), got {cfg.augment_ratio}, {cfg.jitter}")
    if cfg.ratio > 0 and not cfg.synthetic:
        raise DownstreamError(f"ratio {cfg.ratio} > 0 needs at least one synthetic pool (--synthetic DIR)")
    if cfg.test_split == cfg.train_split:
        raise DownstreamError("test_split must differ from train_split (sites must be disjoint)")
    train = read_index(cfg.real, [cfg.train_split])
    test = read_index(cfg.real, [cfg.test_split])
    for split, rows in ((cfg.train_split, train), (cfg.test_split, test)):
        if rows.empty:
            raise DownstreamError(
                f"{cfg.real} has no tiles in split {split!r}"
                + (" (ingest with --val-fraction > 0)" if split == "val" else "")
            )
    n_sites = train[SITE].nunique()
    if cfg.k_sites is not None and cfg.k_sites > n_sites:
        raise DownstreamError(f"k_sites={cfg.k_sites} but {cfg.real} has only {n_sites} {cfg.train_split} sites")
    everything = read_index(cfg.real) if cfg.synthetic else None
    for pool in cfg.synthetic:
        pidx = pool_index(pool)
        if pidx.empty:
            raise DownstreamError(
                f"synthetic pool {pool} is empty: it has no synthetic 'train' tiles; "
                "generate tiles into it with `medi-dist generate` first"
            )
        check_pool(cfg, pool, pidx, everything)
    if cfg.classifier == "linear" and build_encoder:
        from .encoders import get_encoder

        return get_encoder(cfg.encoder)  # unknown spec or missing weights file raises here
    return None


def check_pool(cfg: DownstreamConfig, pool, pidx: pd.DataFrame, real: pd.DataFrame) -> None:
    """A pool must come from a model of this dataset's training sites: tiles generated for a test site
    would hand the classifier the stain it is tested on (the shortcut the protocol measures)."""
    foreign = foreign_values(real, pidx)
    if foreign:
        raise DownstreamError(
            f"synthetic pool {pool} has values that {cfg.real} never has: "
            + "; ".join(f"{c} {v}" for c, v in foreign.items())
            + " (a model of another dataset?); generate from a model trained on this dataset"
        )
    split_of = real.groupby(SITE)["split"].agg(lambda s: sorted(set(s)))
    leaked = {
        s: split_of[s]
        for s in sorted(set(pidx[SITE].astype(str)))
        if s in split_of and cfg.train_split not in split_of[s]
    }
    if leaked:
        raise DownstreamError(
            f"synthetic pool {pool} holds tiles of sites that {cfg.real} keeps out of its "
            f"{cfg.train_split!r} split: "
            + ", ".join(f"{s} ({'/'.join(v)})" for s, v in leaked.items())
            + "; training on them would leak the test sites' stain. Generate only at "
            "training sites, from a model trained on this dataset's split"
        )


@dataclass
class SeedRun:
    seed: int
    metrics: dict[str, float]
    predictions: pd.DataFrame  # key, cancer_type, site, pred
    allocation: dict  # (type, site) -> synthetic tiles
    n_real: int
    n_synthetic: int
    real_keys: list[str]
    synthetic_keys: list[str]  # "<pool dir>/<key>"


def fit_predict(
    cfg: DownstreamConfig, X: np.ndarray, y: np.ndarray, X_test: np.ndarray, seed: int, weight: np.ndarray | None = None
) -> np.ndarray:
    from .classifiers import LinearProbe, SmallCNN

    if cfg.classifier == "linear":
        return LinearProbe(C=cfg.C, seed=seed).fit(X, y, weight).predict(X_test)
    return (
        SmallCNN(image_size=cfg.image_size, width=cfg.width, epochs=cfg.epochs, lr=cfg.lr, seed=seed)
        .fit(X, y, weight)
        .predict(X_test)
    )


def normalized(inputs: Inputs, method: str) -> Inputs:
    """`inputs` with every slide's pixels Macenko-normalised onto the training tiles' stain (cached:
    arms of one comparison share it)."""
    if method == "none":
        return inputs
    if method not in inputs.derived:
        ref = inputs.train.X[np.random.default_rng(0).permutation(len(inputs.train.X))[:2000]]
        norm = lambda p: Part(macenko_normalize(p.X, p.meta["slide_id"], ref) if len(p.X) else p.X, p.meta)  # noqa: E731
        inputs.derived[method] = Inputs(norm(inputs.train), norm(inputs.test), norm(inputs.pool))
    return inputs.derived[method]


def augmented(cfg: DownstreamConfig, real: Part, seed: int, stains=None) -> Part:
    """round(augment_ratio * n) transformed copies of the real training tiles (with their index rows).
    `stains`: the training sites' stains for restain-sites (default: estimated here, once per process)."""
    if cfg.augment == "none":
        return Part(real.X[:0], real.meta.iloc[:0])
    rng = np.random.default_rng([seed, 4])
    idx = rng.choice(len(real.X), int(round(cfg.augment_ratio * len(real.X))), replace=cfg.augment_ratio > 1)
    idx.sort()
    X, meta = real.X[idx], real.meta.iloc[idx]
    if cfg.augment == "hed-jitter":
        X = hed_jitter(X, rng, cfg.jitter)
    elif cfg.augment == "restain-sites":
        from ..data.stain_estimation import estimate_site_stains

        if stains is None:
            stains = estimate_site_stains(cfg.real, X.shape[1])  # once per process: every seed and arm
        X = restain_sites(X, meta[TYPE], meta["slide_id"], meta[SITE], stains, seed)
    else:  # restain: each slide into another training site's stain, estimated from all real training tiles
        X = restain(
            np.concatenate([X, real.X]),
            np.concatenate([meta["slide_id"].astype(str) + "#copy", real.meta["slide_id"].astype(str)]),
            np.concatenate([meta[SITE].astype(str), real.meta[SITE].astype(str)]),
            seed,
        )[: len(X)]
    return Part(X, meta)


def balance_weights(types: np.ndarray, sites: np.ndarray) -> np.ndarray:
    """Per tile: every (type, site) group gets the same total weight within its type, and every type
    keeps its tile count (class balancing is the classifiers' own business)."""
    df = pd.DataFrame({"t": types, "s": sites})
    group = df.groupby(["t", "s"])["t"].transform("size").to_numpy()
    per_type = df.groupby("t")["t"].transform("size").to_numpy()
    groups = df.groupby("t")["s"].transform("nunique").to_numpy()
    return per_type / (groups * group)


def run_seed(cfg: DownstreamConfig, inputs: Inputs, seed: int, stains=None) -> SeedRun:
    inputs = normalized(inputs, cfg.normalize)
    tr, te = inputs.train, inputs.test
    ridx = real_subsample(tr.meta, seed, cfg.k_sites, cfg.max_per_class)
    real = tr.meta.iloc[ridx]
    real_counts = Counter(zip(real[TYPE].astype(str), real[SITE].astype(str)))
    pool = inputs.pool
    if cfg.synthetic:
        keep = pool.meta["pool"].isin([str(p) for p in cfg.synthetic]).to_numpy()
        pool = Part(pool.X[keep], pool.meta[keep].reset_index(drop=True))
    n_syn = int(round(cfg.ratio * len(ridx)))
    sidx, alloc = synthetic_subsample(pool.meta, real_counts, n_syn, cfg.allocation, seed)
    aug = augmented(cfg, Part(tr.X[ridx], real), seed, stains)
    X = np.concatenate([tr.X[ridx], pool.X[sidx], aug.X])
    rows = pd.concat([real, pool.meta.iloc[sidx], aug.meta])  # copies keep their source tile's site
    y = rows[TYPE].astype(str).to_numpy()
    weight = balance_weights(y, rows[SITE].astype(str).to_numpy()) if cfg.balance == "type-site" else None
    y_true, sites = te.meta[TYPE].astype(str).to_numpy(), te.meta[SITE].astype(str).to_numpy()
    pred = np.asarray(fit_predict(cfg, X, y, te.X, seed, weight)).astype(str)
    preds = pd.DataFrame({"key": te.meta["key"].astype(str), TYPE: y_true, SITE: sites, "pred": pred})
    syn = pool.meta.iloc[sidx]
    return SeedRun(
        seed,
        all_metrics(y_true, pred, sites),
        preds,
        alloc,
        len(ridx),
        len(sidx),
        real["key"].astype(str).tolist(),
        (syn["pool"].astype(str) + "/" + syn["key"].astype(str)).tolist(),
    )


@dataclass
class DownstreamResult:
    config: DownstreamConfig
    runs: list[SeedRun]

    @property
    def per_seed(self) -> list[dict]:
        return [{"seed": r.seed, **r.metrics, "n_real": r.n_real, "n_synthetic": r.n_synthetic} for r in self.runs]

    @property
    def mean_sem(self) -> dict[str, tuple[float, float]]:
        return mean_sem([{k: r.metrics[k] for k in METRIC_NAMES} for r in self.runs])

    @property
    def predictions(self) -> pd.DataFrame:
        return pd.concat([r.predictions.assign(seed=r.seed) for r in self.runs], ignore_index=True)

    def subgroups(self) -> pd.DataFrame:
        """Per (type, site): test tiles, accuracy mean and SEM over seeds."""
        p = self.predictions.assign(correct=lambda d: d[TYPE] == d["pred"])
        per = p.groupby([TYPE, SITE, "seed"])["correct"].agg(n="size", accuracy="mean").reset_index()
        g = per.groupby([TYPE, SITE])
        out = g.agg(n=("n", "first"), accuracy=("accuracy", "mean")).reset_index()
        out["accuracy_sem"] = g["accuracy"].sem(ddof=1).fillna(0.0).to_numpy()
        return out

    def site_scores(self) -> pd.Series:
        """Per test site: balanced accuracy averaged over seeds (what the objective averages)."""
        p = self.predictions
        rows = [(s, balanced_accuracy(d[TYPE], d["pred"])) for (s, _), d in p.groupby([SITE, "seed"])]
        return pd.DataFrame(rows, columns=[SITE, "score"]).groupby(SITE)["score"].mean()

    @property
    def effective_ratio(self) -> float:
        """Synthetic per real tile actually used: below config.ratio when the pools run out."""
        return float(np.mean([r.n_synthetic / max(r.n_real, 1) for r in self.runs]))

    def shortfall(self) -> str | None:
        """A note when the pools held fewer tiles than the ratio asked for (the arm is then mislabelled)."""
        if self.effective_ratio < self.config.ratio - 0.5 / max(self.runs[0].n_real, 1):
            if self.runs[0].n_synthetic == 0:
                return (
                    f"{describe(self.config)}: no pool tile fits allocation {self.config.allocation!r} (e.g. "
                    "unseen-pairs takes only pairs absent from the real subsample), so this arm is real only; "
                    "choose another allocation or generate tiles at those pairs"
                )
            return (
                f"{describe(self.config)}: the pools hold too few tiles; it used "
                f"{self.runs[0].n_synthetic} synthetic per {self.runs[0].n_real} real (effective r="
                f"{self.effective_ratio:.2f}); generate more tiles to test r={self.config.ratio:g}"
            )
        return None

    def table(self, label: str = "") -> str:
        return format_table({label or describe(self.config): self.mean_sem}, list(METRIC_NAMES))

    def to_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "per_seed": self.per_seed,
            "effective_ratio": self.effective_ratio,
            "mean_sem": {k: list(v) for k, v in self.mean_sem.items()},
        }


def describe(cfg: DownstreamConfig) -> str:
    if cfg.ratio == 0:
        return "real only"
    pools = ",".join(Path(p).name for p in cfg.synthetic)
    return f"+{pools} r={cfg.ratio:g} {cfg.allocation}"


def run_downstream(cfg: DownstreamConfig, inputs: Inputs | None = None, progress=None) -> DownstreamResult:
    """The whole protocol over cfg.seeds. `inputs` lets several configs share loaded tiles."""
    encoder = validate(cfg, build_encoder=inputs is None)
    inputs = inputs or load_inputs(cfg, encoder)
    runs = []
    for seed in cfg.seeds:
        runs.append(run_seed(cfg, inputs, seed))
        if progress:
            progress(runs[-1])
    return DownstreamResult(cfg, runs)


def verdict(mean: float, sem: float) -> str:
    """Plain reading of a paired difference: clear only when it is more than two SEM from zero."""
    return "helps" if mean - 2 * sem > 0 else ("hurts" if mean + 2 * sem < 0 else "makes no clear difference")


@dataclass
class Comparison:
    results: dict[str, DownstreamResult]

    def table(self) -> str:
        return format_table({k: r.mean_sem for k, r in self.results.items()}, list(METRIC_NAMES))

    def deltas(self, reference: str | None = None) -> dict[str, dict[str, tuple[float, float]]]:
        """Paired per-seed differences to the reference arm (default: the first), mean ± SEM."""
        ref = self.results[reference or next(iter(self.results))]
        base = {r.seed: r.metrics for r in ref.runs}
        return {
            k: mean_sem([{m: r.metrics[m] - base[r.seed][m] for m in METRIC_NAMES} for r in res.runs])
            for k, res in self.results.items()
            if res is not ref
        }


def compare(base: DownstreamConfig, arms: dict[str, dict], run=None) -> Comparison:
    """Several arms (config overrides of `base`, e.g. {"real only": {"ratio": 0}, "MeDi":
    {"synthetic": [dir], "ratio": 1}}) on the same real tiles and seeds, loaded once. `run`: what
    fits them, {label: config}, inputs -> {label: DownstreamResult} (default: one after the other here;
    `ray_fits.run_parallel`: as Ray tasks)."""
    fixed = DATA_FIELDS & {k for over in arms.values() for k in over}
    if fixed:
        raise DownstreamError(f"arms share the real data and classifier; set {sorted(fixed)} in the base config")
    cfgs = {label: replace(base, **over) for label, over in arms.items()}
    for c in cfgs.values():
        validate(c, build_encoder=False)  # every arm is checked before any work starts
    encoder = validate(base)
    pools = list(dict.fromkeys(p for c in cfgs.values() for p in c.synthetic))
    inputs = load_inputs(base, encoder, pools)
    if run is not None:
        return Comparison(run(cfgs, inputs))
    return Comparison({label: run_downstream(c, inputs) for label, c in cfgs.items()})
