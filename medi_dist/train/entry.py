"""What Ray Train's controller unpickles to start a training: kept free of torch and diffusers.

The controller (a fresh Ray actor per `train()`) never runs the loop, but unpickling `loop.train_worker`
and its WorkerConfig would import the loop's modules there (~10 s on 2 cores). So the controller gets
this function and an object-store reference to the worker config; only the workers fetch and import it.
"""

from __future__ import annotations

import ray


def run_worker(config: dict) -> None:
    from .loop import train_worker

    train_worker({"worker": ray.get(config["worker"])})
