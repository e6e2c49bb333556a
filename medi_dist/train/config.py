"""Training configuration: one YAML file (see jobs/*.yaml) plus `section.field=value` overrides."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..metadata import MIN_TILE_PX

# run.name is a folder under run.storage_path and the resume key: empty would make Ray invent a new
# folder per start (no resume), and '/' or '..' would write elsewhere.
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


@dataclass
class DataConfig:
    dataset: str = "data/procedural"  # a dataset directory made by `medi-dist ingest`
    splits: list[str] = field(default_factory=lambda: ["train"])
    balance: str = "type"  # none | type | type_site (the reference balances by cancer type)
    max_bad_fraction: float = 0.01
    cpus_per_decode: float = 0.5  # Ray Data's CPU slice per decode task/actor
    # The same command and seed give the same weights on the same machine: seeded, ordered data
    # (each epoch its own order) and, on GPU, deterministic cuDNN kernels (no autotuning; slower).
    deterministic: bool = True
    # For GPU nodes short of CPU: Ray Data's read tasks then ship the encoded bytes and each worker
    # decodes and resizes its batch on its GPU (torchvision's batched decode_jpeg, i.e. nvJPEG).
    decode: str = "cpu"  # cpu: read tasks decode (PIL) | device: each GPU worker decodes (nvJPEG; run.use_gpu=true)
    # as-stored: the network draws each site's stain | reference: every tile is re-rendered in one reference
    # stain for training and each generated tile is rendered in the requested site's (data/site_stains.py)
    stain: str = "as-stored"


@dataclass
class ModelSection:
    preset: str = "small"
    resolution: int | None = None  # None: the preset's sample_size
    conditions: list[str] = field(default_factory=lambda: ["cancer_type", "tissue_source_site"])
    continuous: list[str] = field(default_factory=list)  # e.g. [age]
    fusion: str = "additive"
    cond_dropout: float = 0.1  # per column, to a learned null token (classifier-free guidance)
    # per-column rates over cond_dropout, e.g. {tissue_source_site: 0.3, cancer_type: 0.05}: a site dropped
    # often trains the same network's class-only branch; a type kept makes the site carry stain, not type
    column_dropout: dict[str, float] = field(default_factory=dict)
    # v-prediction learns usable samples within a few hundred CPU steps where epsilon gives noise
    # (measured on procedural data; the reference used epsilon); set epsilon to match it exactly
    prediction_type: str = "v_prediction"
    # columns that condition only the finest up blocks (colour and texture), e.g. [tissue_source_site]
    late_columns: list[str] = field(default_factory=list)
    late_up_blocks: int = 1


@dataclass
class OptimConfig:
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.95, 0.999])
    weight_decay: float = 1e-6
    warmup_fraction: float = 0.01
    grad_clip: float = 1.0
    batch_size: int = 32  # per worker
    grad_accum: int = 1
    ema_decay: float = 0.999
    min_snr_gamma: float = 0.0  # > 0: Min-SNR loss weighting (model/diffusion.py), e.g. 5
    fused: bool = False  # fused AdamW (GPU)


@dataclass
class RunSection:
    name: str = "medi-small"
    storage_path: str = "medi-dist-runs"  # local folder or a cloud URI (s3://, gs://)
    output: str | None = None  # model directory; default <storage_path>/<name>/model
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    threads_per_worker: int | None = None  # torch threads; None: Ray's default (= cpus_per_worker)
    mixed_precision: str = "no"  # no | fp16 | bf16
    channels_last: bool = False
    compile: bool = False
    checkpoint_every: int = 100  # steps
    keep_checkpoints: int = 2
    max_failures: int = 2  # worker failures survived by restarting from the last checkpoint
    log_every: int = 10
    sample_every: int = 0  # steps between sample grids in MLflow (0: only at the end)
    stop_after: int | None = None  # stop early (for tests / preemption drills); re-run to resume
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI or ./mlflow.db
    experiment: str = "medi-dist"
    system_metrics: bool = False  # MLflow system metrics (CPU, memory, GPU) of the driver's machine
    log_model: bool = True  # the final model directory as an MLflow model (pyfunc) in the run
    registered_model: str | None = None  # Model Registry name for it; default run.name ("": do not register)


@dataclass
class TrainConfig:
    steps: int = 500
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self) -> None:
        if not isinstance(self.run.name, str) or not RUN_NAME.fullmatch(self.run.name):
            raise ValueError(
                f"run.name must be letters, digits, '.', '_' or '-', not start with '.', and not be "
                f"empty (it names the run's folder under run.storage_path), got {self.run.name!r}"
            )
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if self.data.decode not in ("cpu", "device"):
            raise ValueError(f"data.decode must be cpu or device, got {self.data.decode!r}")
        if self.data.decode == "device" and not self.run.use_gpu:
            raise ValueError(
                "data.decode=device decodes tiles on the training workers' GPUs (nvJPEG) and needs "
                "run.use_gpu=true; without GPUs use data.decode=cpu (Ray Data's read tasks decode)"
            )
        if self.data.stain not in ("as-stored", "reference"):
            raise ValueError(f"data.stain must be as-stored or reference, got {self.data.stain!r}")
        if self.data.stain == "reference" and self.data.decode == "device":
            raise ValueError(
                "data.stain=reference re-renders the decoded tiles on the CPU before each step; use data.decode=cpu"
            )
        if self.run.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"run.mixed_precision must be no, fp16 or bf16, got {self.run.mixed_precision!r}")
        positive = {
            "run.num_workers": self.run.num_workers,
            "optim.batch_size": self.optim.batch_size,
            "optim.grad_accum": self.optim.grad_accum,
            "optim.lr": self.optim.lr,
            "run.checkpoint_every": self.run.checkpoint_every,
            "run.log_every": self.run.log_every,
            "run.keep_checkpoints": self.run.keep_checkpoints,
            "run.cpus_per_worker": self.run.cpus_per_worker,
        }
        bad = {k: v for k, v in positive.items() if not v > 0}
        if bad:
            raise ValueError(f"must be positive: {bad}")
        if "cancer_type" not in self.model.conditions:
            raise ValueError(
                f"model.conditions must include cancer_type (generation asks for types), got {self.model.conditions}"
            )
        if self.model.resolution is not None and self.model.resolution < MIN_TILE_PX:
            raise ValueError(
                f"model.resolution must be at least {MIN_TILE_PX} px (leave it out for the preset's "
                f"size), got {self.model.resolution}"
            )
        if not self.optim.min_snr_gamma >= 0:
            raise ValueError(f"optim.min_snr_gamma must be >= 0 (0: off; 5 is usual), got {self.optim.min_snr_gamma}")
        if not 0 <= self.model.cond_dropout <= 1:
            raise ValueError(f"model.cond_dropout must be in [0, 1], got {self.model.cond_dropout}")
        if not isinstance(self.model.column_dropout, dict):
            raise ValueError(
                f"model.column_dropout must map condition columns to rates, got {self.model.column_dropout!r}"
            )
        columns = set(self.model.conditions) | set(self.model.continuous)
        for k, p in self.model.column_dropout.items():
            if k not in columns or not isinstance(p, (int, float)) or not 0 <= p <= 1:
                raise ValueError(
                    f"model.column_dropout: {k}={p!r}; need a condition column ({sorted(columns)}) and a rate in [0, 1]"
                )
