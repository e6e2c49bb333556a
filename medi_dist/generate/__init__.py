"""Generation: plans validated against a model directory, per-tile seeds, and the Ray Data job that
writes synthetic tiles as a dataset directory (same layout as ingest output). Ray only in job.py."""

from .plan import GenerationPlan, PlanError, PlanRow, TrainingData, resolve, training_data
from .tiles import tile_seed
from .writer import SamplingSettings, ShardGenerator

__all__ = ["GenerationPlan", "PlanError", "PlanRow", "SamplingSettings", "ShardGenerator", "TrainingData",
           "resolve", "tile_seed", "training_data"]
