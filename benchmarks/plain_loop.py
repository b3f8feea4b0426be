"""The baseline: a hand-written PyTorch training loop for the default job (no Accelerate, no engine).

    .venv/bin/python benchmarks/plain_loop.py                      # 1 process, all cores
    .venv/bin/accelerate launch --config_file accelerate_configs/cpu_ddp.yaml benchmarks/plain_loop.py
                                                                   # 2 processes, DDP written by hand (gloo)

Same model (small_cnn), optimizer (timm sgd = Nesterov momentum), scheduler
(timm cosine, stepped every step), batch (128 per process), data (Fashion-MNIST
as uint8 tensors in memory) and epochs as the recipe's default job. Per epoch
it prints a line in the recipe's format ("epoch k/N  train_loss ..  test_acc ..")
so benchmarks/time_to_accuracy.py reads both the same way. ``PlainLoop`` is
also what benchmarks/overhead.py runs beside the recipe's loop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.scheduler import create_scheduler_v2  # noqa: E402

from shared.data import STATS, load_fashion_mnist  # noqa: E402
from shared.models import create_model  # noqa: E402


class PlainLoop:
    """index -> normalise -> forward -> loss -> backward -> step, ``steps`` at a time."""

    def __init__(self, images, labels, mean, std, *, model="small_cnn", num_classes=10, batch_size=128, epochs=3,
                 lr=0.05, momentum=0.9, weight_decay=5e-4, opt="sgd", sched="cosine", seed=42, rank=0, world=1,
                 device=torch.device("cpu")):
        self.images, self.labels, self.device = images, labels, device
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255
        self.batch_size, self.rank, self.world = batch_size, rank, world
        torch.manual_seed(seed)
        net = create_model(model, num_classes, images.shape[1]).to(device)
        self.optimizer = create_optimizer_v2(net, opt=opt, lr=lr, weight_decay=weight_decay, momentum=momentum)
        self.steps_per_epoch = len(labels) // (batch_size * world)
        self.scheduler, _ = create_scheduler_v2(self.optimizer, sched=sched, num_epochs=epochs, step_on_epochs=False,
                                                updates_per_epoch=self.steps_per_epoch)
        self.net = net
        self.model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
        self.seed, self.epoch, self.i, self.step, self.perm = seed, 0, 0, 0, None
        self.loss_sum = torch.zeros((), device=device)

    def run(self, steps: int) -> int:
        """Train ``steps`` steps (continuing across epochs); return the images this rank trained on."""
        bs, world, rank = self.batch_size, self.world, self.rank
        self.model.train()
        for _ in range(steps):
            if self.perm is None or self.i == self.steps_per_epoch:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                self.perm = torch.randperm(len(self.labels), generator=g)
                self.epoch, self.i, self.loss_sum = self.epoch + 1, 0, torch.zeros((), device=self.device)
            start = (self.i * world + rank) * bs
            idx = self.perm[start:start + bs]
            x = (self.images[idx].to(self.device).float() - self.mean) / self.std
            y = self.labels[idx].to(self.device)
            loss = F.cross_entropy(self.model(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.loss_sum += loss.detach()
            self.i, self.step = self.i + 1, self.step + 1
            self.scheduler.step_update(num_updates=self.step)
        return steps * bs

    @torch.no_grad()
    def accuracy(self, images, labels, batch_size: int = 512) -> float:
        """Test accuracy; each rank scores its shard, summed over ranks."""
        self.model.eval()
        shard = torch.tensor_split(torch.arange(len(labels)), self.world)[self.rank]
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(0, len(shard), batch_size):
            idx = shard[i:i + batch_size]
            x = (images[idx].to(self.device).float() - self.mean) / self.std
            correct += (self.net(x).argmax(1) == labels[idx].to(self.device)).sum()
        if self.world > 1:
            torch.distributed.all_reduce(correct)
        return float(correct) / len(labels)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--train-subset", type=int, default=None, help="first N training samples only (quick runs)")
    p.add_argument("--test-subset", type=int, default=None, help="first N test samples only")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX files (default: Debian's copy)")
    p.add_argument("--output-dir", default=None, help="write metrics.jsonl here (optional)")
    args = p.parse_args(argv)
    wall_start = time.perf_counter()

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))  # cores / processes, as the recipe
    if world > 1:
        torch.distributed.init_process_group("gloo")
    xtr, ytr, xte, yte = load_fashion_mnist(args.data_dir)
    if args.train_subset:
        xtr, ytr = xtr[:args.train_subset], ytr[:args.train_subset]
    if args.test_subset:
        xte, yte = xte[:args.test_subset], yte[:args.test_subset]
    mean, std = STATS["fashion-mnist"]
    loop = PlainLoop(xtr, ytr, mean, std, batch_size=args.batch_size, epochs=args.epochs, lr=args.lr, rank=rank,
                     world=world)
    records = []
    for epoch in range(args.epochs):
        start = time.perf_counter()
        images = loop.run(loop.steps_per_epoch)
        seconds = time.perf_counter() - start
        train_loss = float(loop.loss_sum) / loop.steps_per_epoch
        acc = loop.accuracy(xte, yte)
        record = {"epoch": epoch + 1, "train_loss": train_loss, "test_acc": acc,
                  "images_per_sec": images * world / seconds, "train_seconds": seconds,  # this epoch's loop
                  "wall_seconds": time.perf_counter() - wall_start}
        records.append(record)
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs}  train_loss {train_loss:.4f}  test_acc {acc:.4f}  "
                  f"{record['images_per_sec']:,.0f} img/s  {seconds:.1f}s", flush=True)
            if args.output_dir:
                Path(args.output_dir).mkdir(parents=True, exist_ok=True)
                with open(Path(args.output_dir) / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
    if world > 1:
        torch.distributed.destroy_process_group()
    return records[-1] if records else {}


if __name__ == "__main__":
    main()
