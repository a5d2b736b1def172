"""Datasets: ``load_dataset(name) -> (train_dataset, test_dataset, meta)``.

Datasets
--------
``digits`` (default, offline)
    scikit-learn's ``load_digits``: 1,797 8x8 grey images, 10 classes, pixel values 0..16
    scaled to [0, 1]; a fixed stratified 80/20 train/test split (``random_state=0``:
    1,437 / 360 images).
``fashion-mnist``
    Read by torchvision's own ``FashionMNIST`` class. torchvision looks for the *decompressed*
    idx files in ``<root>/FashionMNIST/raw/``; when they are not there, this module looks for the
    gzipped ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` in that folder, in ``<root>``,
    in ``<root>/fashion-mnist`` and in ``/usr/share/datasets/fashion-mnist`` (Debian package
    ``dataset-fashion-mnist``), and gunzips them into ``<root>/FashionMNIST/raw/``.
``mnist``
    torchvision's ``MNIST`` (``<root>/MNIST/raw/``), gzipped files found and unpacked the same way
    (in ``<root>/MNIST/raw``, ``<root>`` or ``<root>/mnist``), else ``download=True``.
``cifar10`` / ``cifar100``
    torchvision's ``CIFAR10`` / ``CIFAR100`` (``<root>/cifar-10-batches-py/`` and
    ``<root>/cifar-100-python/``), else ``download=True``. torchvision checks the md5 of every
    file, so only the original files are accepted.

``root`` is ``data_root``, else the ``TP_CURVATURE_DATA`` environment variable, else ``./data``.

The datasets are returned as :class:`TensorImageDataset`: the images read by torchvision's loader
are kept as one uint8 (or float) tensor and normalised per item with the standard per-channel
mean / std below, which is much faster on a CPU than PIL transforms. ``augment=True`` adds the
standard CIFAR training augmentation (random crop with 4-pixel zero padding, horizontal flip) to
the training set.

``calibration_batch`` draws a fixed calibration batch: ``n`` random images, ``n`` per class,
or (given a model) ``n`` correctly classified images per class as in the curvature paper.
"""
from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "DATASETS",
    "DatasetMeta",
    "TensorImageDataset",
    "load_dataset",
    "load_digits_dataset",
    "load_mnist_like",
    "load_cifar",
    "calibration_batch",
    "stratified_subset",
    "default_data_root",
    "DEBIAN_FASHION_MNIST",
]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

#: per-channel (mean, std) of the training images in [0, 1]
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.3054,), (0.3761,)),  # measured on the 1,437 training images of the split
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "cifar100")

