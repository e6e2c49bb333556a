"""The per-worker training loop: Accelerate (mixed precision, gradient sync) around the MeDi UNet.

Ray Train has already set up the process group; `train_worker` only sees its dataset shard, reports
metrics and checkpoints, and (rank 0) writes MLflow. Checkpoints carry model, EMA, optimizer,
scheduler, RNG, step and data position, so a restarted worker group continues where it stopped.
The loop reads top to bottom: build, resume, then step / log / checkpoint until the last step.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_cosine_schedule_with_warmup

from ..data.device_decode import DeviceDecoder
from ..data.stream import to_model_range
from ..metadata import CONDITION_PREFIX, ConditioningSpec
from ..model import EMA, ConditionedUNet, ModelConfig, diffusion_loss, save_model_dir
from ..model.unet import unwrap
from ..tracking import RunLogger
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig

SITE_CODES = CONDITION_PREFIX + "tissue_source_site"  # the stream's site column (every tile has one)


def torch_batches(
    shard,
    batch_size: int,
    columns: list[str],
    epoch_skip: int,
    device,
    shuffle_seed: int | None,
    decoder: DeviceDecoder | None = None,
    to_reference=None,
):
    """Tensors for the model's columns; the first `epoch_skip` batches were consumed before a resume.
    With a `decoder` (data.decode=device) the batches carry encoded tiles, decoded here on `device`;
    a tile that fails is dropped from its batch (the batch is smaller by it) and counted.
    `to_reference(images, site codes)`: the tiles re-rendered in the reference stain (data.stain=reference)."""
    counted: set = set()  # bad tiles reported in this pass
    it = shard.iter_batches(
        batch_size=batch_size,
        batch_format="numpy",
        drop_last=True,
        prefetch_batches=2,
        local_shuffle_buffer_size=4 * batch_size,
        local_shuffle_seed=shuffle_seed,
    )
    for i, b in enumerate(it):
        if i < epoch_skip:
            continue
        if decoder is not None:
            x, kept = decoder(b, device, counted)
            yield to_model_range(x), {c: torch.from_numpy(b[c][kept]).to(device) for c in columns}
            continue
        img = np.ascontiguousarray(b["image"])  # uint8 from the stream
        if to_reference is not None:
            img = to_reference(img, b[SITE_CODES])
        if torch.device(device).type == "cpu":  # numpy converts ~10x faster than torch's uint8 -> float on CPU
            x = torch.from_numpy(to_model_range(img))
        else:  # to float on the accelerator: 4x less to copy there
            x = to_model_range(torch.from_numpy(img).to(device, non_blocking=True))
        yield x, {c: torch.from_numpy(b[c]).to(device) for c in columns}


def mean_loss(losses: list[torch.Tensor]) -> float:
    return torch.stack(losses).float().mean().item() if losses else float("nan")


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(unwrap(model).state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def log_sample_grid(
    logger: RunLogger, ema: EMA, model_cfg: ModelConfig, spec: ConditioningSpec, pairs: list, step: int
) -> None:
    """A (type x site) grid sampled from the EMA weights on the training device, as an MLflow artifact."""
    from ..visual import model_sample_grid, png_bytes

    m = ConditionedUNet(model_cfg, spec)
    m.load_state_dict({k: v.cpu() for k, v in ema.averaged_state_dict(m).items()})
    m = m.to(next(iter(ema.shadow.values())).device)
    grid = model_sample_grid(m.eval(), spec, [tuple(p) for p in pairs])
    logger.artifact_bytes(png_bytes(grid), f"samples_step{step:07d}.png", "samples")


@dataclass
class WorkerConfig:
    """What every Ray Train worker receives: the training config and what the driver resolved."""

    train: TrainConfig
    model: ModelConfig
    spec: ConditioningSpec  # the conditions this model learns, with their vocabularies
    pairs: list[tuple[str, str]]  # (type, site) pairs of the training splits: the sample grids' cells
    tracking_uri: str
    mlflow_run_id: str | None  # None: the server was down when the run was to be created
    spill_dir: str | None = None  # where calls MLflow did not take are written (the run folder's)
    decoder: DeviceDecoder | None = None  # data.decode=device: decodes the stream's encoded tiles here
    # data.stain=reference: the training sites' stains (SiteStains.to_dict) and the stream's site vocabulary
    site_stains: dict | None = None
    site_names: list[str] = field(default_factory=list)


@dataclass
class Parts:
    """The objects one worker trains."""

    accelerator: Accelerator
    model: torch.nn.Module
    ema: EMA
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator  # this rank's noise and t draws


@dataclass
class Position:
    """Where training stands; a checkpoint records it so a restart continues mid-epoch."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0


