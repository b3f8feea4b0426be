"""Image classification: any timm model on Fashion-MNIST, CIFAR-10, an ImageFolder or synthetic data.

    accelerate launch --config_file accelerate_configs/cpu_ddp.yaml recipes/image_classification.py
    accelerate launch --config_file accelerate_configs/zero2.yaml recipes/image_classification.py \\
        -c recipes/configs/imagenet_resnet50.yaml --data-dir /data/imagenet

Where and how it runs (processes, GPUs, precision, ZeRO) comes only from the
accelerate config; what it trains comes from the recipe YAML and the command
line. Run with --help for every option.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `shared` from a plain clone

import torch  # noqa: E402
from accelerate.utils import gather_object, set_seed  # noqa: E402
from timm.data import Mixup  # noqa: E402
from timm.loss import SoftTargetCrossEntropy  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.scheduler import create_scheduler_v2  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from shared import checkpoint, doctor, engine, tracking  # noqa: E402
from shared.config import ConfigError, option, parse_config, save_yaml, to_dict  # noqa: E402
from shared.data import DATASETS, build_data, class_weights  # noqa: E402
from shared.models import create_model  # noqa: E402

# Written to output_dir when the run checkpointed and stopped before its end (signal or
# --stop-after-steps); removed when it completes. A requeue script resubmits while it exists.
STOPPED = "stopped.json"
from shared.runtime import StopSignal, create_accelerator, fill_deepspeed_auto, zero_stage  # noqa: E402


@dataclass
class Config:
    # data
    dataset: str = option("fashion-mnist", "data set", "data", choices=DATASETS)
    data_dir: str | None = option(None, "data folder (fashion-mnist: IDX files, else Debian's copy is used; "
                                     "cifar10: torchvision layout; imagefolder: train/ and val/)", "data")
    num_classes: int | None = option(None, "classes (default: from the labels)", "data")
    image_size: int | None = option(None, "resize batches to this size (default: native size; 224 for imagefolder)", "data")
    augment: str = option("none", "training augmentation, applied to whole batches on the device", "data",
                       choices=("none", "flip", "crop-flip"))
    imbalance: float = option(1.0, "keep ratio**(c/(C-1)) of class c's training samples (1 = balanced, 0.1 = long tail)", "data")
    class_weights: str = option("none", "loss weights: none, balanced (inverse frequency of the training labels) "
                                     "or a file of one weight per class", "data")
    train_subset: int | None = option(None, "train on this many samples only (quick runs)", "data")
    test_subset: int | None = option(None, "evaluate on the first N test samples only", "data")
    synthetic_shape: list[int] = option([1, 28], "synthetic data: channels size", "data")
    synthetic_train_size: int = option(4096, "synthetic data: training samples", "data")
    synthetic_test_size: int = option(1024, "synthetic data: test samples", "data")
    num_workers: int = option(4, "DataLoader workers per process (imagefolder only)", "data")
    # model
    model: str = option("small_cnn", "timm model name (resnet50, vgg16, vit_small_patch16_224, ...) or small_cnn", "model")
    pretrained: bool = option(False, "start from timm's pretrained weights (needs internet or a local HF cache)", "model")
    drop_rate: float = option(0.0, "dropout before the classifier", "model")
    # optimisation
    epochs: int = option(3, "training epochs", "optimisation")
    batch_size: int = option(128, "micro batch per process; global batch = batch_size x processes x grad_accum_steps", "optimisation")
    eval_batch_size: int | None = option(512, "evaluation batch per process", "optimisation")
    grad_accum_steps: int = option(1, "micro batches per optimizer step (the DeepSpeed JSON keeps 'auto')", "optimisation")
    opt: str = option("sgd", "timm optimizer name (sgd is Nesterov momentum, adamw, lamb, ...)", "optimisation")
    lr: float = option(0.05, "peak learning rate", "optimisation")
    momentum: float = option(0.9, "momentum (sgd)", "optimisation")
    weight_decay: float = option(5e-4, "weight decay", "optimisation")
    sched: str = option("cosine", "timm scheduler, stepped every optimizer step (cosine, step, poly, ...)", "optimisation")
    warmup_epochs: int = option(0, "linear warm-up epochs", "optimisation")
    min_lr: float = option(0.0, "final learning rate", "optimisation")
    label_smoothing: float = option(0.0, "label smoothing", "optimisation")
    mixup: float = option(0.0, "mixup alpha (0 = off)", "optimisation")
    cutmix: float = option(0.0, "cutmix alpha (0 = off)", "optimisation")
    clip_grad: float = option(0.0, "clip the gradient norm to this value (0 = off); also fills DeepSpeed's 'auto'", "optimisation")
    seed: int = option(42, "random seed: data order, initialisation, augmentation", "optimisation")
    # run
    output_dir: str = option("runs/image_classification", "run folder: checkpoints, config.yaml, model.safetensors, summary.json", "run")
    resume: str = option("auto", "auto (latest checkpoint in output_dir, if any), none, or a checkpoint folder", "run")
    checkpoint_every_steps: int = option(0, "also checkpoint every N optimizer steps (0 = at epoch ends only)", "run")
    keep_checkpoints: int = option(2, "checkpoints kept on disk (older ones are deleted)", "run")
    stop_after_steps: int = option(0, "checkpoint and stop after N optimizer steps, as a preemption would (0 = off)", "run")
    tracker: str = option("wandb", "experiment tracker; W&B runs offline without credentials", "run", choices=("wandb", "none"))
    project: str = option("vision-recipes", "W&B project", "run")
    run_name: str | None = option(None, "W&B run name (default: the output folder's name)", "run")
    trace_samples: bool = option(False, "write the data set indices each rank trains on to output_dir/trace/rank<k>.txt", "run")
    log_every: int = option(20, "optimizer steps between progress-bar updates and NaN checks", "run")
    loss_scale_warning: float = option(1.0, "fp16: warn when the loss scale falls below this", "run")

    def __post_init__(self):
        positive = ("epochs", "batch_size", "grad_accum_steps", "log_every", "synthetic_train_size", "synthetic_test_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.imbalance <= 1:
            raise ConfigError(f"imbalance must be in (0, 1], got {self.imbalance}")
        if len(self.synthetic_shape) != 2:
            raise ConfigError(f"synthetic_shape is 'channels size', got {self.synthetic_shape}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size must be at least 1 (or null for batch_size), got {self.eval_batch_size}")
        if self.class_weights != "none" and (self.mixup or self.cutmix):
            raise ConfigError("class_weights cannot be combined with mixup/cutmix (soft targets have no class weights)")


def main(cfg: Config) -> dict:
    wall_start = time.perf_counter()
    doctor.check_launch(cfg)  # fp16 without a GPU, DeepSpeed JSON vs recipe: before any heavy work
    run_dir = Path(cfg.output_dir)
    if cfg.resume == "none" and checkpoint.list_checkpoints(run_dir):
        raise ConfigError(f"--resume none, but {run_dir} holds checkpoints of an earlier run: use --resume auto "
                          "to continue it, or another --output-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = create_accelerator(cfg.grad_accum_steps, cfg.tracker, str(run_dir))
    doctor.check_processes(accelerator)  # every rank sees the world the launcher started
    stop = StopSignal(accelerator)  # SIGUSR1/SIGTERM from now on: checkpoint at the next step and stop
    set_seed(cfg.seed, device_specific=True)

    data = build_data(cfg, accelerator.process_index, accelerator.num_processes, accelerator.device)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = create_model(cfg.model, data.num_classes, data.in_chans, cfg.pretrained, cfg.drop_rate)
    set_seed(cfg.seed, device_specific=True)
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    updates_per_epoch = len(data.train) // cfg.grad_accum_steps
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, min_lr=cfg.min_lr,
        step_on_epochs=False, updates_per_epoch=updates_per_epoch,
    )
    weights = class_weights(cfg.class_weights, data.train_labels, data.num_classes)
    mixup = None
    if cfg.mixup or cfg.cutmix:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                      num_classes=data.num_classes)
        criterion = SoftTargetCrossEntropy()
    else:
        criterion = torch.nn.CrossEntropyLoss(
            weight=None if weights is None else weights.to(accelerator.device), label_smoothing=cfg.label_smoothing)

    fill_deepspeed_auto(accelerator, cfg.batch_size, cfg.clip_grad)
    model, optimizer = accelerator.prepare(model, optimizer)
    engine.cast_buffers_to_input_dtype(accelerator, model)

    progress = engine.Progress()
    resume_from = checkpoint.resolve_resume(cfg.resume, run_dir)
    if resume_from:
        checkpoint.load_checkpoint(accelerator, resume_from, progress)
        accelerator.print(f"resumed from {resume_from} (epoch {progress.epoch + 1}, step {progress.global_step})")
    run_info = dict(world_size=accelerator.num_processes, distributed_type=str(accelerator.distributed_type.value),
                    mixed_precision=accelerator.mixed_precision, zero_stage=zero_stage(accelerator))
    if accelerator.is_main_process:
        save_yaml(cfg, run_dir / "config.yaml")
    tracking.start_tracking(accelerator, cfg, run_dir, {**to_dict(cfg), **run_info})
    trace = None
    if cfg.trace_samples:
        (run_dir / "trace").mkdir(exist_ok=True)
        trace = open(run_dir / "trace" / f"rank{accelerator.process_index}.txt", "a", buffering=1)

    accelerator.print(f"{cfg.model}: {sum(p.numel() for p in model.parameters()):,} parameters; {data.num_train:,} "
                      f"training samples on {accelerator.num_processes} process(es), {run_info['distributed_type']}, "
                      f"precision {accelerator.mixed_precision}, ZeRO stage {run_info['zero_stage']}")
    last_ckpt = resume_from
    train_images, train_seconds, metrics, train_loss = 0, 0.0, {}, math.nan
    while progress.epoch < cfg.epochs:
        data.train.sampler.set_epoch(progress.epoch)
        bar = tqdm(total=len(data.train), initial=progress.batch, desc=f"epoch {progress.epoch + 1}/{cfg.epochs}",
                   disable=not accelerator.is_local_main_process, leave=False, mininterval=1.0)
        stats = engine.EpochStats()
        for stats in engine.train_one_epoch(model, data.train, optimizer, scheduler, criterion, accelerator, progress,
                                            mixup=mixup, clip_grad=cfg.clip_grad, check_every=cfg.log_every, stats=stats,
                                            trace=trace):
            bar.n = progress.batch
            if progress.global_step % cfg.log_every == 0 and stats.batches:
                bar.set_postfix(loss=f"{stats.loss:.4f}", refresh=False)
                bar.refresh()
                warn_on_loss_scale(accelerator, model, cfg.loss_scale_warning, progress.global_step)
            stopping = stop.requested() or progress.global_step == cfg.stop_after_steps
            if stopping or (cfg.checkpoint_every_steps and progress.global_step % cfg.checkpoint_every_steps == 0):
                engine.check_finite(stats)
                last_ckpt = checkpoint.save_checkpoint(accelerator, run_dir, progress, cfg.keep_checkpoints)
            if stopping:
                bar.close()
                reason = stop.received or f"--stop-after-steps {cfg.stop_after_steps}"
                if accelerator.is_main_process:  # the marker a requeue script looks for
                    stopped = {"reason": reason, "global_step": progress.global_step, "checkpoint": str(last_ckpt)}
                    (run_dir / STOPPED).write_text(json.dumps({**stopped, **progress.state_dict()}) + "\n")
                accelerator.print(f"stopping on {reason}: checkpoint {last_ckpt} saved at step {progress.global_step}; "
                                  f"run again with --resume auto to continue")
                accelerator.end_training()
                return {"stopped": reason, "global_step": progress.global_step}
        bar.close()
        train_images += stats.images * accelerator.num_processes
        train_seconds += stats.seconds
        train_loss = accelerator.reduce(torch.tensor(stats.loss, device=accelerator.device), "mean").item()
        metrics = engine.evaluate(model, data.test, accelerator, data.num_classes)
        lr = optimizer.param_groups[0]["lr"]
        epoch_ips = stats.images * accelerator.num_processes / max(stats.seconds, 1e-9)
        accelerator.print(f"epoch {progress.epoch + 1}/{cfg.epochs}  train_loss {train_loss:.4f}  "
                          f"test_acc {metrics['test_acc']:.4f}  test_acc5 {metrics['test_acc5']:.4f}  "
                          f"lr {lr:.4g}  {epoch_ips:,.0f} img/s  {stats.seconds:.1f}s")
        record = {"epoch": progress.epoch + 1, "step": progress.global_step, "train_loss": train_loss, "lr": lr,
                  "images_per_sec": epoch_ips, "train_seconds": stats.seconds,
                  "wall_seconds": time.perf_counter() - wall_start, **{k: v for k, v in metrics.items() if k != "test_acc_per_class"}}
        accelerator.log(record, step=progress.global_step)
        if accelerator.is_main_process:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        progress.epoch, progress.batch, progress.samples = progress.epoch + 1, 0, 0
        last_ckpt = checkpoint.save_checkpoint(accelerator, run_dir, progress, cfg.keep_checkpoints)

    if not metrics:  # resumed a run that had already finished
        metrics = engine.evaluate(model, data.test, accelerator, data.num_classes)
    checkpoint.export_model(accelerator, model, run_dir / "model.safetensors", last_ckpt)
    per_rank = gather_object([engine.held_elements(model, optimizer)])
    summary = {
        **metrics, "train_loss": train_loss, "epochs": progress.epoch, "global_step": progress.global_step,
        "global_batch_size": cfg.batch_size * cfg.grad_accum_steps * accelerator.num_processes,
        "images_per_sec": train_images / train_seconds if train_seconds else math.nan,
        **run_info, "held_elements_per_rank": per_rank, "wall_seconds": time.perf_counter() - wall_start,
    }
    if accelerator.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (run_dir / STOPPED).unlink(missing_ok=True)
        accelerator.print(f"done: test_acc {summary['test_acc']:.4f}; wrote {run_dir}/summary.json and model.safetensors")
    accelerator.end_training()
    return summary


def warn_on_loss_scale(accelerator, model, threshold: float, step: int) -> None:
    scale = engine.loss_scale(accelerator, model)
    if scale is not None and scale < threshold:
        accelerator.print(f"WARNING: fp16 loss scale fell to {scale:g} at step {step} (below {threshold:g}): "
                          "gradients keep overflowing; lower the lr or switch to bf16")


if __name__ == "__main__":
    config = parse_config(Config, description=__doc__)
    try:
        main(config)
    except (ConfigError, doctor.PreflightError, FileNotFoundError, engine.NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
