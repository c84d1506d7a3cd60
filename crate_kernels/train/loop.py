"""The training loop: the same code on one CPU, one GPU, or many under torchrun (DDP or FSDP2)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import resource
import time
from pathlib import Path
from typing import Any

import torch

import crate_kernels
from crate_kernels import files
from crate_kernels.measure import has_crate_layers, layerwise
from crate_kernels.models.registry import model_config
from crate_kernels.plots import format_scores, format_table, format_trend, plot_run
from crate_kernels.train import baselines, checkpoint, distributed, run_folder, streams
from crate_kernels.train.config import ConfigError, TrainConfig
from crate_kernels.train.data import ImageSet, TextSet, load_dataset
from crate_kernels.train.distributed import Context
from crate_kernels.train.faults import RunError, RunInterruptedError, StopSignals
from crate_kernels.train.loader import TrainBatches, UnreadableFiles, check_batch_size, eval_batches
from crate_kernels.train.optim import build_optimizer, build_scheduler
from crate_kernels.train.tasks import TASK_CLASSES, Task, model_for_run


class Metrics:
    """``DIR/metrics.jsonl`` (one JSON object per record) and TensorBoard when importable; rank 0 only."""

    def __init__(self, run_dir: Path, ctx: Context, resume_step: int, tensorboard: bool):
        self.path, self.enabled, self.writer = run_dir / "metrics.jsonl", ctx.is_main, None
        if not self.enabled:
            return
        # A resumed run drops what was logged after its checkpoint, so each step appears once.
        kept = [r for r in self.records() if r.get("step", 0) <= resume_step]
        files.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def records(self) -> list[dict[str, Any]]:
        return files.read_jsonl(self.path)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        files.append_line(self.path, json.dumps(record))
        if self.writer:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak bytes held by tensors; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def evaluate(
    task: Task, model: torch.nn.Module, val, cfg: TrainConfig, ctx: Context, autocast, train
) -> dict[str, float]:
    """Held-out metrics over the whole split (each rank a share, summed across ranks); ``train`` is the training split
    (DINO's k-NN monitor compares with it)."""
    model.eval()
    with autocast():
        task.begin_eval(model, train, ctx)
    sums = torch.zeros(1 + len(task.eval_names), dtype=torch.float64)
    micro = cfg.optim.batch_size // (ctx.world_size * cfg.optim.grad_accum)
    for batch, weight in eval_batches(val, micro, ctx.world, cfg, pin=ctx.device.type == "cuda"):
        with autocast():
            sums += weight * task.eval_sums(model, batch.to(ctx.device, non_blocking=True))
    model.train()
    return task.metrics(distributed.all_reduce(sums.to(ctx.device), ctx).cpu())


def train(cfg: TrainConfig) -> dict[str, float]:
    """Run (or resume, from the last checkpoint in ``cfg.out``) the training ``cfg`` describes.

    Returns the final held-out metrics (``eval_loss``, ``eval_accuracy``, ...). Raises ``ConfigError`` before any
    training step (and before anything is written) when the configuration cannot work, and ``RunError`` when a fault
    stops the run: SIGINT or SIGTERM (after saving a checkpoint at the current step), a full disk (the earlier
    checkpoints intact), checkpoints none of which can be read.
    """
    try:
        cfg = cfg.resolved()
        ctx = distributed.setup(cfg.parallel, cfg.device)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from err
    rival = _rival(cfg, ctx)
    threads = torch.get_num_threads()
    if ctx.device.type == "cpu" and cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    try:
        # Under torchrun the launcher forwards the signal it got: a second one must not stop a rank mid-save.
        with StopSignals(repeat_stops_at_once=ctx.parallel == "none") as stop:
            if rival is not None:
                print(f"== the baseline {rival.model.name}, the same recipe and budget, in {rival.out}", flush=True)
                _train(rival, ctx, stop)
                print(f"== {cfg.model.name}", flush=True)
            return _train(cfg, ctx, stop)
    except BaseException as err:
        full = files.disk_full(err)
        if full is None:
            raise
        last = checkpoint.checkpoints(cfg.out)
        kept = f"from {last[-1].name}, which is intact" if last else "from the start (no checkpoint yet)"
        raise RunError(
            f"disk full: could not write {full.filename or cfg.out}; free space, then run the same command to "
            f"resume {kept}"
        ) from err
    finally:
        torch.set_num_threads(threads)
        distributed.teardown(ctx)


def _rival(cfg: TrainConfig, ctx: Context) -> TrainConfig | None:
    """``--task.compare``'s run: the other model with this run's recipe, seed and model arguments (patch size, width),
    in its own folder inside this one (so it resumes like any run); its report stays short (``task.compare`` = "-")."""
    if not cfg.task.compare or cfg.task.compare == RIVAL:
        return None
    if cfg.task.name != "classify" or ctx.parallel != "none":
        raise ConfigError("--task.compare needs --task classify in one process")
    try:
        model_config(cfg.task.compare)
    except ValueError as err:
        raise ConfigError(f"--task.compare: {err}") from err
    return dataclasses.replace(
        cfg,
        out=str(Path(cfg.out) / "compare" / cfg.task.compare),
        export=False,
        model=dataclasses.replace(cfg.model, name=cfg.task.compare),
        task=dataclasses.replace(cfg.task, compare=RIVAL),
    )


RIVAL = "-"  # the task.compare of a comparison run itself


def _train(cfg: TrainConfig, ctx: Context, stop: StopSignals) -> dict[str, float]:
    run_dir = Path(cfg.out)
    micro_batch, remainder = divmod(cfg.optim.batch_size, ctx.world_size * cfg.optim.grad_accum)
    try:
        task = TASK_CLASSES[cfg.task.name](cfg)
        if remainder or micro_batch == 0:
            raise ValueError(
                f"--optim.batch_size {cfg.optim.batch_size} must be a multiple of world size {ctx.world_size} × "
                f"--optim.grad_accum {cfg.optim.grad_accum}"
            )
        if (cfg.task.mixup or cfg.task.cutmix) and micro_batch % 2:
            raise ValueError(
                f"--task.mixup and --task.cutmix mix pairs of samples: the micro-batch ({micro_batch}) must be even"
            )
        crate_kernels.set_backend(cfg.model.backend)
        train_set, val_set = load_dataset(cfg.data, task.text)
        torch.manual_seed(streams.seed("init", cfg.seed))  # the same initial weights on every rank (FSDP2 shards them)
        model, model_args = model_for_run(cfg, task, train_set)
        torch.manual_seed(streams.seed("dropout", cfg.seed, ctx.rank))  # then each rank its own dropout masks
        # The saved config names every constructor argument, data-derived ones included, so that the run folder
        # alone rebuilds the model (crate-measure reads it).
        args = ",".join(f"{k}={v!r}" for k, v in model_args.items())
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, args=args))
        if task.text:
            train_set.block_size = val_set.block_size = model.block_size
        check_batch_size(len(train_set), cfg.optim.batch_size)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from err

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        cfg.precision, torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    )
    autocast = lambda: torch.autocast(ctx.device.type, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731
    # The initial weights follow from the seed alone, so a resumed run measures the same initialisation.
    init_rows = _layer_rows(model.to(ctx.device), val_set, ctx, autocast)
    model = distributed.wrap(model, ctx)
    base = getattr(model, "module", model)  # under DDP, the model itself (for names and attributes)
    optimizer = build_optimizer(base, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    forward = torch.compile(model) if cfg.model.compile else model
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=dtype == torch.float16)

    # Nothing is written before the folder's record agrees with this config and a checkpoint has been read back.
    changed = run_folder.changes(cfg, run_dir) if checkpoint.checkpoints(run_dir) else {}
    data = TrainBatches(train_set, cfg, ctx.world, pin=ctx.device.type == "cuda")
    unreadable = UnreadableFiles(train_set, val_set)
    try:
        step, resumed = checkpoint.resume(run_dir, model, optimizer, scheduler, ctx, scaler, data)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if ctx.is_main:
        if changed is None:
            print(f"warning: {run_dir / run_folder.CONFIG} is missing or unreadable: this config becomes the record")
        if resumed:
            print(f"resuming from {resumed} (step {step} of {cfg.steps}; this run stops at {cfg.last_step})")
        files.remove_leftovers(run_dir)
        files.remove_leftovers(run_dir / "checkpoints")
        run_folder.record(cfg, run_dir, step, changed)
    metrics = Metrics(run_dir, ctx, step, cfg.tensorboard)
    seq_len = train_set.block_size if isinstance(train_set, TextSet) else 0

    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.last_step, initial=step, disable=not (ctx.is_main and cfg.progress), desc="train", mininterval=1
    )
    tick, last_logged, evaluated = time.perf_counter(), step, None
    start, first_step = tick, step
    while step < cfg.last_step:
        # Every rank stops at the same step when any got SIGINT/SIGTERM (the checkpoint is collective).
        signum = int(distributed.all_reduce(torch.tensor([stop.signum], device=ctx.device), ctx, op="max"))
        if signum:
            bar.close()
            saved = checkpoint.step_dir(run_dir, step)
            if not saved.is_dir():
                checkpoint.save(run_dir, step, model, optimizer, scheduler, ctx, cfg.keep_last, scaler, data)
            raise RunInterruptedError(
                f"interrupted at step {step}; saved {saved}; run the same command to resume", signum
            )
        micro = next(data)  # this rank's micro-batches of the step's global batch
        lr = scheduler.get_last_lr()[0]
        step_loss = torch.zeros((), device=ctx.device)
        task.begin_step(forward, micro, lambda t: distributed.all_reduce(t.to(ctx.device), ctx).cpu())
        for k, batch in enumerate(micro):
            with distributed.sync_gradients(model, ctx, sync=k == len(micro) - 1):
                with autocast():
                    loss = task.loss(forward, batch.to(ctx.device, non_blocking=True)) / len(micro)
                scaler.scale(loss).backward()
            step_loss += loss.detach().float()
        if cfg.optim.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        task.before_update(base, optimizer, step)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        task.end_step(base, step, lambda t: distributed.all_reduce(t.to(ctx.device), ctx).cpu())
        train_loss = float(distributed.all_reduce(step_loss, ctx, op="mean"))
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", refresh=False)

        if step % cfg.log_every == 0 or step == cfg.last_step:
            elapsed = time.perf_counter() - tick
            samples = (step - last_logged) * cfg.optim.batch_size
            record = {"step": step, "train_loss": train_loss, "lr": lr, "samples_per_s": samples / elapsed}
            if seq_len:
                record["tokens_per_s"] = samples * seq_len / elapsed
            metrics.log(record | {"peak_mem_mb": peak_memory_mb(ctx.device)} | unreadable.record(ctx, bar.write))
        if step % cfg.eval_every == 0 or step == cfg.last_step:
            evaluated = evaluate(task, forward, val_set, cfg, ctx, autocast, train_set)
            metrics.log({"step": step} | evaluated | unreadable.record(ctx, bar.write))
            if ctx.is_main:
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in evaluated.items()))
        if step % cfg.ckpt_every == 0 or step == cfg.last_step:
            checkpoint.save(run_dir, step, model, optimizer, scheduler, ctx, cfg.keep_last, scaler, data)
        if step % cfg.log_every == 0 or step % cfg.eval_every == 0:
            tick, last_logged = time.perf_counter(), step  # throughput leaves evaluation and checkpoints out
    bar.close()
    data.close()
    trained = {"steps": step - first_step, "seconds": time.perf_counter() - start}

    if evaluated is None:  # nothing left to train: report on the finished run
        evaluated = evaluate(task, forward, val_set, cfg, ctx, autocast, train_set)
    _report(task, base, (train_set, val_set), evaluated, trained, (metrics, run_dir, ctx, autocast), init_rows)
    if cfg.export:
        checkpoint.export_safetensors(model, run_dir / "model.safetensors", ctx)
    metrics.close()
    return evaluated


