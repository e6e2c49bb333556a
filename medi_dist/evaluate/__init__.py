"""Evaluation: frozen encoders, fidelity (Fréchet distance, conditional accuracy), downstream
classifiers (linear probe, small CNN) and the shared metrics. No Ray imports here."""

from .classifiers import LinearProbe, SmallCNN
from .encoders import Encoder, InceptionEncoder, OpenClipEncoder, RandomConvEncoder, get_encoder, preprocess
from .fidelity import conditional_accuracy, fidelity_report, fidelity_table, frechet_distance
from .metrics import (
    METRIC_NAMES,
    all_metrics,
    balanced_accuracy,
    format_table,
    mcc,
    mean_sem,
    site_averaged_balanced_accuracy,
    subgroup_table,
    worst_site_accuracy,
)

__all__ = [
    "Encoder", "InceptionEncoder", "OpenClipEncoder", "RandomConvEncoder", "get_encoder", "preprocess",
    "conditional_accuracy", "fidelity_report", "fidelity_table", "frechet_distance",
    "LinearProbe", "SmallCNN",
    "METRIC_NAMES", "all_metrics", "balanced_accuracy", "format_table", "mcc", "mean_sem",
    "site_averaged_balanced_accuracy", "subgroup_table", "worst_site_accuracy",
]
