"""Folders of (image, mask, class) for zero-shot segmentation, in the two layouts the field's benchmarks use.

* **binary** (ImageNet-Segmentation style): ``images/<name>.png|jpg``, ``masks/<name>.png`` (non-zero pixels are
  the object) and ``classes.txt`` with one ``<name> <class name>`` line per image;
* **voc** (PascalVOC): ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (class indices, 255 = void) and,
  optionally, ``ImageSets/Segmentation/<split>.txt`` naming the ids to use; one item per class present in a mask.

:func:`read_folder` tells the layouts apart and refuses a folder with a missing mask, an unknown class or an
unreadable file with one line naming it, before any model runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DatasetError", "SegmentationItem", "VOC_CLASSES", "read_folder"]

#: PascalVOC's class indices (0 is the background; 255 marks void borders).
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor",
)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DatasetError(ValueError):
    """A segmentation folder that cannot be read as one of the layouts."""


@dataclass(frozen=True)
class SegmentationItem:
    """One image with the mask of one class: ``image (H, W, 3)`` uint8, ``mask (H, W)`` bool."""

    name: str
    image: np.ndarray
    mask: np.ndarray
    label: str


def _read(path: Path, mode: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.array(image.convert(mode) if mode != "P" else image)
    except (UnidentifiedImageError, OSError) as err:
        raise DatasetError(f"{path} is not a readable image ({err})") from err


def _image_of(folder: Path, stem: str) -> Path:
    for suffix in _IMAGE_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    raise DatasetError(f"no image {stem}.png/.jpg in {folder}")


def _binary(root: Path) -> Iterator[SegmentationItem]:
    labels = root / "classes.txt"
    if not labels.is_file():
        raise DatasetError(f"{root} has images/ and masks/ but no classes.txt ('<name> <class>' per line)")
    for number, line in enumerate(labels.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        name, _, label = line.strip().partition(" ")
        if not label.strip():
            raise DatasetError(f"{labels}:{number}: '{line.strip()}' names no class ('<name> <class>')")
        mask_path = root / "masks" / f"{name}.png"
        if not mask_path.is_file():
            raise DatasetError(f"the mask of {name!r} is missing: {mask_path}")
        image = _read(_image_of(root / "images", name), "RGB")
        mask = _read(mask_path, "L") > 0
        if mask.shape != image.shape[:2]:
            raise DatasetError(f"{mask_path} is {mask.shape[1]}×{mask.shape[0]} but its image is "
                               f"{image.shape[1]}×{image.shape[0]}")
        yield SegmentationItem(name=name, image=image, mask=mask, label=label.strip())


def _voc(root: Path, split: str) -> Iterator[SegmentationItem]:
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if listing.is_file():
        ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    else:
        ids = sorted(p.stem for p in (root / "SegmentationClass").glob("*.png"))
    for name in ids:
        mask_path = root / "SegmentationClass" / f"{name}.png"
        if not mask_path.is_file():
            raise DatasetError(f"the mask of {name!r} is missing: {mask_path}")
        image = _read(_image_of(root / "JPEGImages", name), "RGB")
        classes = _read(mask_path, "P")
        if classes.shape != image.shape[:2]:
            raise DatasetError(f"{mask_path} does not have its image's size")
        for index in sorted(set(np.unique(classes).tolist()) - {0, 255}):
            if index >= len(VOC_CLASSES):
                raise DatasetError(f"{mask_path} has class index {index}; PascalVOC has 0–{len(VOC_CLASSES) - 1}")
            yield SegmentationItem(name=f"{name}:{VOC_CLASSES[index]}", image=image, mask=classes == index,
                                   label=VOC_CLASSES[index])


def read_folder(root: str | Path, split: str = "val") -> list[SegmentationItem]:
    """Every (image, mask, class) item of a folder in the binary or the voc layout (module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {str(root)!r} does not exist")
    if (root / "images").is_dir() and (root / "masks").is_dir():
        items = list(_binary(root))
    elif (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
        items = list(_voc(root, split))
    else:
        raise DatasetError(f"{root} is neither layout: expected images/ + masks/ + classes.txt, or PascalVOC's "
                           "JPEGImages/ + SegmentationClass/")
    if not items:
        raise DatasetError(f"{root} holds no (image, mask, class) item")
    return items
