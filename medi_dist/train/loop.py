"""The per-worker training loop: Accelerate (mixed precision, gradient sync) around the MeDi UNet.

Ray Train has already set up the process group; this function only sees its dataset shard, reports
metrics and checkpoints, and (rank 0) writes MLflow. Checkpoints carry model, EMA, optimizer,
scheduler, RNG, step and data position, so a restarted worker group continues where it stopped.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_cosine_schedule_with_warmup

from ..metadata import ConditioningSpec
from ..model import ConditionedUNet, EMA, ModelConfig, diffusion_loss, save_model_dir
from ..model.unet import unwrap
from ..tracking import RunLogger
from .checkpoint import load_checkpoint, save_checkpoint


def torch_batches(shard, batch_size: int, columns: list[str], epoch_skip: int, device, shuffle_seed: int | None):
    """Tensors for the model's columns; the first `epoch_skip` batches were consumed before a resume."""
    it = shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True, prefetch_batches=2,
                            local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=shuffle_seed)
    for i, b in enumerate(it):
        if i < epoch_skip:
            continue
        x = torch.from_numpy(np.ascontiguousarray(b["image"])).to(device, non_blocking=True)
        yield x, {c: torch.from_numpy(b[c]).to(device) for c in columns}


def mean_loss(losses: list[torch.Tensor]) -> float:
    return torch.stack(losses).float().mean().item() if losses else float("nan")


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(unwrap(model).state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def log_sample_grid(logger: RunLogger, ema: EMA, model_cfg: ModelConfig, spec: ConditioningSpec,
                    pairs: list, step: int) -> None:
    """A (type x site) grid sampled from the EMA weights on the training device, as an MLflow artifact."""
    from ..visual import model_sample_grid, png_bytes

    m = ConditionedUNet(model_cfg, spec)
    m.load_state_dict({k: v.cpu() for k, v in ema.averaged_state_dict(m).items()})
    m = m.to(next(iter(ema.shadow.values())).device)
    grid = model_sample_grid(m.eval(), spec, [tuple(p) for p in pairs])
    logger.artifact_bytes(png_bytes(grid), f"samples_step{step:07d}.png", "samples")


def train_worker(cfg: dict) -> None:
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run, optim = cfg["run"], cfg["optim"]
    if run.get("threads_per_worker"):
        torch.set_num_threads(run["threads_per_worker"])
    deterministic = cfg["data"].get("deterministic", True)
    # fixed input shapes: let cuDNN pick the fastest convolutions, unless the run must be reproducible
    # (autotuning picks by timing, and some of its kernels sum in a varying order)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    accelerator = Accelerator(mixed_precision=run["mixed_precision"], cpu=not run["use_gpu"],
                              gradient_accumulation_steps=optim["grad_accum"])
    set_seed(cfg["seed"])  # identical initial weights on every rank
    model_cfg = ModelConfig.from_dict(cfg["model_config"])
    spec = ConditioningSpec.from_dict(cfg["spec"])
    model = ConditionedUNet(model_cfg, spec)
    if run["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, optim["ema_decay"])
    opt = torch.optim.AdamW(model.parameters(), lr=optim["lr"], betas=tuple(optim["betas"]),
                            weight_decay=optim["weight_decay"], fused=optim["fused"] and run["use_gpu"])
    sched = get_cosine_schedule_with_warmup(opt, max(1, int(optim["warmup_fraction"] * cfg["steps"])), cfg["steps"])
    # Per-rank noise and t draws, on the training device (CPU-drawn noise would stall a GPU step).
    gen = torch.Generator(accelerator.device).manual_seed(cfg["seed"] * 1000 + rank)
    step, epoch, batches_in_epoch = 0, 0, 0

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            m_state, e_state, t_state, info = load_checkpoint(Path(d))
        model.load_state_dict(m_state)
        ema.load_state_dict({**t_state["ema_meta"], "shadow": e_state})
        opt.load_state_dict(t_state["optimizer"])
        sched.load_state_dict(t_state["scheduler"])
        try:
            gen.set_state(t_state["generators"][rank % len(t_state["generators"])])
        except RuntimeError:  # checkpoint from another device type (CPU <-> GPU): keep the fresh seed
            pass
        step, epoch, batches_in_epoch = info["step"], info["epoch"], info["batches_in_epoch"]

    model, opt, sched = accelerator.prepare(model, opt, sched)
    if run["compile"]:
        model = torch.compile(model)
    ema.shadow = {k: v.to(accelerator.device) for k, v in ema.shadow.items()}
    logger = RunLogger(cfg["tracking_uri"], cfg["mlflow_run_id"]) if rank == 0 else None
    if logger and ckpt is not None:
        logger.metrics({"resumed_from_step": step}, step)  # every restart is visible in MLflow
    columns = unwrap(model).condition_columns
    shard = ray.train.get_dataset_shard("train")
    stop_at = min(cfg["steps"], run["stop_after"] or cfg["steps"])
    t_log, wait, imgs, losses = time.perf_counter(), 0.0, 0, []

    def checkpoint(final: bool) -> None:
        """All ranks report together; rank 0 attaches the checkpoint (and, at the end, the model dir)."""
        gens = [gen.get_state()] * world  # CPU byte tensors: gathered as objects (NCCL takes GPU tensors only)
        if world > 1:
            torch.distributed.all_gather_object(gens, gen.get_state())
        digest = weights_digest(model)
        mine = (digest, ray.get_runtime_context().get_node_id())
        gathered = [mine] * world
        if world > 1:
            torch.distributed.all_gather_object(gathered, mine)
        digests, nodes = [g[0] for g in gathered], {g[1] for g in gathered}
        metrics = {"step": step, "epoch": epoch, "loss": mean_loss(losses[-50:]),
                   "ranks_in_sync": float(len(set(digests)) == 1), "weights_sha256": digest,
                   "worker_nodes": len(nodes), "final": final,
                   "samples_seen": step * optim["batch_size"] * optim["grad_accum"] * world}
        with tempfile.TemporaryDirectory() as d:
            ck = None
            if rank == 0:
                base = unwrap(model)
                save_checkpoint(Path(d), base.state_dict(), ema.shadow,
                                {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "generators": gens,
                                 "ema_meta": {"decay": ema.decay, "warmup": ema.warmup, "step": ema.step}},
                                {"step": step, "epoch": epoch, "batches_in_epoch": batches_in_epoch})
                if final:
                    save_model_dir(Path(d) / "model", base, ema, config=model_cfg, spec=spec,
                                   extra_info={"name": cfg["run"]["name"], "steps": step, "dataset": cfg["dataset"],
                                               "train_pairs": cfg["pairs"], "mlflow_run_id": cfg["mlflow_run_id"]})
                ck = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ck)
        if logger and final:
            logger.metrics({"ranks_in_sync": metrics["ranks_in_sync"]}, step)
            log_sample_grid(logger, ema, model_cfg, spec, cfg["pairs"], step)

    while step < stop_at:
        t_wait = time.perf_counter()
        # seeded per (seed, rank, epoch): a resumed epoch replays the same shuffle
        shuffle_seed = int(np.random.SeedSequence([cfg["seed"], rank, epoch]).generate_state(1)[0]) if deterministic else None
        for x, cond in torch_batches(shard, optim["batch_size"], columns, batches_in_epoch, accelerator.device,
                                     shuffle_seed):
            wait += time.perf_counter() - t_wait
            if run["channels_last"]:
                x = x.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss = diffusion_loss(model, x, cond, gen)
                accelerator.backward(loss)
                if accelerator.sync_gradients and optim["grad_clip"] > 0:
                    accelerator.clip_grad_norm_(model.parameters(), optim["grad_clip"])
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            batches_in_epoch += 1
            imgs += x.shape[0]
            losses.append(loss.detach())  # read at log time: a per-step .item() would sync the GPU
            del losses[:-max(50, run["log_every"])]
            if accelerator.sync_gradients:
                ema.update(model)
                step += 1
                if logger and step % run["log_every"] == 0:
                    now = time.perf_counter()
                    dt, window_imgs, window_wait = now - t_log, imgs, wait
                    t_log, wait, imgs = now, 0.0, 0  # the logging below counts in the next window
                    logger.metrics({"loss": mean_loss(losses[-run["log_every"]:]), "lr": sched.get_last_lr()[0],
                                    "img_per_s": window_imgs * world / dt, "data_wait_fraction": window_wait / dt}, step)
                if logger and run["sample_every"] and step % run["sample_every"] == 0 and step < cfg["steps"]:
                    log_sample_grid(logger, ema, model_cfg, spec, cfg["pairs"], step)
                if step % run["checkpoint_every"] == 0 and step < stop_at:
                    checkpoint(final=False)
                if step >= stop_at:
                    break
            t_wait = time.perf_counter()
        else:  # shard exhausted: next epoch
            epoch, batches_in_epoch = epoch + 1, 0
    checkpoint(final=step >= cfg["steps"])
    if logger:
        logger.flush()  # metrics queued during a tracking outage: delivered (or spilled) before the worker ends
