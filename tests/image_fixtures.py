"""Tiny generated image datasets: a few classes a small model can tell apart (each class a colour and a
stripe direction, with noise), written in the image-folder layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("red_rows", "green_cols", "blue_plain")


def make_image(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    pixels = rng.integers(0, 60, size=(size, size, 3)).astype(np.int32)
    pixels[..., label] += 150
    if label == 0:
        pixels[::4] += 60  # horizontal stripes
    elif label == 1:
        pixels[:, ::4] += 60  # vertical stripes
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_split(folder: Path, per_class: int, size: int = 40, seed: int = 0, classes=CLASSES) -> Path:
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_image(label % 3, size, rng).save(folder / name / f"{i}.png")
    return folder


def write_dataset(root: Path, train_per_class: int = 16, val_per_class: int = 6, size: int = 40) -> Path:
    write_split(root / "train", train_per_class, size, seed=0)
    write_split(root / "val", val_per_class, size, seed=1)
    return root
