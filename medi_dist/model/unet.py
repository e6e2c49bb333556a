"""The conditioned denoiser: diffusers UNet2DModel + per-column metadata embeddings.

UNet2DModel(class_embed_type="identity") adds whatever tensor is passed as `class_labels` to the
timestep embedding, so the fused metadata embedding (B, time_embed_dim) conditions every ResNet block
exactly like the reference's class embedding did.
"""

from __future__ import annotations

import math

import torch
from diffusers import UNet2DModel
from torch import nn

from ..metadata import CONDITION_PREFIX, CONTINUOUS_PREFIX, ConditioningSpec
from .config import ModelConfig


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP / Accelerate (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


class ContinuousEmbedding(nn.Module):
    """sin/cos features of a z-scored value -> Linear; a learned null vector where the value is NaN."""

    def __init__(self, n_freq: int, dim: int):
        super().__init__()
        # Geometric frequencies from 1/4 to 32 radians per standard deviation: coarse and fine age.
        self.register_buffer("freqs", torch.logspace(math.log10(0.25), math.log10(32.0), n_freq))
        self.proj = nn.Linear(2 * n_freq, dim)
        self.null = nn.Parameter(torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        missing = torch.isnan(x)
        # Zero the NaNs *before* sin/cos: torch.where would still back-propagate NaN gradients.
        ang = torch.nan_to_num(x, nan=0.0)[:, None] * self.freqs
        out = self.proj(torch.cat([ang.sin(), ang.cos()], dim=1))
        return torch.where(missing[:, None], self.null.to(out.dtype), out)


class ConditionEncoder(nn.Module):
    """Per-column embeddings fused into one (B, dim) vector. Column order = spec order."""

    def __init__(self, config: ModelConfig, spec: ConditioningSpec):
        super().__init__()
        self.fusion = config.fusion
        self.dim = dim = config.time_embed_dim
        self.cat_names = spec.categorical_names
        self.cont_names = spec.continuous_names
        self.null_index = [len(v) for v in spec.categorical]  # last row of each table = null token
        n = len(self.cat_names) + len(self.cont_names)
        if self.fusion == "concat" and n:
            if dim < n:
                raise ValueError(f"concat fusion needs time_embed_dim >= number of columns ({dim} < {n})")
            widths = [dim // n] * n
            widths[0] += dim - sum(widths)  # remainder to the first column (cancer type)
        else:
            widths = [dim] * n
        self.cat = nn.ModuleList(nn.Embedding(len(v) + 1, w) for v, w in zip(spec.categorical, widths))
        self.cont = nn.ModuleList(
            ContinuousEmbedding(config.cont_frequencies, w) for w in widths[len(self.cat_names) :]
        )
        self.mix = nn.Linear(n * dim, dim) if self.fusion == "linear" and n else None

    def forward(
        self, cond: dict[str, torch.Tensor], batch: int, device: torch.device, columns: set[str] | None = None
    ) -> torch.Tensor:
        """The fused embedding; `columns` (additive fusion): only these columns' parts."""
        parts = []
        keep = [columns is None or n in columns for n in self.cat_names + self.cont_names]
        for name, emb, null in zip(self.cat_names, self.cat, self.null_index):
            idx = cond.get(CONDITION_PREFIX + name)
            if idx is None:  # column not given -> unconditional for that column
                idx = torch.full((batch,), null, dtype=torch.long, device=device)
            idx = idx.to(device=device, dtype=torch.long)
            parts.append(emb(torch.where(idx < 0, torch.full_like(idx, null), idx)))
        for name, emb in zip(self.cont_names, self.cont):
            x = cond.get(CONTINUOUS_PREFIX + name)
            if x is None:
                x = torch.full((batch,), float("nan"), device=device)
            parts.append(emb(x.to(device)))
        parts = [p for p, k in zip(parts, keep) if k]
        if not parts:  # unconditional model (or no column of `columns`)
            return torch.zeros(batch, self.dim, device=device)
        if self.fusion == "additive":
            return torch.stack(parts).sum(0)
        fused = torch.cat(parts, dim=1)
        return self.mix(fused) if self.mix is not None else fused


class ConditionedUNet(nn.Module):
    """forward(x, t, cond) -> predicted ε (or v). `cond` holds `cond_<name>` LongTensors (-1 = null)
    and `cont_<name>` FloatTensors (NaN = null); absent columns are null (partial conditioning)."""

    def __init__(self, config: ModelConfig, spec: ConditioningSpec):
        super().__init__()
        self.config = config
        self.spec = spec
        unknown = set(config.late_columns) - set(spec.categorical_names + spec.continuous_names)
        if unknown:
            raise ValueError(f"late_columns {sorted(unknown)} are not condition columns of this model")
        self.cond_encoder = ConditionEncoder(config, spec)
        self.unet = UNet2DModel(
            sample_size=config.sample_size,
            in_channels=config.in_channels,
            out_channels=config.out_channels,
            block_out_channels=config.block_out_channels,
            down_block_types=config.down_block_types,
            up_block_types=config.up_block_types,
            layers_per_block=config.layers_per_block,
            norm_num_groups=config.norm_num_groups,
            attention_head_dim=config.attention_head_dim,
            time_embedding_dim=config.time_embed_dim,
            class_embed_type="identity",
        )

    @property
    def condition_columns(self) -> list[str]:
        return [CONDITION_PREFIX + n for n in self.spec.categorical_names] + [
            CONTINUOUS_PREFIX + n for n in self.spec.continuous_names
        ]

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | int, cond: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        cond = cond or {}
        late = set(self.config.late_columns)
        if not late:
            emb = self.cond_encoder(cond, x.shape[0], x.device)
            return self.unet(x, t, class_labels=emb, return_dict=False)[0]
        early = self.cond_encoder(
            cond, x.shape[0], x.device, set(self.spec.categorical_names + self.spec.continuous_names) - late
        )
        return self._forward_late(x, t, early, self.cond_encoder(cond, x.shape[0], x.device, late))

    def _forward_late(self, x: torch.Tensor, t: torch.Tensor | int, early: torch.Tensor, late: torch.Tensor):
        """UNet2DModel.forward (our block types: no skip blocks, positional time embedding) with the
        late columns' embedding added to the time embedding of the last up blocks only."""
        u = self.unet
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = u.time_embedding(u.time_proj(t).to(dtype=u.dtype)) + early.to(u.dtype)
        h = u.conv_in(x)
        skips = (h,)
        for block in u.down_blocks:
            h, res = block(hidden_states=h, temb=emb)
            skips += res
        h = u.mid_block(h, emb)
        first_late = len(u.up_blocks) - self.config.late_up_blocks
        for i, block in enumerate(u.up_blocks):
            res, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
            h = block(h, res, emb + late.to(u.dtype) if i >= first_late else emb)
        return u.conv_out(u.conv_act(u.conv_norm_out(h)))

    def null_conditions(self, batch: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Every column null: the unconditional branch of classifier-free guidance."""
        out = {
            CONDITION_PREFIX + n: torch.full((batch,), -1, dtype=torch.long, device=device)
            for n in self.spec.categorical_names
        }
        out.update(
            {
                CONTINUOUS_PREFIX + n: torch.full((batch,), float("nan"), device=device)
                for n in self.spec.continuous_names
            }
        )
        return out

    def drop_conditions(
        self, cond: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Training-time condition dropout: each column independently becomes null with probability
        config.dropout_for(name). Returns a new dict; other keys pass through unchanged."""
        out = dict(cond)
        for prefix, names, null in (
            (CONDITION_PREFIX, self.spec.categorical_names, -1),
            (CONTINUOUS_PREFIX, self.spec.continuous_names, float("nan")),
        ):
            for name in names:
                key, p = prefix + name, self.config.dropout_for(name)
                if key not in cond or p <= 0:
                    continue
                v = cond[key]
                gdev = generator.device if generator is not None else v.device
                drop = torch.rand(v.shape[0], generator=generator, device=gdev).to(v.device) < p
                out[key] = torch.where(drop, torch.full_like(v, null), v)
        return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
