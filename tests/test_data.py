"""Unit tests of shared/data.py: IDX reading, sharding over ranks, class balance, batch augmentation."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

from shared.doctor import load_recipe  # noqa: E402
from shared import data  # noqa: E402
from shared.data import (  # noqa: E402
    DataError, ShardedBatchSampler, TensorLoader, augment_batch, class_weights, imbalance_indices, read_idx, synthetic,
)

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
                                   reason="Debian's dataset-fashion-mnist is not installed")
CPU = torch.device("cpu")



def idx_bytes(t: torch.Tensor) -> bytes:
    """The IDX encoding of a uint8 tensor."""
    header = bytes([0, 0, 8, t.dim()]) + b"".join(int(d).to_bytes(4, "big") for d in t.shape)
    return header + t.contiguous().numpy().tobytes()


def write_idx(path: Path, t: torch.Tensor) -> Path:
    raw = idx_bytes(t)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


# --------------------------------------------------------------------------- readers


@pytest.fixture(scope="module")
def fashion_train():
    return read_idx(FASHION / "train-images-idx3-ubyte.gz"), read_idx(FASHION / "train-labels-idx1-ubyte.gz")


@needs_fashion
def test_read_idx_real_fashion_mnist(fashion_train):
    images, labels = fashion_train
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,)
    assert torch.bincount(labels.long()).tolist() == [6000] * 10
    x = images.float() / 255
    assert x.mean().item() == pytest.approx(0.2860, abs=5e-4)
    assert x.std().item() == pytest.approx(0.3530, abs=5e-4)
    # the normalisation constants the loaders use are these statistics
    assert data.STATS["fashion-mnist"] == ((0.2860,), (0.3530,))


@needs_fashion
def test_read_idx_real_test_set():
    images = read_idx(FASHION / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(FASHION / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28)
    assert torch.bincount(labels.long()).tolist() == [1000] * 10


@pytest.mark.parametrize("name", ["x-ubyte", "x-ubyte.gz"])
def test_read_idx_round_trip(tmp_path, name):
    t = torch.randint(0, 256, (5, 3, 4), dtype=torch.uint8)
    assert torch.equal(read_idx(write_idx(tmp_path / name, t)), t)


def test_read_idx_truncated_raises(tmp_path):
    t = torch.randint(0, 256, (5, 3, 4), dtype=torch.uint8)
    path = tmp_path / "cut-ubyte"
    path.write_bytes(idx_bytes(t)[:-7])
    with pytest.raises(DataError) as info:
        read_idx(path)
    assert str(info.value) == f"{path}: truncated IDX file (53 values, header says (5, 3, 4))"


def test_load_fashion_mnist_from_torchvision_layout(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "missing")
    monkeypatch.setattr(data, "_torchvision_download", lambda *a: pytest.fail("must not download"))
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    xtr = torch.randint(0, 256, (20, 28, 28), generator=g, dtype=torch.uint8)
    ytr = torch.arange(20, dtype=torch.uint8) % 10
    xte = torch.randint(0, 256, (6, 28, 28), generator=g, dtype=torch.uint8)
    yte = torch.arange(6, dtype=torch.uint8)
    for stem, t in [("train-images-idx3-ubyte", xtr), ("train-labels-idx1-ubyte", ytr),
                    ("t10k-images-idx3-ubyte", xte), ("t10k-labels-idx1-ubyte", yte)]:
        write_idx(raw / stem, t)  # uncompressed, as torchvision leaves them
    a, b, c, d = data.load_fashion_mnist(str(tmp_path))
    assert a.shape == (20, 1, 28, 28) and c.shape == (6, 1, 28, 28)
    assert torch.equal(a[:, 0], xtr) and torch.equal(c[:, 0], xte)
    assert b.dtype == torch.int64 and b.tolist() == ytr.long().tolist() and d.tolist() == yte.long().tolist()


def test_load_fashion_mnist_missing_names_folders_without_download(tmp_path, monkeypatch):
    missing = tmp_path / "no-debian"
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", missing)
    calls = []
    monkeypatch.setattr(data, "_torchvision_download", lambda name, d: calls.append((name, d)))
    with pytest.raises(DataError) as info:
        data.load_fashion_mnist(None)
    assert calls == []  # no data_dir: nowhere to download to
    assert str(info.value).startswith(f"Fashion-MNIST not found (looked in {missing}). ")
    assert "'apt-get install dataset-fashion-mnist'" in str(info.value)
    assert "--data-dir DIR" in str(info.value)

    with pytest.raises(DataError) as info:
        data.load_fashion_mnist(str(tmp_path / "d"))
    assert calls == [("FashionMNIST", str(tmp_path / "d"))]  # tried once, then looked again
    d = tmp_path / "d"
    looked = f"{d}, {d / 'FashionMNIST' / 'raw'}, {missing}"
    assert str(info.value).startswith(f"Fashion-MNIST not found (looked in {looked}). ")


def test_torchvision_download_failure_is_a_data_error(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(tvd, "FashionMNIST", offline)
    with pytest.raises(DataError) as info:
        data._torchvision_download("FashionMNIST", str(tmp_path))
    assert str(info.value) == (
        f"FashionMNIST is not in {tmp_path} and downloading it failed (RuntimeError: Error downloading "
        "train-images-idx3-ubyte.gz). Put the files there by hand, or run once on a machine with internet.")


# --------------------------------------------------------------------------- sharding: train


def epoch_plan(n, batch, world, *, seed=0, epoch=0, train=True, accum=1):
    samplers = [ShardedBatchSampler(n, batch, r, world, train=train, seed=seed, accum=accum) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    return samplers, [list(s.batches()) for s in samplers]


TRAIN_CASES = [(1003, 50, 2, 1), (1003, 50, 3, 1), (1000, 50, 2, 1), (1001, 50, 2, 1), (1001, 50, 3, 1),
               (100, 7, 3, 1), (10, 4, 4, 1), (5, 1, 2, 1), (7, 3, 1, 1), (3, 8, 4, 1),
               (1003, 50, 2, 2), (1003, 16, 3, 4), (23, 4, 1, 2), (101, 5, 2, 3)]


@pytest.mark.parametrize("n, batch, world, accum", TRAIN_CASES)
def test_train_epoch_sees_every_index_once(n, batch, world, accum):
    samplers, plan = epoch_plan(n, batch, world, seed=3, epoch=1, accum=accum)
    # every rank takes the same number of micro-batches, equal to len(), a whole number of optimizer steps
    assert [len(p) for p in plan] == [len(samplers[0])] * world
    assert len(plan[0]) % accum == 0
    seen = torch.cat([idx for rank in plan for idx, _, _ in rank] + [torch.empty(0, dtype=torch.long)]).tolist()
    assert len(seen) == len(set(seen)), "an index was given twice in one epoch"
    assert set(seen) <= set(range(n))
    rest = n % (batch * world * accum)
    dropped = rest if rest < world * accum else 0
    assert n - len(seen) == dropped and dropped < world * accum
    for step in range(len(plan[0]) // accum):
        micro = [plan[r][step * accum + a] for r in range(world) for a in range(accum)]
        sizes = [len(idx) for idx, _, _ in micro]
        assert len({g for _, _, g in micro}) == 1
        assert sum(sizes) == micro[0][2]  # the step's global size is the sum over ranks and micro-batches
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1 and max(sizes) <= batch
        assert all(bool(valid.all()) and len(valid) == len(idx) for idx, valid, _ in micro)
    full = n // (batch * world * accum)
    assert all(len(idx) == batch for rank in plan for idx, _, _ in rank[:full * accum])


def test_train_order_depends_only_on_seed_and_epoch():
    def order(seed, epoch):
        return torch.cat([idx for idx, _, _ in epoch_plan(1003, 50, 2, seed=seed, epoch=epoch)[1][0]]).tolist()

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    assert order(1, 1) != order(1, 2)


def test_train_len_matches_yield_for_many_sizes():
    for n in range(1, 40):
        for batch in (1, 3, 8):
            for world in (1, 2, 3):
                for accum in (1, 2):
                    s = ShardedBatchSampler(n, batch, world - 1, world, train=True, accum=accum)
                    assert len(list(s.batches())) == len(s), (n, batch, world, accum)


# --------------------------------------------------------------------------- sharding: eval


@pytest.mark.parametrize("n, batch, world", [(1003, 50, 2), (1003, 50, 3), (10, 4, 3), (7, 100, 2), (1, 2, 2),
                                             (100, 10, 4), (5, 2, 1)])
def test_eval_each_index_valid_once_with_masked_padding(n, batch, world):
    samplers, plan = epoch_plan(n, batch, world, train=False)
    assert [len(p) for p in plan] == [len(samplers[0])] * world
    valid_idx, padding = [], 0
    for rank in plan:
        for idx, valid, global_size in rank:
            assert len(idx) == len(valid) and global_size == n
            valid_idx += idx[valid].tolist()
            padding += int((~valid).sum())
            assert idx.min() >= 0 and idx.max() < n  # padding still indexes real data
    assert sorted(valid_idx) == list(range(n))
    per_rank = -(-n // world)
    assert padding == per_rank * world - n
    # every rank yields batches of the same sizes (collectives stay in step)
    assert len({tuple(len(idx) for idx, _, _ in rank) for rank in plan}) == 1


def test_eval_order_ignores_epoch():
    _, a = epoch_plan(103, 10, 2, train=False, epoch=0)
    _, b = epoch_plan(103, 10, 2, train=False, epoch=5)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a[0], b[0], strict=True))


# --------------------------------------------------------------------------- class balance


def test_imbalance_indices_follow_the_power_law():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat_interleave(200)[torch.randperm(2000, generator=g)]
    keep = imbalance_indices(labels, 0.1, seed=1)
    counts = torch.bincount(labels[keep], minlength=10).tolist()
    assert counts == [round(200 * 0.1 ** (c / 9)) for c in range(10)]
    assert counts[0] == 200 and counts[-1] == 20
    assert keep.tolist() == sorted(set(keep.tolist()))
    assert torch.equal(keep, imbalance_indices(labels, 0.1, seed=1))
    assert not torch.equal(keep, imbalance_indices(labels, 0.1, seed=2))
    assert torch.equal(imbalance_indices(labels, 1.0, seed=1), torch.arange(2000))


def test_imbalance_keeps_at_least_one_per_class():
    labels = torch.arange(3).repeat_interleave(10)
    keep = imbalance_indices(labels, 0.001, seed=0)
    assert torch.bincount(labels[keep]).tolist() == [10, 1, 1]


def test_class_weights_balanced():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    w = class_weights("balanced", labels, 3)
    assert torch.allclose(w, torch.tensor([10 / (3 * 6), 10 / (3 * 3), 10 / (3 * 1)]))
    assert class_weights("none", labels, 3) is None


def test_class_weights_balanced_missing_class():
    with pytest.raises(DataError) as info:
        class_weights("balanced", torch.tensor([0, 0, 2]), 4)
    assert str(info.value) == "--class-weights balanced: classes [1, 3] have no training samples"


@pytest.mark.parametrize("name, text", [("w.txt", "0.5 1\n2.25\n"), ("w.json", "[0.5, 1, 2.25]")])
def test_class_weights_from_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    w = class_weights(str(path), torch.tensor([0, 1, 2]), 3)
    assert w.dtype == torch.float32 and w.tolist() == [0.5, 1.0, 2.25]


def test_class_weights_file_with_wrong_count(tmp_path):
    path = tmp_path / "w.json"
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(DataError) as info:
        class_weights(str(path), torch.tensor([0, 1, 2]), 3)
    assert str(info.value) == f"--class-weights {path}: 2 weights for 3 classes"
    with pytest.raises(DataError) as info:
        class_weights("balancd", torch.tensor([0]), 1)
    assert str(info.value) == "--class-weights: 'balancd' is neither 'none', 'balanced' nor an existing file"


# --------------------------------------------------------------------------- augmentation


def candidates(img: torch.Tensor, pad: int):
    """Every image crop-flip can produce from ``img``: crops of the zero-padded image and of its mirror."""
    h, w = img.shape[-2:]
    for flipped in (img, img.flip(-1)):
        padded = F.pad(flipped, (pad, pad, pad, pad))
        for oy in range(2 * pad + 1):
            for ox in range(2 * pad + 1):
                yield (flipped is not img, oy, ox), padded[..., oy:oy + h, ox:ox + w]


def test_crop_flip_produces_crops_of_the_padded_image():
    torch.manual_seed(0)
    c, h, w = 2, 6, 7
    img = torch.arange(1, c * h * w + 1, dtype=torch.float32).view(c, h, w)  # every pixel distinct, none zero
    x = img.expand(64, c, h, w).clone()
    out = augment_batch(x, "crop-flip", pad=2)
    assert out.shape == x.shape and out.dtype == x.dtype
    found = []
    for sample in out:
        match = [key for key, crop in candidates(img, 2) if torch.equal(crop, sample)]
        assert match, "output is not a crop of the padded (optionally flipped) image"
        found.append(match[0])
    assert len({k[0] for k in found}) == 2  # flipped and not flipped both occur
    assert len({k[1:] for k in found}) > 5  # many different offsets
    assert torch.equal(x, img.expand(64, c, h, w))  # input left untouched


def test_flip_only_flips():
    torch.manual_seed(1)
    img = torch.randn(3, 5, 5)
    out = augment_batch(img.expand(32, 3, 5, 5).clone(), "flip")
    flipped = [torch.equal(o, img.flip(-1)) for o in out]
    same = [torch.equal(o, img) for o in out]
    assert all(a or b for a, b in zip(flipped, same, strict=True))
    assert any(flipped) and any(same)


# --------------------------------------------------------------------------- synthetic data


def test_synthetic_is_deterministic_and_learnable():
    a = synthetic(600, 200, 4, 2, 8, seed=5)
    b = synthetic(600, 200, 4, 2, 8, seed=5)
    c = synthetic(600, 200, 4, 2, 8, seed=6)
    xtr, ytr, xte, yte = a
    assert xtr.shape == (600, 2, 8, 8) and xte.shape == (200, 2, 8, 8) and xtr.dtype == torch.uint8
    assert ytr.shape == (600,) and set(ytr.tolist()) == {0, 1, 2, 3} and int(yte.max()) < 4
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not torch.equal(xtr, c[0])
    # a nearest-class-mean classifier fitted on train separates the test set: the classes carry a pattern
    means = torch.stack([xtr[ytr == k].float().mean(0) for k in range(4)])
    pred = ((xte.float()[:, None] - means[None]) ** 2).flatten(2).sum(-1).argmin(1)
    assert (pred == yte).float().mean().item() > 0.95


# --------------------------------------------------------------------------- loaders


def make_loader(n=23, batch=4, rank=0, world=2, train=True, augment="none", image_size=None):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 6, 6), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 3
    sampler = ShardedBatchSampler(n, batch, rank, world, train=train, seed=7)
    return TensorLoader(images, labels, sampler, (0.5,), (0.25,), CPU, augment=augment, image_size=image_size)


@pytest.mark.parametrize("start", [0, 1, 3, 5])
def test_iter_from_yields_the_remaining_batches(start):
    loader = make_loader()
    loader.sampler.set_epoch(2)
    full = list(loader)
    assert len(full) == len(loader) == 3
    rest = list(loader.iter_from(start))
    assert len(rest) == max(0, len(full) - start)
    for a, b in zip(full[start:], rest, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.indices, b.indices)
        assert torch.equal(a.valid, b.valid) and a.global_size == b.global_size


def test_tensor_loader_normalises_and_resizes():
    loader = make_loader(train=False, world=1, batch=50)
    batch = next(iter(loader))
    expected = (loader.images.float() / 255 - 0.5) / 0.25
    assert torch.allclose(batch.images, expected, atol=1e-6)
    assert torch.equal(batch.labels, loader.labels)
    assert batch.indices.tolist() == list(range(23))
    big = next(iter(make_loader(train=False, world=1, batch=50, image_size=12)))
    assert big.images.shape == (23, 1, 12, 12)


def test_build_data_synthetic_subsets_and_shards(monkeypatch):
    Config = load_recipe("image_classification").Config
    cfg = Config(dataset="synthetic", synthetic_train_size=500, synthetic_test_size=101, synthetic_shape=[3, 8],
                 num_classes=5, train_subset=300, test_subset=99, batch_size=16, eval_batch_size=10, seed=1)
    bundles = [data.build_data(cfg, r, 2, CPU) for r in range(2)]
    b = bundles[0]
    assert (b.num_classes, b.in_chans, b.num_train) == (5, 3, 300)
    assert len(b.train_labels) == 300
    assert len(b.train) == len(bundles[1].train) == 300 // 32 + 1  # 300 = 9 x 32 + 12
    assert len(b.test) == len(bundles[1].test) == 5  # 99 -> 50 per rank, batches of 10
    xb = next(iter(b.train))
    assert xb.images.shape == (16, 3, 8, 8) and xb.images.dtype == torch.float32
    valid = sum(int(batch.valid.sum()) for bundle in bundles for batch in bundle.test)
    assert valid == 99


def test_imagefolder_train_subset_is_a_random_sample(tmp_path):
    from PIL import Image

    for split, per_class in (("train", 40), ("val", 2)):
        for cls in ("a", "b"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i}.png")
    cfg = load_recipe("image_classification").Config(dataset="imagefolder", data_dir=str(tmp_path), train_subset=40, image_size=8,
                               num_workers=0, batch_size=8)
    bundle = data.build_data(cfg, 0, 1, CPU)
    assert bundle.num_train == 40 and bundle.num_classes == 2
    counts = torch.bincount(bundle.train_labels, minlength=2).tolist()
    assert min(counts) >= 10, f"class counts in the subset: {counts}"