_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
    "cifar-100": "cifar100",
    "cifar_100": "cifar100",
}

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass(frozen=True)
class DatasetMeta:
    """What a model builder needs to know about a dataset. Also indexable: ``meta["num_classes"]``."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = field(default=())

    def __getitem__(self, key: str):
        return getattr(self, key)

    def as_dict(self) -> dict:
        return asdict(self)


class TensorImageDataset(Dataset):
    """Images held as one tensor ``(N, C, H, W)``, normalised per item.

    ``images`` is uint8 (0..255) or floating point (already in [0, 1]); ``__getitem__`` returns
    ``((x / 255 - mean) / std, label)`` as ``(float32 tensor (C, H, W), int)``. ``augment``
    applies a random 4-pixel-padded crop and a random horizontal flip (torch's global RNG, so it
    is reproducible under ``torch.manual_seed`` with ``num_workers=0``).
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor | Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        classes: Sequence[str] = (),
        augment: bool = False,
    ) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
        self.images = images
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        if len(self.targets) != len(images):
            raise ValueError("images and targets differ in length")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.classes = tuple(classes)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.targets)

    def _to_float(self, img: torch.Tensor) -> torch.Tensor:
        x = img.float()
        if img.dtype == torch.uint8:
            x = x / 255.0
        return x

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) normalised; pad with zeros *before* normalisation semantics is the
        # torchvision RandomCrop(padding=4) default (pixel value 0), i.e. -mean/std here.
        b, c, h, w = x.shape
        pad = 4
        fill = (-self.mean / self.std).view(1, c, 1, 1)
        padded = fill.expand(b, c, h + 2 * pad, w + 2 * pad).clone()
        padded[:, :, pad : pad + h, pad : pad + w] = x
        out = torch.empty_like(x)
        ij = torch.randint(0, 2 * pad + 1, (b, 2))
        flip = torch.rand(b) < 0.5
        for k in range(b):
            i, j = int(ij[k, 0]), int(ij[k, 1])
            crop = padded[k, :, i : i + h, j : j + w]
            out[k] = crop.flip(-1) if flip[k] else crop
        return out

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` for a list / tensor of indices, normalised (and augmented if enabled)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self._normalize(self._to_float(self.images[idx]))
        if self.augment:
            x = self._augment(x)
        return x, self.targets[idx]

    def __getitem__(self, index: int):
        x, y = self.get_batch([int(index)])
        return x[0], int(y[0])

    def __getitems__(self, indices):
        # batched fetch used by torch's DataLoader (one tensor op per batch, not per item)
        x, y = self.get_batch(indices)
        return list(zip(x.unbind(0), y.tolist()))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``(x, y)`` normalised, without augmentation."""
        x = self._normalize(self._to_float(self.images))
        return x, self.targets.clone()

    def subset(self, indices) -> "TensorImageDataset":
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return TensorImageDataset(
            self.images[idx], self.targets[idx], self.mean.flatten().tolist(),
            self.std.flatten().tolist(), self.classes, self.augment,
        )


def default_data_root() -> Path:
    return Path(os.environ.get("TP_CURVATURE_DATA", "data"))


def stratified_subset(targets, n: int, seed: int = 0) -> np.ndarray:
    """Indices of ``n`` examples with class proportions kept (seeded), sorted."""
    targets = np.asarray(targets)
    if n >= len(targets):
        return np.arange(len(targets))
    from sklearn.model_selection import train_test_split

    n_classes = len(np.unique(targets))
    idx = np.arange(len(targets))
    if n < n_classes:
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(idx, size=n, replace=False))
    sel, _ = train_test_split(idx, train_size=n, stratify=targets, random_state=seed)
    return np.sort(sel)


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------
def load_digits_dataset(
    test_size: float = 0.2, split_seed: int = 0
) -> tuple[TensorImageDataset, TensorImageDataset, DatasetMeta]:
    """scikit-learn digits, 8x8, [0, 1], fixed stratified split (``split_seed``)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8)
    targets = torch.tensor(d.target, dtype=torch.long)
    idx = np.arange(len(targets))
    tr, te = train_test_split(
        idx, test_size=test_size, stratify=d.target, random_state=split_seed
    )
    tr, te = np.sort(tr), np.sort(te)
    mean, std = NORMALIZATION["digits"]
    classes = tuple(str(int(c)) for c in d.target_names)
    train = TensorImageDataset(images[tr], targets[tr], mean, std, classes)
    test = TensorImageDataset(images[te], targets[te], mean, std, classes)
    meta = DatasetMeta("digits", 10, 1, 8, mean, std, classes)
    return train, test, meta


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST
# --------------------------------------------------------------------------------------------
def _stage_idx_files(raw: Path, search: Sequence[Path]) -> list[str]:
    """Make the 4 decompressed idx files exist in ``raw``; return the names still missing.

    A decompressed file already in ``raw`` is used as is; otherwise the first ``<name>.gz``
    (or decompressed ``<name>``) found in ``search`` is unpacked (copied) into ``raw``.
    """
    missing = []
    for name in _IDX_FILES:
        target = raw / name
        if target.is_file():
            continue
        found = None
        for d in search:
            for cand in (d / (name + ".gz"), d / name):
                if cand.is_file():
                    found = cand
                    break
            if found is not None:
                break
        if found is None:
            missing.append(name)
            continue
        raw.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.part")   # concurrent runs
        if found.suffix == ".gz":
            with gzip.open(found, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copyfile(found, tmp)
        os.replace(tmp, target)
    return missing


def load_mnist_like(
    name: str,
    data_root: str | os.PathLike | None = None,
    download: bool = False,
) -> tuple[TensorImageDataset, TensorImageDataset, DatasetMeta]:
    """``mnist`` or ``fashion-mnist`` via torchvision's real ``MNIST`` / ``FashionMNIST``."""
    from torchvision import datasets as tvd

    name = _ALIASES.get(name, name)
    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST}[name]
    root = Path(data_root) if data_root is not None else default_data_root()
    raw = root / cls.__name__ / "raw"
    search = [raw, root, root / name]
    if name == "fashion-mnist":
        search.append(DEBIAN_FASHION_MNIST)
    missing = _stage_idx_files(raw, search)
    if missing and download:
        try:
            cls(str(root), train=True, download=True)
        except Exception as e:  # network errors come as RuntimeError / URLError / OSError
            raise RuntimeError(_idx_help(name, cls.__name__, root, missing) + f"\nDownload failed: {e}") from e
        missing = [m for m in _IDX_FILES if not (raw / m).is_file()]
    if missing:
        raise FileNotFoundError(_idx_help(name, cls.__name__, root, missing))
    tr = cls(str(root), train=True, download=False)
    te = cls(str(root), train=False, download=False)
    mean, std = NORMALIZATION[name]
    classes = tuple(str(c) for c in tr.classes)
    train = TensorImageDataset(tr.data.unsqueeze(1), tr.targets, mean, std, classes)
    test = TensorImageDataset(te.data.unsqueeze(1), te.targets, mean, std, classes)
    size = int(tr.data.shape[-1])
    meta = DatasetMeta(name, len(classes), 1, size, mean, std, classes)
    return train, test, meta


def _idx_help(name: str, folder: str, root: Path, missing: Sequence[str]) -> str:
    msg = (
        f"{name}: missing {', '.join(missing)}.\n"
        f"torchvision expects the decompressed idx files in {root / folder / 'raw'}/ :\n"
        + "".join(f"    {root / folder / 'raw' / f}\n" for f in _IDX_FILES)
        + f"(gzipped *.gz files in that folder, in {root}/ or in {root / name}/ are unpacked "
        f"there automatically)."
    )
    if name == "fashion-mnist":
        msg += (
            f"\nOn Debian/Ubuntu: `apt-get install dataset-fashion-mnist` puts them in "
            f"{DEBIAN_FASHION_MNIST}/, which is searched by default."
        )
    else:
        msg += " Or pass download=True (--download) where the network allows it."
    return msg


# --------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------
def load_cifar(
    name: str,
    data_root: str | os.PathLike | None = None,
    download: bool = False,
) -> tuple[TensorImageDataset, TensorImageDataset, DatasetMeta]:
    """``cifar10`` / ``cifar100`` via torchvision's real ``CIFAR10`` / ``CIFAR100``."""
    from torchvision import datasets as tvd

    name = _ALIASES.get(name, name)
    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
    root = Path(data_root) if data_root is not None else default_data_root()
    try:
        tr = cls(str(root), train=True, download=download)
        te = cls(str(root), train=False, download=False)
    except Exception as e:
        files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        base = root / cls.base_folder
        raise FileNotFoundError(
            f"{name}: could not load from {root} ({e}).\n"
            f"torchvision expects the python-pickle batches of {cls.url}\n"
            f"extracted as {base}/ with:\n"
            + "".join(f"    {base / f}\n" for f in files)
            + "(torchvision checks each file's md5). With download=True (--download) it fetches "
            f"and extracts {cls.filename}, or only extracts {root / cls.filename} if that "
            "archive is already there with the right md5."
        ) from e
    mean, std = NORMALIZATION[name]
    classes = tuple(str(c) for c in tr.classes)

    def to_tensor(ds) -> TensorImageDataset:
        x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        return TensorImageDataset(x, ds.targets, mean, std, classes)

    train, test = to_tensor(tr), to_tensor(te)
    meta = DatasetMeta(name, len(classes), 3, int(tr.data.shape[1]), mean, std, classes)
    return train, test, meta


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def load_dataset(
    name: str = "digits",
    data_root: str | os.PathLike | None = None,
    download: bool = False,
    train_subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
    augment: bool = False,
    pad_to: int | None = None,
) -> tuple[TensorImageDataset, TensorImageDataset, DatasetMeta]:
    """Load ``name`` (one of :data:`DATASETS`) -> ``(train, test, meta)``.

    ``train_subset`` / ``test_subset`` cap the number of examples with a seeded stratified
    subset (``seed``) for CPU-friendly runs. ``augment`` turns on crop+flip augmentation of the
    training set (meant for CIFAR). ``pad_to`` zero-pads the raw images (pixel value 0, before
    normalisation) symmetrically to ``pad_to x pad_to`` (Fashion-MNIST 28 -> 32 for the paper's
    VGG-9; the extra pixel of an odd margin goes right / bottom); ``meta.image_size`` follows.
    """
    key = _ALIASES.get(name.lower(), name.lower())
    if key == "digits":
        train, test, meta = load_digits_dataset()
    elif key in ("mnist", "fashion-mnist"):
        train, test, meta = load_mnist_like(key, data_root, download)
    elif key in ("cifar10", "cifar100"):
        train, test, meta = load_cifar(key, data_root, download)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if train_subset is not None and train_subset < len(train):
        train = train.subset(stratified_subset(train.targets.numpy(), train_subset, seed))
    if test_subset is not None and test_subset < len(test):
        test = test.subset(stratified_subset(test.targets.numpy(), test_subset, seed))
    train.augment = bool(augment)
    if pad_to is not None and pad_to != meta.image_size:
        if pad_to < meta.image_size:
            raise ValueError(f"pad_to={pad_to} is smaller than the images ({meta.image_size})")
        train, test = _pad_images(train, pad_to), _pad_images(test, pad_to)
        meta = DatasetMeta(meta.name, meta.num_classes, meta.in_channels, int(pad_to),
                           meta.mean, meta.std, meta.classes)
    return train, test, meta


def _pad_images(ds: TensorImageDataset, size: int) -> TensorImageDataset:
    h, w = ds.images.shape[-2:]
    top, left = (size - h) // 2, (size - w) // 2
    imgs = torch.nn.functional.pad(ds.images, (left, size - w - left, top, size - h - top))
    return TensorImageDataset(imgs, ds.targets, ds.mean.flatten().tolist(),
                              ds.std.flatten().tolist(), ds.classes, ds.augment)


# --------------------------------------------------------------------------------------------
# calibration data
# --------------------------------------------------------------------------------------------
def _targets_of(dataset) -> np.ndarray:
    t = getattr(dataset, "targets", None)
    if t is not None and len(t) == len(dataset):
        return np.asarray(torch.as_tensor(t))
    return np.array([int(dataset[i][1]) for i in range(len(dataset))])


def _fetch(dataset, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(dataset, TensorImageDataset):
        aug, dataset.augment = dataset.augment, False
        try:
            return dataset.get_batch(list(indices))
        finally:
            dataset.augment = aug
    xs, ys = zip(*(dataset[int(i)] for i in indices))
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys, dtype=torch.long)


def calibration_batch(
    dataset,
    n: int,
    seed: int = 0,
    per_class: bool = False,
    model: torch.nn.Module | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed calibration batch ``(x, y)`` drawn from ``dataset`` (no augmentation).

    * ``per_class=False``: ``n`` images in a seeded random order.
    * ``per_class=True``: ``n`` images *of each class* (so ``n * num_classes`` in all), grouped
      by class (class 0 first), each class in the seeded random order.
    * ``model`` given: only images the model classifies correctly are taken (the curvature
      paper uses ``n=1, per_class=True`` with the trained model). The model is run in eval mode
      and its training flag restored.

    Raises ``ValueError`` when the dataset has too few (correctly classified) images.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    targets = _targets_of(dataset)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(targets))
    classes = np.unique(targets)

    if model is None:
        if per_class:
            chosen = [order[targets[order] == c][:n] for c in classes]
            short = [int(c) for c, ch in zip(classes, chosen) if len(ch) < n]
            if short:
                raise ValueError(f"classes {short} have fewer than {n} images")
            idx = np.concatenate(chosen)
        else:
            if n > len(order):
                raise ValueError(f"dataset has only {len(order)} images, asked for {n}")
            idx = order[:n]
        return _fetch(dataset, idx.tolist())

    # correctly classified images only: scan the seeded order in chunks
    was_training = model.training
    model.eval()
    if device is None:
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
    picked: dict[int, list[int]] = {int(c): [] for c in classes}
    total: list[int] = []
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                x, y = _fetch(dataset, chunk.tolist())
                pred = model(x.to(device)).argmax(1).cpu()
                for i, ok, c in zip(chunk.tolist(), (pred == y).tolist(), y.tolist()):
                    if not ok:
                        continue
                    if per_class:
                        if len(picked[c]) < n:
                            picked[c].append(i)
                    elif len(total) < n:
                        total.append(i)
                if per_class and all(len(v) >= n for v in picked.values()):
                    break
                if not per_class and len(total) >= n:
                    break
    finally:
        model.train(was_training)
    if per_class:
        short = [c for c, v in picked.items() if len(v) < n]
        if short:
            raise ValueError(f"classes {short} have fewer than {n} correctly classified images")
        idx = [i for c in sorted(picked) for i in picked[c]]
    else:
        if len(total) < n:
            raise ValueError(f"only {len(total)} correctly classified images, asked for {n}")
        idx = total
    return _fetch(dataset, idx)
