"""Generated images in the ImageNet folder layout, for the offline demo and the tests.

The images are smooth random colour fields with a few rectangles, saved as real JPEG files so that the
demo exercises the same decoding and preprocessing path as real data. Their labels mean nothing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from utils.data import imagenet_wnids

__all__ = ["make_image", "make_imagenet_folder"]


def make_image(rng: np.random.Generator, size: int = 256) -> Image.Image:
    coarse = rng.uniform(0, 255, size=(6, 6, 3)).astype(np.uint8)
    img = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = (int(v) for v in rng.integers(0, size - size // 8, 2))
        w, h = (int(v) for v in rng.integers(size // 16 + 1, size // 2, 2))
        draw.rectangle([x0, y0, x0 + w, y0 + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img


def make_imagenet_folder(root: str | Path, classes: int, per_class: int, seed: int = 0, size: int = 256) -> Path:
    """Write ``classes * per_class`` JPEGs under ``root/<wnid>/``, using the first ``classes`` wnids."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for wnid in imagenet_wnids()[:classes]:
        folder = root / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_image(rng, size).save(folder / f"{wnid}_{i:04d}.JPEG", quality=90)
    return root
