"""Data sets and the rank-aware batch path.

Data sets that fit in memory (Fashion-MNIST, CIFAR-10, synthetic) are held as
uint8 tensors and batched by indexing, with augmentation done on whole batches
on the training device: no per-sample PIL work. ImageFolder (the ImageNet-style
HPC case) goes through a normal DataLoader with workers and timm transforms.

Both paths share :class:`ShardedBatchSampler`, which splits every global batch
of ``batch_size x world_size`` samples across the ranks so that each training
sample is seen exactly once per epoch, every rank runs the same number of
steps (needed by DDP and ZeRO-3 collectives), and the order depends only on
``(seed, epoch)``, so a resumed run replays the same batches.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("fashion-mnist", "cifar10", "imagefolder", "synthetic")
# Per-channel mean/std of the training sets, used to normalise batches.
STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "synthetic": ((0.5,), (0.25,)),
}


class DataError(FileNotFoundError):
    """A data set that cannot be found or read, with what to do about it."""


# --------------------------------------------------------------------------- readers


def read_idx(path: Path) -> torch.Tensor:
    """Read one IDX file (optionally gzipped): the format of MNIST/Fashion-MNIST."""
    try:
        raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read ({err}); the file is damaged, fetch it again") from err
    if len(raw) < 4 or raw[:2] != b"\0\0":
        raise DataError(f"{path}: not an IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(shape):
        raise DataError(f"{path}: truncated IDX file ({data.size} values, header says {shape})")
    return torch.from_numpy(data.copy()).reshape(shape)


def _find_idx(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def load_fashion_mnist(data_dir: str | None) -> tuple[torch.Tensor, ...]:
    """Fashion-MNIST as uint8 [N,1,28,28] images and int64 labels, train and test.

    Looks in ``data_dir``, ``data_dir/FashionMNIST/raw`` (torchvision's layout)
    and Debian's dataset-fashion-mnist package; downloads with torchvision into
    ``data_dir`` as a last resort.
    """
    dirs = [Path(data_dir), Path(data_dir) / "FashionMNIST" / "raw"] if data_dir else []
    dirs.append(DEBIAN_FASHION_MNIST)
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    files = [_find_idx(dirs, s) for s in stems]
    if None in files and data_dir:
        _torchvision_download("FashionMNIST", data_dir)
        files = [_find_idx(dirs, s) for s in stems]
    if None in files:
        looked = ", ".join(str(d) for d in dirs)
        raise DataError(
            f"Fashion-MNIST not found (looked in {looked}). Install it with "
            "'apt-get install dataset-fashion-mnist', or pass --data-dir DIR with the four "
            "*-ubyte[.gz] files, or a writable --data-dir on a machine with internet to download it."
        )
    xtr, ytr, xte, yte = (read_idx(f) for f in files)
    return xtr.unsqueeze(1), ytr.long(), xte.unsqueeze(1), yte.long()


def load_cifar10(data_dir: str | None) -> tuple[torch.Tensor, ...]:
    """CIFAR-10 in torchvision's format, as uint8 [N,3,32,32] tensors."""
    from torchvision.datasets import CIFAR10

    if not data_dir:
        raise DataError("cifar10 needs --data-dir: the folder holding cifar-10-batches-py/ (or where to download it)")
    out = []
    for train in (True, False):
        try:
            ds = CIFAR10(data_dir, train=train, download=False)
        except RuntimeError:
            _torchvision_download("CIFAR10", data_dir)
            ds = CIFAR10(data_dir, train=train, download=False)
        out += [torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)]
    return tuple(out)


def _torchvision_download(name: str, data_dir: str) -> None:
    import torchvision.datasets as tvd

    try:
        for train in (True, False):
            getattr(tvd, name)(data_dir, train=train, download=True)
    except Exception as err:  # no internet, read-only dir, ...
        raise DataError(
            f"{name} is not in {data_dir} and downloading it failed ({type(err).__name__}: {err}). "
            f"Put the files there by hand, or run once on a machine with internet."
        ) from err


