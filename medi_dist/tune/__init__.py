"""Ray Tune study over augmentation proportions (see study.py)."""

from .study import SearchSpace, StudyConfig, StudyResult, run_study, summary

__all__ = ["SearchSpace", "StudyConfig", "StudyResult", "run_study", "summary"]
