"""Generation: plans validated against a model directory (`plan`), per-tile seeds and shard
partition (`tile_list`), per-shard sampling and writing (`writer`), and the Ray Data job (`job`) that
writes synthetic tiles as a dataset directory (same layout as ingest output). Ray only in job.py.
Import the submodules directly; this package imports nothing so the CLI starts fast."""