def synthetic(num_train: int, num_test: int, num_classes: int, channels: int, size: int, seed: int):
    """Random uint8 images with a class-dependent pattern, so a model can learn them."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.rand(num_classes, channels, size, size, generator=g) * 128

    def make(n):
        y = torch.randint(num_classes, (n,), generator=g)
        x = patterns[y] + torch.rand(n, channels, size, size, generator=g) * 128
        return x.to(torch.uint8), y

    return (*make(num_train), *make(num_test))


# --------------------------------------------------------------------------- class balance


def imbalance_indices(labels: torch.Tensor, ratio: float, seed: int) -> torch.Tensor:
    """Subsample so class c keeps ``ratio ** (c / (C-1))`` of its samples (long tail)."""
    if ratio >= 1.0:
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    num_classes = int(labels.max()) + 1
    keep = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        n = max(1, round(len(idx) * ratio ** (c / max(1, num_classes - 1))))
        keep.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(keep).sort().values


def class_weights(spec: str, labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """``none``, ``balanced`` (N / (C * n_c), as scikit-learn) or a file of C numbers."""
    if spec == "none":
        return None
    if spec == "balanced":
        counts = torch.bincount(labels, minlength=num_classes).float()
        if (counts == 0).any():
            missing = (counts == 0).nonzero().flatten().tolist()
            raise DataError(f"--class-weights balanced: classes {missing} have no training samples")
        return len(labels) / (num_classes * counts)
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"--class-weights: {spec!r} is neither 'none', 'balanced' nor an existing file")
    text = path.read_text()
    values = json.loads(text) if path.suffix == ".json" else [float(v) for v in text.split()]
    if len(values) != num_classes:
        raise DataError(f"--class-weights {spec}: {len(values)} weights for {num_classes} classes")
    return torch.tensor(values, dtype=torch.float32)


# --------------------------------------------------------------------------- sharding


class ShardedBatchSampler:
    """This rank's batches of indices, with the global batch size of each.

    Train mode: a (seed, epoch)-seeded permutation is cut into optimizer-step
    batches of ``batch_size * world * accum`` samples; each is split evenly
    into ``world * accum`` micro-batches, micro-batch ``a * world + rank``
    going to this rank at accumulation step ``a``. So every sample is seen
    once per epoch, every rank runs the same number of micro-batches, and an
    accumulation window never straddles two epochs. A final optimizer batch
    with fewer samples than ``world * accum`` is dropped. Eval mode: contiguous
    shards padded to equal length, with a mask so the padding is never counted.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world: int, *, train: bool, seed: int = 0, accum: int = 1):
        self.n, self.batch_size, self.rank, self.world, self.accum = n, batch_size, rank, world, accum
        self.train, self.seed, self.epoch = train, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank."""
        if self.train:
            parts = self.world * self.accum
            full, rest = divmod(self.n, self.batch_size * parts)
            return (full + (rest >= parts)) * self.accum
        return math.ceil(math.ceil(self.n / self.world) / self.batch_size)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """Yield (indices, valid mask, samples in this optimizer step over all ranks) for this rank."""
        if self.train:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
            step = self.batch_size * self.world * self.accum
            for i in range(len(self) // self.accum):
                chunk = order[i * step:(i + 1) * step]
                parts = torch.tensor_split(chunk, self.world * self.accum)
                for a in range(self.accum):
                    mine = parts[a * self.world + self.rank]
                    yield mine, torch.ones(len(mine), dtype=torch.bool), len(chunk)
        else:
            shard = torch.tensor_split(torch.arange(self.n), self.world)[self.rank]
            length = math.ceil(self.n / self.world)
            valid = torch.arange(length) < len(shard)
            shard = torch.cat([shard, shard[-1:].expand(length - len(shard))]) if len(shard) else torch.zeros(length, dtype=torch.long)
            for i in range(0, length, self.batch_size):
                yield shard[i:i + self.batch_size], valid[i:i + self.batch_size], self.n


# --------------------------------------------------------------------------- batches


@dataclass
class Batch:
    images: torch.Tensor  # float, normalised, on the device
    labels: torch.Tensor
    valid: torch.Tensor  # False for eval padding
    global_size: int  # samples in this optimizer step over all ranks and micro-batches
    indices: torch.Tensor  # data set indices of this rank's samples (CPU)


class TensorLoader:
    """Batches from uint8 tensors held in memory, transformed on the device."""

    def __init__(self, images, labels, sampler: ShardedBatchSampler, mean, std, device, augment: str = "none", image_size: int | None = None):
        self.images, self.labels, self.sampler = images, labels, sampler
        self.device, self.augment, self.image_size = device, augment, image_size
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        if device.type == "cuda":  # indexing a pinned set makes a pageable copy: keep small sets on the GPU
            self.images, self.labels = self.images.to(device), self.labels.to(device)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[Batch]:
        """Iterate from batch ``start`` (resume mid-epoch without loading skipped data)."""
        for i, (idx, valid, global_size) in enumerate(self.sampler.batches()):
            if i < start:
                continue
            x = self.images[idx].to(self.device, non_blocking=True).float()
            x = (x - self.mean) / self.std
            if self.augment != "none":
                x = augment_batch(x, self.augment)
            if self.image_size and x.shape[-1] != self.image_size:
                x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
            yield Batch(x, self.labels[idx].to(self.device, non_blocking=True), valid.to(self.device), global_size, idx)


def augment_batch(x: torch.Tensor, mode: str, pad: int = 4) -> torch.Tensor:
    """Random horizontal flip (``flip``) and, for ``crop-flip``, random crop after zero padding."""
    b, c, h, w = x.shape
    flip = torch.rand(b, device=x.device) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    if mode == "crop-flip":
        padded = F.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (b, 1), device=x.device)
        ox = torch.randint(0, 2 * pad + 1, (b, 1), device=x.device)
        rows = (oy + torch.arange(h, device=x.device)).view(b, 1, h, 1)
        cols = (ox + torch.arange(w, device=x.device)).view(b, 1, 1, w)
        bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
        ci = torch.arange(c, device=x.device).view(1, c, 1, 1)
        x = padded[bi, ci, rows, cols]
    return x


class FolderLoader:
    """Batches from an ImageFolder through DataLoader workers (files too big for memory)."""

    def __init__(self, dataset, sampler: ShardedBatchSampler, device, num_workers: int):
        self.dataset, self.sampler, self.device, self.num_workers = dataset, sampler, device, num_workers

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[Batch]:
        plan = list(self.sampler.batches())[start:]
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=[idx.tolist() for idx, _, _ in plan],
            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
        )
        for (x, y), (idx, valid, global_size) in zip(loader, plan):
            yield Batch(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), valid.to(self.device),
                        global_size, idx)


@dataclass
class DataBundle:
    train: TensorLoader | FolderLoader
    test: TensorLoader | FolderLoader
    num_classes: int
    in_chans: int
    train_labels: torch.Tensor
    num_train: int


def _subset(indices: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """A seeded random subset of ``n`` indices, in order (all classes, not the first ones)."""
    pick = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))[:n]
    return indices[pick].sort().values


def build_data(cfg, rank: int, world: int, device: torch.device) -> DataBundle:
    """Load ``cfg.dataset`` and wrap it in this rank's train and test loaders."""
    if cfg.dataset == "imagefolder":
        return _build_folder(cfg, rank, world, device)
    if cfg.dataset == "fashion-mnist":
        xtr, ytr, xte, yte = load_fashion_mnist(cfg.data_dir)
    elif cfg.dataset == "cifar10":
        xtr, ytr, xte, yte = load_cifar10(cfg.data_dir)
    else:
        c, s = cfg.synthetic_shape
        xtr, ytr, xte, yte = synthetic(cfg.synthetic_train_size, cfg.synthetic_test_size, cfg.num_classes or 10, c, s, cfg.seed)
    keep = imbalance_indices(ytr, cfg.imbalance, cfg.seed)
    if cfg.train_subset:
        keep = _subset(keep, cfg.train_subset, cfg.seed)
    xtr, ytr = xtr[keep], ytr[keep]
    if cfg.test_subset:
        xte, yte = xte[: cfg.test_subset], yte[: cfg.test_subset]
    mean, std = STATS.get(cfg.dataset, STATS["synthetic"])
    if len(mean) != xtr.shape[1]:
        mean, std = mean[:1] * xtr.shape[1], std[:1] * xtr.shape[1]
    make = lambda x, y, bs, train: TensorLoader(  # noqa: E731
        x, y, ShardedBatchSampler(len(y), bs, rank, world, train=train, seed=cfg.seed, accum=cfg.grad_accum_steps),
        mean, std, device,
        augment=cfg.augment if train else "none", image_size=cfg.image_size,
    )
    num_classes = cfg.num_classes or int(max(ytr.max(), yte.max())) + 1
    return DataBundle(make(xtr, ytr, cfg.batch_size, True), make(xte, yte, cfg.eval_batch_size or cfg.batch_size, False),
                      num_classes, xtr.shape[1], ytr, len(ytr))


