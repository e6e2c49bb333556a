"""ModelConfig: everything needed to rebuild the denoiser and its noise schedule (no training knobs)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

FUSIONS = ("additive", "concat", "linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")

PRESETS: dict[str, dict[str, Any]] = {
    # The reference MeDi "deep" UNet at 128 px: ResNet blocks only, attention only in the mid block.
    # layers_per_block=2 gives 415.0 M UNet parameters (matches the reference's ~415 M).
    "reference-deep": dict(
        sample_size=128,
        block_out_channels=(128, 256, 512, 512, 1024, 1024),
        layers_per_block=2,
        norm_num_groups=32,
    ),
    # One GPU at 64 px: the reference's depth (2 ResNet blocks per level, attention in the mid block)
    # at a fifth of its width, so a few device minutes train it through many epochs.
    "mid": dict(
        sample_size=64,
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        norm_num_groups=32,
    ),
    # Trains usefully on a couple of CPU cores at 32-64 px: the cost is in the full-resolution level,
    # so it is kept narrow (16) while the coarse levels get the width; 11.7 GFLOP per training step at
    # batch 16 x 32 px (forward + backward). A 128-wide embedding leaves room for per-column widths.
    "small": dict(
        sample_size=32,
        block_out_channels=(16, 32, 64, 128),
        layers_per_block=1,
        norm_num_groups=8,
        time_embedding_dim=128,
    ),
    # Unit tests only.
    "tiny": dict(sample_size=16, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4),
}


@dataclass
class ModelConfig:
    preset: str = "small"
    sample_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    down_block_types: tuple[str, ...] | None = None  # None -> DownBlock2D everywhere
    up_block_types: tuple[str, ...] | None = None  # None -> UpBlock2D everywhere
    layers_per_block: int = 1
    norm_num_groups: int = 8
    attention_head_dim: int = 8  # mid-block attention (diffusers default, as in the reference)
    time_embedding_dim: int | None = None  # None -> 4 x block_out_channels[0] (UNet2DModel default)
    # Conditioning
    fusion: str = "additive"
    cond_dropout: dict[str, float] = field(default_factory=dict)  # per column name; others use the default
    default_cond_dropout: float = 0.1  # drop rate -> learned null token, enables classifier-free guidance
    cont_frequencies: int = 16  # sin/cos frequencies for continuous columns
    # Columns that condition only the last `late_up_blocks` up blocks (the finest resolutions, where
    # stain and scanner texture are drawn), not the coarse levels that lay out morphology: in
    # confounded data (each site owned by one type) a site seen everywhere learns its owner's tissue.
    late_columns: tuple[str, ...] = ()
    late_up_blocks: int = 1
    # Noise schedule (training and samplers are configured from these)
    prediction_type: str = "epsilon"
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        n = len(self.block_out_channels)
        self.down_block_types = tuple(self.down_block_types or ("DownBlock2D",) * n)
        self.up_block_types = tuple(self.up_block_types or ("UpBlock2D",) * n)
        self.cond_dropout = {str(k): float(v) for k, v in dict(self.cond_dropout).items()}
        self.late_columns = tuple(str(c) for c in self.late_columns)
        if self.late_columns and self.fusion != "additive":
            raise ValueError(f"late_columns need fusion 'additive' (got {self.fusion!r})")
        if not 1 <= self.late_up_blocks <= n:
            raise ValueError(f"late_up_blocks must be 1..{n} (the number of up blocks), got {self.late_up_blocks}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError("need one down and one up block type per entry of block_out_channels")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} not divisible by norm_num_groups={self.norm_num_groups}")
        if self.sample_size % 2 ** (n - 1):
            raise ValueError(f"sample_size {self.sample_size} must be divisible by {2 ** (n - 1)} ({n} levels)")
        for k, p in [("default", self.default_cond_dropout), *self.cond_dropout.items()]:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"cond_dropout for {k!r} must be in [0, 1], got {p}")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    def dropout_for(self, column: str) -> float:
        return self.cond_dropout.get(column, self.default_cond_dropout)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(preset=name, **{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}")
        return cls(**dict(d))