@dataclass
class Window:
    """Losses and throughput since the last log line. Losses stay tensors until read: a per-step
    .item() would sync the GPU."""

    keep: int  # losses kept: enough for the log window and the checkpoint's mean of the last 50
    losses: list = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)
    wait: float = 0.0  # seconds spent waiting for batches
    imgs: int = 0

    def add(self, loss: torch.Tensor, imgs: int) -> None:
        self.losses.append(loss.detach())
        del self.losses[: -self.keep]
        self.imgs += imgs

    def close(self, last: int) -> tuple[float, int, float, float]:
        """(mean of the last `last` losses, images, wait, seconds) of this window; starts the next."""
        now = time.perf_counter()
        out = mean_loss(self.losses[-last:]), self.imgs, self.wait, now - self.start
        self.start, self.wait, self.imgs = now, 0.0, 0  # the logging after this counts in the next window
        return out


def build(cfg: WorkerConfig, rank: int) -> Parts:
    """Model, EMA, optimizer, schedule and generator, identical on every rank (seeded)."""
    run, optim = cfg.train.run, cfg.train.optim
    accelerator = Accelerator(
        mixed_precision=run.mixed_precision, cpu=not run.use_gpu, gradient_accumulation_steps=optim.grad_accum
    )
    set_seed(cfg.train.seed)  # identical initial weights on every rank
    model = ConditionedUNet(cfg.model, cfg.spec)
    if run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, optim.ema_decay)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=optim.lr,
        betas=tuple(optim.betas),
        weight_decay=optim.weight_decay,
        fused=optim.fused and run.use_gpu,
    )
    steps = cfg.train.steps
    sched = get_cosine_schedule_with_warmup(opt, max(1, int(optim.warmup_fraction * steps)), steps)
    # Per-rank noise and t draws, on the training device (CPU-drawn noise would stall a GPU step).
    gen = torch.Generator(accelerator.device).manual_seed(cfg.train.seed * 1000 + rank)
    return Parts(accelerator, model, ema, opt, sched, gen)


def resume(parts: Parts, rank: int) -> Position | None:
    """Load the last registered checkpoint into the parts (before accelerator.prepare); None when
    there is none (a fresh start)."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        m_state, e_state, t_state, info = load_checkpoint(Path(d))
    parts.model.load_state_dict(m_state)
    parts.ema.load_state_dict({**t_state["ema_meta"], "shadow": e_state})
    parts.opt.load_state_dict(t_state["optimizer"])
    parts.sched.load_state_dict(t_state["scheduler"])
    try:
        parts.gen.set_state(t_state["generators"][rank % len(t_state["generators"])])
    except RuntimeError:  # checkpoint from another device type (CPU <-> GPU): keep the fresh seed
        pass
    return Position(info["step"], info["epoch"], info["batches_in_epoch"])


def prepare(parts: Parts, cfg: WorkerConfig) -> None:
    """Wrap for distributed training (DDP, mixed precision) and move the EMA to the device."""
    acc = parts.accelerator
    parts.model, parts.opt, parts.sched = acc.prepare(parts.model, parts.opt, parts.sched)
    if cfg.train.run.compile:
        parts.model = torch.compile(parts.model)
    parts.ema.shadow = {k: v.to(acc.device) for k, v in parts.ema.shadow.items()}


def train_step(parts: Parts, x: torch.Tensor, cond: dict, grad_clip: float, min_snr_gamma: float = 0.0) -> torch.Tensor:
    """One micro-batch: loss, backward and (when gradients sync) the optimizer step."""
    acc = parts.accelerator
    with acc.accumulate(parts.model):
        with acc.autocast():
            loss = diffusion_loss(parts.model, x, cond, parts.gen, min_snr_gamma=min_snr_gamma)
        acc.backward(loss)
        if acc.sync_gradients and grad_clip > 0:
            acc.clip_grad_norm_(parts.model.parameters(), grad_clip)
        parts.opt.step()
        parts.sched.step()
        parts.opt.zero_grad(set_to_none=True)
    return loss


def checkpoint(
    parts: Parts, pos: Position, cfg: WorkerConfig, window: Window, logger: RunLogger | None, final: bool
) -> None:
    """All ranks report together; rank 0 attaches the checkpoint (and, at the end, the model dir)."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    gens = [parts.gen.get_state()] * world  # CPU byte tensors: gathered as objects (NCCL takes GPU tensors only)
    if world > 1:
        torch.distributed.all_gather_object(gens, parts.gen.get_state())
    digest = weights_digest(parts.model)
    mine = (digest, ray.get_runtime_context().get_node_id())
    gathered = [mine] * world
    if world > 1:
        torch.distributed.all_gather_object(gathered, mine)
    digests, nodes = [g[0] for g in gathered], {g[1] for g in gathered}
    optim = cfg.train.optim
    metrics = {
        "step": pos.step,
        "epoch": pos.epoch,
        "loss": mean_loss(window.losses[-50:]),
        "ranks_in_sync": float(len(set(digests)) == 1),
        "weights_sha256": digest,
        "worker_nodes": len(nodes),
        "final": final,
        "samples_seen": pos.step * optim.batch_size * optim.grad_accum * world,
    }
    with tempfile.TemporaryDirectory() as d:
        ck = None
        if rank == 0:
            base, ema = unwrap(parts.model), parts.ema
            save_checkpoint(
                Path(d),
                base.state_dict(),
                ema.shadow,
                {
                    "optimizer": parts.opt.state_dict(),
                    "scheduler": parts.sched.state_dict(),
                    "generators": gens,
                    "ema_meta": {"decay": ema.decay, "warmup": ema.warmup, "step": ema.step},
                },
                {"step": pos.step, "epoch": pos.epoch, "batches_in_epoch": pos.batches_in_epoch},
            )
            if final:
                save_model_dir(
                    Path(d) / "model",
                    base,
                    ema,
                    config=cfg.model,
                    spec=cfg.spec,
                    extra_info={
                        **({"stain": "reference", "site_stains": cfg.site_stains} if cfg.site_stains else {}),
                        "name": cfg.train.run.name,
                        "steps": pos.step,
                        "dataset": str(cfg.train.data.dataset),
                        "train_pairs": cfg.pairs,
                        "mlflow_run_id": cfg.mlflow_run_id,
                    },
                )
            ck = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=ck)
    if logger and final:
        logger.metrics({"ranks_in_sync": metrics["ranks_in_sync"]}, pos.step)
        log_sample_grid(logger, parts.ema, cfg.model, cfg.spec, cfg.pairs, pos.step)