def _build_folder(cfg, rank: int, world: int, device: torch.device) -> DataBundle:
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    root = Path(cfg.data_dir or "")
    dirs = {split: root / split for split in ("train", "val")}
    missing = [str(d) for d in dirs.values() if not d.is_dir()]
    if not cfg.data_dir or missing:
        raise DataError(f"imagefolder needs --data-dir with train/ and val/ class folders; missing: {', '.join(missing) or '--data-dir'}")
    size = cfg.image_size or 224
    train = ImageFolder(str(dirs["train"]), transform=create_transform(size, is_training=cfg.augment != "none"))
    val = ImageFolder(str(dirs["val"]), transform=create_transform(size, is_training=False))
    labels = torch.tensor(train.targets)
    keep = imbalance_indices(labels, cfg.imbalance, cfg.seed)
    if cfg.train_subset:
        keep = _subset(keep, cfg.train_subset, cfg.seed)
    train_set = torch.utils.data.Subset(train, keep.tolist())
    make = lambda ds, bs, is_train: FolderLoader(  # noqa: E731
        ds, ShardedBatchSampler(len(ds), bs, rank, world, train=is_train, seed=cfg.seed, accum=cfg.grad_accum_steps),
        device, cfg.num_workers)
    return DataBundle(make(train_set, cfg.batch_size, True), make(val, cfg.eval_batch_size or cfg.batch_size, False),
                      cfg.num_classes or len(train.classes), 3, labels[keep], len(keep))