def _layer_rows(model, val_set, ctx: Context, autocast) -> list[dict[str, float]]:
    """``layerwise`` on the report's batch: the first 256 held-out samples, the same draws on every rank."""
    if not has_crate_layers(model):  # the ViT baseline: nothing to measure
        return []
    x = val_set.batch(torch.arange(min(256, len(val_set)))).inputs
    with autocast(), streams.fork("report", device=ctx.device):  # the MAE's random masks
        return layerwise(model, x.to(ctx.device))


def _report(task, model, sets, evaluated, trained, where, init_rows) -> None:
    """Final artefacts: the task's (picture, sample), the per-layer table beside the initialisation's, the plot, and
    for an in-memory classification set the classical baselines on the same split; printed on rank 0.

    ``model`` is the model itself (inside DDP); under FSDP2 every rank runs these forwards together. ``sets`` is
    (train, held-out); ``trained`` the steps and seconds this process trained; ``where`` (metrics, run folder,
    context, autocast).
    """
    (train_set, val_set), (metrics, run_dir, ctx, autocast) = sets, where
    model.eval()
    lines = [f"held-out {k.removeprefix('eval_')}: {v:.4f}" for k, v in evaluated.items() if k != "eval_accuracy"]
    if "eval_accuracy" in evaluated:
        lines.append(f"held-out accuracy: {100 * evaluated['eval_accuracy']:.2f}% ({len(val_set)} samples)")
    lines.append(f"trained {trained['steps']} steps in {trained['seconds']:.1f} s")
    with autocast():
        lines += task.finish(model, val_set, run_dir, ctx.is_main)
    rows = _layer_rows(model, val_set, ctx, autocast)
    if rows:  # none for a model without CRATE layers (the ViT baseline)
        lines += [format_table(rows), format_trend(init_rows, rows)]
    if not ctx.is_main:
        return
    name = getattr(model, "config", {}).get("name", "final")
    plot_run(metrics.records(), rows, run_dir / "metrics.png", label=f"{name}, trained", init_rows=init_rows)
    lines.append(f"metrics: {run_dir / 'metrics.jsonl'}, plot: {run_dir / 'metrics.png'}")
    if "eval_accuracy" in evaluated and isinstance(train_set, ImageSet):
        scores = [{"model": f"{name} (this run)", "accuracy": evaluated["eval_accuracy"], "fit_s": trained["seconds"]}]
        if task.cfg.task.compare != RIVAL:
            scores += baselines.rival_scores(run_dir)
            if baselines.fits_quickly(train_set):
                scores += baselines.score_baselines(train_set, val_set)
        baselines.write_scores(scores, run_dir)
        if len(scores) > 1:
            lines += [f"the same split, baselines ({run_dir / 'baselines.json'}):", format_scores(scores)]
    print("\n".join(lines), flush=True)