def train_worker(config: dict) -> None:
    """Ray Train's per-worker function; `config["worker"]` is the WorkerConfig."""
    cfg: WorkerConfig = config["worker"]
    run, optim, steps = cfg.train.run, cfg.train.optim, cfg.train.steps
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if run.threads_per_worker:
        torch.set_num_threads(run.threads_per_worker)
    deterministic = cfg.train.data.deterministic
    # fixed input shapes: let cuDNN pick the fastest convolutions, unless the run must be reproducible
    # (autotuning picks by timing, and some of its kernels sum in a varying order)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic

    parts = build(cfg, rank)
    pos = resume(parts, rank)
    resumed, pos = pos is not None, pos or Position()
    prepare(parts, cfg)
    logger = RunLogger(cfg.tracking_uri, cfg.mlflow_run_id, cfg.spill_dir) if rank == 0 else None
    if logger and resumed:
        logger.metrics({"resumed_from_step": pos.step}, pos.step)  # every restart is visible in MLflow
    columns = unwrap(parts.model).condition_columns
    shard = ray.train.get_dataset_shard("train")
    stop_at = min(steps, run.stop_after or steps)
    window = Window(keep=max(50, run.log_every))
    to_reference = None
    if cfg.site_stains:
        from ..data.site_stains import SiteStains

        stains, names = SiteStains.from_dict(cfg.site_stains), cfg.site_names

        def to_reference(img: np.ndarray, codes: np.ndarray) -> np.ndarray:  # the stream's tiles are (N, 3, H, W)
            hwc = stains.to_reference(img.transpose(0, 2, 3, 1), [names[c] for c in codes])
            return np.ascontiguousarray(hwc.transpose(0, 3, 1, 2))

    while pos.step < stop_at:
        t_wait = time.perf_counter()
        # seeded per (seed, rank, epoch): a resumed epoch replays the same shuffle
        shuffle_seed = (
            int(np.random.SeedSequence([cfg.train.seed, rank, pos.epoch]).generate_state(1)[0])
            if deterministic
            else None
        )
        for x, cond in torch_batches(
            shard,
            optim.batch_size,
            columns,
            pos.batches_in_epoch,
            parts.accelerator.device,
            shuffle_seed,
            cfg.decoder,
            to_reference,
        ):
            window.wait += time.perf_counter() - t_wait
            if run.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = train_step(parts, x, cond, optim.grad_clip, optim.min_snr_gamma)
            pos.batches_in_epoch += 1
            window.add(loss, x.shape[0])
            if parts.accelerator.sync_gradients:
                parts.ema.update(parts.model)
                pos.step += 1
                if logger and pos.step % run.log_every == 0:
                    loss_mean, imgs, wait, dt = window.close(run.log_every)
                    logger.metrics(
                        {
                            "loss": loss_mean,
                            "lr": parts.sched.get_last_lr()[0],
                            "img_per_s": imgs * world / dt,
                            "data_wait_fraction": wait / dt,
                        },
                        pos.step,
                    )
                if logger and run.sample_every and pos.step % run.sample_every == 0 and pos.step < steps:
                    log_sample_grid(logger, parts.ema, cfg.model, cfg.spec, cfg.pairs, pos.step)
                if pos.step % run.checkpoint_every == 0 and pos.step < stop_at:
                    checkpoint(parts, pos, cfg, window, logger, final=False)
                if pos.step >= stop_at:
                    break
            t_wait = time.perf_counter()
        else:  # shard exhausted: next epoch
            pos.epoch, pos.batches_in_epoch = pos.epoch + 1, 0
    checkpoint(parts, pos, cfg, window, logger, final=pos.step >= steps)
    if logger:
        logger.flush()  # metrics queued during a tracking outage: delivered (or spilled) before the worker ends
