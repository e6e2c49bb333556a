"""What Ray Train's controller unpickles to start a training: kept free of torch and diffusers.

The controller (a fresh Ray actor per `train()`) never runs the loop, but unpickling `loop.train_worker`
and its WorkerConfig would import the loop's modules there (~10 s on 2 cores). The worker config
travels pickled, as Ray would send it anyway, and only the workers import the loop.
"""

from __future__ import annotations

import pickle


def run_worker(config: dict) -> None:
    from .loop import train_worker

    train_worker({"worker": pickle.loads(config["worker"])})
