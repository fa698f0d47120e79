"""Image folders: canonical wnid indices, RGB conversion, unreadable files skipped and counted."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import ImageNetInfo

from utils.data import calibration_subset, evenly_spaced, imagenet_wnids, make_loader, scan_split
from utils.demo import make_image, make_imagenet_folder
from utils.errors import UserError


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.resize((16, 16)), dtype=np.float32)).permute(2, 0, 1)


def test_wnid_indices_come_from_the_canonical_list(tmp_path):
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and list(wnids) == sorted(wnids) == list(ImageNetInfo().label_names())
    rng = np.random.default_rng(0)
    # Only two classes present, far apart in the list: indices must not be 0 and 1.
    for wnid in (wnids[999], wnids[417]):
        (tmp_path / wnid).mkdir()
        make_image(rng, 32).save(tmp_path / wnid / "a.JPEG")
    samples = scan_split(tmp_path)
    assert sorted(label for _, label in samples) == [417, 999]


def test_scan_split_errors(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        scan_split(tmp_path / "missing")
    with pytest.raises(UserError, match="no class folders"):
        scan_split(tmp_path)
    (tmp_path / "n01440764").mkdir()
    (tmp_path / "n01440764" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="hold no images"):
        scan_split(tmp_path)
    (tmp_path / "cats").mkdir()
    with pytest.raises(UserError, match="'cats' is not an ImageNet-1k class id"):
        scan_split(tmp_path)


def test_modes_are_converted_to_rgb_and_unreadable_files_are_counted(tmp_path):
    folder = tmp_path / "n01440764"
    folder.mkdir()
    rng = np.random.default_rng(1)
    base = make_image(rng, 40)
    base.convert("L").save(folder / "gray.JPEG")
    base.convert("CMYK").save(folder / "cmyk.JPEG")
    base.convert("RGBA").save(folder / "rgba.png")
    base.convert("P").save(folder / "palette.png")
    (folder / "garbage.JPEG").write_bytes(b"not an image at all")
    buf = io.BytesIO()
    base.save(buf, format="JPEG")
    (folder / "truncated.JPEG").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    samples = scan_split(tmp_path)
    assert len(samples) == 6
    loader = make_loader(samples, to_tensor, batch_size=4, workers=0)
    seen, bad = 0, 0
    for images, labels, unreadable in loader:
        bad += unreadable
        if images is not None:
            assert images.shape[1] == 3
            seen += len(images)
            assert labels.tolist() == [0] * len(images)
    assert (seen, bad) == (4, 2)


def test_batch_of_only_unreadable_files(tmp_path):
    folder = tmp_path / "n01440764"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.JPEG").write_bytes(b"\xff\xd8 broken")
    images, labels, bad = next(iter(make_loader(scan_split(tmp_path), to_tensor, batch_size=8, workers=0)))
    assert images is None and labels is None and bad == 3


def test_calibration_subset_is_reproducible():
    samples = [(f"{i}.JPEG", i % 10) for i in range(100)]
    a = calibration_subset(samples, 20, seed=0)
    assert a == calibration_subset(samples, 20, seed=0)
    assert a != calibration_subset(samples, 20, seed=1)
    assert len(set(a)) == 20
    assert calibration_subset(samples, 500, seed=0) == samples


def test_evenly_spaced_subset_covers_the_classes():
    samples = [(f"{i}.JPEG", i // 10) for i in range(100)]  # class-sorted, 10 per class
    subset = evenly_spaced(samples, 10)
    assert subset == evenly_spaced(samples, 10) and len(set(subset)) == 10
    assert sorted(label for _, label in subset) == list(range(10))
    assert evenly_spaced(samples, 1000) == samples


def test_demo_folder_layout(tmp_path):
    root = make_imagenet_folder(tmp_path / "train", classes=3, per_class=2, seed=0, size=48)
    samples = scan_split(root)
    assert [label for _, label in samples] == [0, 0, 1, 1, 2, 2]
    assert all(Path(p).suffix == ".JPEG" for p, _ in samples)
