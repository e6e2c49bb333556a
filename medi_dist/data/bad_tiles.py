"""The stream's bad-tile ledger: tiles that fail to decode are skipped, reported here with their key,
shard and error, and counted against `max_bad_fraction` (read tasks and, with decode="device", the
training workers' decoder report to the same actor)."""

from __future__ import annotations

import ray


class TooManyBadTiles(RuntimeError):
    pass


def check_bad_fraction(seen: int, nbad: int, max_bad_fraction: float, bad: list) -> None:
    if nbad / seen > max_bad_fraction:
        raise TooManyBadTiles(
            f"{nbad} of {seen} tiles failed to decode (> max_bad_fraction={max_bad_fraction}); "
            f"first: {bad[:1] or 'see logs'}. Check the shards with `medi-dist data stats --verify`."
        )


@ray.remote(num_cpus=0)
class BadTileLedger:
    """Counts rows seen and tiles skipped across all decode tasks."""

    def __init__(self):
        self.seen, self.bad = 0, []

    def report(self, n: int, bad: list) -> tuple[int, int]:
        self.seen += n
        self.bad += bad
        return self.seen, len(self.bad)

    def summary(self) -> dict:
        return {"seen": self.seen, "skipped": len(self.bad), "bad": list(self.bad)}


def ledger_on_this_node():
    """The ledger lives on the driver's node. Placed anywhere (num_cpus=0), it could land on a worker
    node; losing that node would kill it, and every decode task after that would fail on it, also
    those of the restarted Train workers, until the training ran out of `max_failures`
    (tests/test_node_loss.py). The driver's node going away ends the job anyway."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return BadTileLedger.options(scheduling_strategy=here).remote()
