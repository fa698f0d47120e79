"""ImageNet-layout image folders (``<split>/<wnid>/*.JPEG``) for calibration and evaluation.

Class indices come from the canonical sorted list of the 1000 ImageNet-1k WordNet ids that timm ships
(``timm.data.ImageNetInfo``), never from the folders present: an evaluation subset may hold only some
classes. Images are converted to RGB (grayscale and CMYK JPEGs exist in ImageNet); unreadable or
truncated files are skipped and counted instead of stopping a long run.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from utils.errors import UserError

__all__ = [
    "IMAGE_EXTENSIONS",
    "Batch",
    "ImageFolderDataset",
    "imagenet_wnids",
    "scan_split",
    "calibration_subset",
    "evenly_spaced",
    "make_loader",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff")

Sample = tuple[str, int]
# (images or None when every image of the batch was unreadable, labels, number of unreadable images)
Batch = tuple[Tensor | None, Tensor | None, int]


@functools.lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in class-index order (sorted), as timm ships them."""
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo().label_names())


def scan_split(root: str | Path) -> list[Sample]:
    """List ``(path, class_index)`` for every image under ``root/<wnid>/``, in a stable order."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: no such directory")
    if not root.is_dir():
        raise UserError(f"{root}: not a directory")
    index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise UserError(f"{root}: no class folders; expected the ImageNet layout {root}/<wnid>/<image>.JPEG")
    samples: list[Sample] = []
    for d in class_dirs:
        if d.name not in index:
            raise UserError(f"{root}: folder {d.name!r} is not an ImageNet-1k class id (expected a wnid like n01440764)")
        files = sorted(f for f in os.listdir(d) if f.lower().endswith(IMAGE_EXTENSIONS))
        samples.extend((str(d / f), index[d.name]) for f in files)
    if not samples:
        raise UserError(f"{root}: the class folders hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    return samples


def calibration_subset(samples: Sequence[Sample], size: int, seed: int) -> list[Sample]:
    """``size`` samples drawn without replacement, the same for the same ``seed``."""
    if size >= len(samples):
        return list(samples)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(samples), generator=generator)[:size]
    return [samples[i] for i in order.tolist()]


def evenly_spaced(samples: Sequence[Sample], size: int) -> list[Sample]:
    """``size`` samples spread evenly over the (class-sorted) list: a fixed subset covering many classes."""
    if size >= len(samples):
        return list(samples)
    return [samples[(i * len(samples)) // size] for i in range(size)]


class ImageFolderDataset(Dataset):
    """Decodes one image per item; an unreadable file yields ``None`` (counted by the collate function)."""

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Image.Image], Tensor]) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int] | None:
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")  # loads the pixels: a truncated file fails here
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            log.warning("skipping unreadable image %s (%s)", path, exc)
            return None
        return self.transform(img), label


def collate_skipping_unreadable(items: list[tuple[Tensor, int] | None]) -> Batch:
    good = [item for item in items if item is not None]
    bad = len(items) - len(good)
    if not good:
        return None, None, bad
    images = torch.stack([image for image, _ in good])
    labels = torch.tensor([label for _, label in good], dtype=torch.long)
    return images, labels, bad


def make_loader(
    samples: Sequence[Sample], transform: Callable, batch_size: int, workers: int, pin_memory: bool = False
) -> DataLoader:
    return DataLoader(
        ImageFolderDataset(samples, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_skipping_unreadable,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
