"""decode="device": the training worker's half of the stream. The read tasks ship encoded tiles; this
decodes and resizes a batch on the worker's accelerator (torchvision's batched `decode_jpeg`: nvJPEG
on a CUDA device) and reports tiles that fail to the stream's ledger."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import ray

from .bad_tiles import TooManyBadTiles, check_bad_fraction

log = logging.getLogger("medi_dist.data")


@dataclass
class DeviceDecoder:
    """The consumer's half of `decode="device"`: a batch's encoded tiles -> uint8 (N, 3, r, r) on
    `device`. JPEGs go through torchvision's batched `decode_jpeg` (nvJPEG on a CUDA device,
    libjpeg-turbo on the CPU), other formats (PNG) through `decode_image` on the CPU; then an
    antialiased bilinear resize (torchvision; uint8 on the CPU follows PIL's, on CUDA it runs in
    float and rounds). A tile that does not decode, or decodes to other than 3 channels (the CPU
    path takes RGB only), is skipped and reported to the stream's ledger with its key, shard and
    error; it counts against `max_bad_fraction` as a read task's would."""

    resolution: int
    ledger: ray.actor.ActorHandle
    max_bad_fraction: float
    min_rows_for_abort: int

    def __call__(self, batch: dict, device, counted: set | None = None):
        """(images, kept): the decoded tiles and the indices of the batch's rows they are (index the
        other columns with it). `counted`: (key, shard) pairs already reported in this pass, so a
        tile repeated by balancing is reported once per pass and consumer."""
        import torch

        encoded = batch["encoded"]
        tiles, errors = self._decode(encoded, device)
        for i, t in enumerate(tiles):
            if t is not None and t.shape[0] != 3:
                errors[i], tiles[i] = f"ValueError: {t.shape[0]} channels, expected RGB", None
        kept = np.array([i for i, t in enumerate(tiles) if t is not None], dtype=np.int64)
        if errors:
            self._report(batch, errors, counted, device, all_bad=not len(kept))
        r = self.resolution
        images = torch.empty((len(kept), 3, r, r), dtype=torch.uint8, device=device)
        by_shape: dict[tuple, list[int]] = {}
        for j, i in enumerate(kept):
            by_shape.setdefault(tuple(tiles[i].shape[1:]), []).append(j)
        for shape, js in by_shape.items():
            x = torch.stack([tiles[kept[j]] for j in js])
            if shape != (r, r):
                from torchvision.transforms.v2.functional import InterpolationMode, resize

                x = resize(x, [r, r], interpolation=InterpolationMode.BILINEAR, antialias=True)
            images[js] = x
        return images, kept

    @staticmethod
    def _decode(encoded, device) -> tuple[list, dict[int, str]]:
        import warnings

        import torch
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in encoded]
        tiles: list = [None] * len(data)
        errors: dict[int, str] = {}
        jpeg = [i for i, b in enumerate(encoded) if bytes(b[:3]) == b"\xff\xd8\xff"]
        with warnings.catch_warnings():  # torchvision 0.29 announces its decoders' move to TorchCodec
            warnings.filterwarnings("ignore", message=".*(TorchCodec|deprecated).*")
            if jpeg:
                try:  # one call for the batch: nvJPEG's batched decode on CUDA
                    for i, t in zip(jpeg, decode_jpeg([data[i] for i in jpeg], device=device)):
                        tiles[i] = t
                except Exception:  # noqa: BLE001 - one bad tile fails the whole call: find it
                    for i in jpeg:
                        try:
                            tiles[i] = decode_jpeg(data[i], device=device)
                        except Exception as e:  # noqa: BLE001 - skipped and counted
                            errors[i] = f"{type(e).__name__}: {e}"
            for i in sorted(set(range(len(data))) - set(jpeg)):  # PNG and the like: on the CPU
                try:
                    tiles[i] = decode_image(data[i], mode=ImageReadMode.UNCHANGED).to(device)
                except Exception as e:  # noqa: BLE001 - skipped and counted
                    errors[i] = f"{type(e).__name__}: {e}"
        return tiles, errors

    def _report(self, batch: dict, errors: dict[int, str], counted: set | None, device, all_bad: bool) -> None:
        bad = []
        for i, err in sorted(errors.items()):
            key, shard = str(batch["key"][i]), str(batch["shard"][i])
            if counted is not None:
                if (key, shard) in counted:
                    continue
                counted.add((key, shard))
            log.warning("skipping tile %s in %s (decoding on %s): %s", key, shard, device, err)
            bad.append({"key": key, "shard": shard, "error": err})
        if bad:
            seen, nbad = ray.get(self.ledger.report.remote(0, bad))  # the read task counted the rows
            if seen >= self.min_rows_for_abort:
                check_bad_fraction(seen, nbad, self.max_bad_fraction, bad)
        if all_bad:
            raise TooManyBadTiles(
                f"all {len(errors)} tiles of a batch failed to decode on {device}; first: "
                f"{next(iter(errors.values()))}. Check the shards with `medi-dist data stats --verify`."
            )
