"""Ray Tune study over augmentation proportions: settings (`config`), the study (`study`), one trial
(`trial`), and the study's bookkeeping around the trials (`report`). Import the submodules directly;
this package imports nothing so the CLI starts fast."""
