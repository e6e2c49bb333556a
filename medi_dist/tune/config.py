"""Study configuration: one YAML file (see jobs/tune_small.yaml) plus `field=value` overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..evaluate.allocation import ALLOCATIONS


@dataclass
class SearchSpace:
    ratio: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0])
    allocation: list[str] = field(default_factory=lambda: list(ALLOCATIONS))
    pools: list[str] = field(default_factory=list)  # generated dataset dirs
    lr: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2])  # classifier: cnn
    C: list[float] = field(default_factory=lambda: [0.1, 1.0])  # classifier: linear
    # stain baselines, alone or with a pool (cnn for the pixel ones): none | hed-jitter | restain | restain-sites
    # | macenko | type-site-balance
    baseline: list[str] = field(default_factory=lambda: ["none"])


@dataclass
class StudyConfig:
    name: str = "tune-small"
    real: str = "data/procedural"  # needs a val split: ingest with --val-fraction > 0
    space: SearchSpace = field(default_factory=SearchSpace)
    search: str = "random"  # random: num_samples draws | grid: every combination once
    num_samples: int = 8
    seed: int = 0
    classifier: str = "linear"
    encoder: str = "random-conv"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    k_sites: int | None = None
    max_per_class: int | None = None
    epochs: int = 4
    width: int = 16
    image_size: int = 32
    metric: str = "site_balanced_accuracy"
    grace_period: int = 1  # ASHA: seeds every trial gets before it can be stopped
    reduction_factor: int = 2
    cpus_per_trial: float = 1.0
    max_concurrent_trials: int = 0  # 0: as many as the cluster's CPUs allow
    storage_path: str = "medi-dist-runs"
    cache_dir: str = "medi-dist-cache"
    experiment: str = "medi-dist"
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else ./mlflow.db
    final_eval: bool = True
