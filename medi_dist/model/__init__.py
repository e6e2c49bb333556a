"""Conditioned UNet (diffusers), noise schedule and loss, EMA, model directories and sampling.

No Ray imports here: this package is plain PyTorch and runs the same in tests, workers and scripts.
"""

from .config import FUSIONS, PRESETS, ModelConfig
from .diffusion import diffusion_loss, noise_scheduler
from .ema import EMA
from .model_dir import ModelDirError, load_model_dir, read_model_info, save_model_dir
from .sampling import SAMPLERS, encode_conditions, make_sampler, sample, to_uint8
from .unet import ConditionedUNet, count_parameters, unwrap

__all__ = [
    "EMA",
    "FUSIONS",
    "PRESETS",
    "SAMPLERS",
    "ConditionedUNet",
    "ModelConfig",
    "ModelDirError",
    "count_parameters",
    "diffusion_loss",
    "encode_conditions",
    "load_model_dir",
    "make_sampler",
    "noise_scheduler",
    "read_model_info",
    "sample",
    "save_model_dir",
    "to_uint8",
    "unwrap",
]
