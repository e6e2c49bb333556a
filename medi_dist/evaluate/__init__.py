"""Evaluation: frozen encoders (`encoders`), fidelity (`fidelity`, `fidelity_job`), downstream
classifiers (`classifiers`, `downstream`, `allocation`), reading tiles and features (`tile_reader`),
shared metrics (`metrics`), plots, logging a result to MLflow (`result_log`) and the CLI (`command`).
Import the submodules directly; this package imports nothing so the CLI starts fast."""
