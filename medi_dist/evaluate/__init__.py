"""Evaluation: frozen encoders (`encoders`), fidelity (`fidelity`, `fidelity_job`), downstream
classifiers (`classifiers`, `downstream`, `allocation`, `tiles`), shared metrics (`metrics`) and plots.
Import the submodules directly; this package imports nothing so the CLI starts fast."""
