"""Image classification data: an image folder (one sub-folder per class, the layout of ``datasets``'
``imagefolder``) or a hub dataset, checked before any compute, and resumable per-rank batches.

Checks (every problem reported at once, as ``ImageDataError``):

- a split folder with no class folders, a class folder with no images (an empty class);
- train and validation with different class sets (the classifier's label ids would disagree);
- files that are not images (by extension: skipped and counted) and image files that do not decode
  (truncated, corrupt, another format under an image name): an error naming them, or with
  ``skip_bad=True`` skipped and counted;
- a hub dataset without an image column or a class-label column.

Batches: every epoch is a seeded permutation of the train split, cut into equal per-rank shares and
micro-batches (the last incomplete batch dropped); an example's augmentation draws from a generator
seeded by (seed, epoch, example), so the batches do not depend on the number of loader workers, and a
resumed run (``start_batch``) gets the batches the uninterrupted run would have.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
VALIDATION_FOLDERS = ("val", "validation", "valid", "test")  # the first one present is the validation split
_SHOWN = 5  # files named per problem in a message


class ImageDataError(ValueError):
    """Image data that cannot be used; the message lists every problem and what to do."""

    def __init__(self, source: str, problems: list[str] | None = None):
        if problems is None:  # one message (how a DataLoader worker's error is raised again in the main process)
            self.problems = [source]
            super().__init__(source)
            return
        self.problems = problems
        super().__init__(f"image data {source} ({len(problems)} problem(s)):\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class ImageSplit:
    """One split: each example's image (a path, or a row index into a hub dataset) and class id."""

    name: str
    items: list[Any]  # file paths (folders) or row indices (hub)
    labels: list[int]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> files skipped

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class ImageData:
    """Train and validation splits sharing one class list."""

    source: str
    class_names: list[str]
    train: ImageSplit
    validation: ImageSplit
    hub: dict[str, Any] | None = None  # {"dataset": ..., "image_column": ...} per split, for hub data

    @property
    def num_labels(self) -> int:
        return len(self.class_names)

    def load_image(self, split: ImageSplit, item: Any) -> Image.Image:
        if self.hub is None:
            return _open_image(Path(item))
        dataset, column = self.hub[split.name]
        try:
            return dataset[int(item)][column]
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise ImageDataError(self.source, [f"row {item} of the {split.name} split does not decode as an image "
                                               f"({err})"]) from None


# --- image folders ------------------------------------------------------------------------------


def _open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise ImageDataError(str(path.parent.parent), [f"{path} does not decode as an image ({err}): remove or "
                                                       "replace it, or rerun with --image_check decode and "
                                                       "--skip_bad_images to skip such files"]) from None


def _decodes(path: Path, full: bool = True) -> bool:
    """Whether a file is an image: its header opens and ``verify`` passes, and with ``full`` its pixel data
    decodes (``load``: catches truncated files)."""
    try:
        with Image.open(path) as image:
            image.verify()
        if full:
            with Image.open(path) as image:
                image.load()
        return True
    except Exception:  # noqa: BLE001 - PIL raises many types for a damaged file
        return False


def scan_folder(folder: Path, name: str, skip_bad: bool, problems: list[str],
                decode: bool = True) -> tuple[dict[str, list[Path]], dict[str, int]]:
    """Class name -> its image files, and the counts of skipped files; problems appended to ``problems``."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        problems.append(f"{folder} has no class folders: the {name} split needs one sub-folder per class "
                        "(e.g. train/cat/1.jpg, train/dog/2.jpg)")
        return {}, {}
    files = {c.name: sorted(f for f in c.rglob("*") if f.is_file() and not f.name.startswith(".")) for c in classes}
    skipped: dict[str, int] = {}
    not_images = [f for fs in files.values() for f in fs if f.suffix.lower() not in IMAGE_EXTENSIONS]
    if not_images:
        skipped["not an image file (by extension)"] = len(not_images)
    candidates = [f for fs in files.values() for f in fs if f.suffix.lower() in IMAGE_EXTENSIONS]
    with ThreadPoolExecutor(min(32, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        bad = {f for f, ok in zip(candidates, pool.map(lambda f: _decodes(f, decode), candidates)) if not ok}
    if bad and not skip_bad:
        shown = ", ".join(str(f) for f in sorted(bad)[:_SHOWN])
        problems.append(f"{len(bad)} file(s) of the {name} split do not decode as images ({shown}"
                        f"{', ...' if len(bad) > _SHOWN else ''}): remove or replace them, or pass "
                        "--skip_bad_images to skip (and count) them")
    elif bad:
        skipped["does not decode"] = len(bad)
    kept = {c: [f for f in fs if f.suffix.lower() in IMAGE_EXTENSIONS and f not in bad] for c, fs in files.items()}
    empty = [c for c, fs in kept.items() if not fs]
    if empty:
        problems.append(f"class folder(s) with no usable image in the {name} split ({folder}): "
                        f"{', '.join(empty[:_SHOWN])}{', ...' if len(empty) > _SHOWN else ''}: add images, or remove "
                        "the folder from every split")
    return kept, skipped


def _check_same_classes(train: list[str], validation: list[str], where: str, problems: list[str]) -> None:
    only_train, only_val = sorted(set(train) - set(validation)), sorted(set(validation) - set(train))
    if only_train or only_val:
        problems.append(f"train and validation have different classes in {where} (only in train: "
                        f"{only_train[:_SHOWN] or 'none'}; only in validation: {only_val[:_SHOWN] or 'none'}): the "
                        "classifier's label ids would mean different classes; give both splits the same class folders")


def _as_split(name: str, by_class: dict[str, list[Path]], class_names: list[str], skipped: dict[str, int]) -> ImageSplit:
    index = {c: i for i, c in enumerate(class_names)}
    pairs = [(str(f), index[c]) for c, files in by_class.items() for f in files]
    return ImageSplit(name, [p for p, _ in pairs], [label for _, label in pairs], skipped)


def find_validation_folder(root: Path) -> Path | None:
    return next((root / n for n in VALIDATION_FOLDERS if (root / n).is_dir()), None)


def load_image_folders(train_dir: Path, validation_dir: Path, skip_bad: bool = False, decode: bool = True) -> ImageData:
    """Both splits of an image-folder dataset, every file checked (see the module docstring; ``decode=False``
    opens each file's header only)."""
    problems: list[str] = []
    for folder, name in ((train_dir, "train"), (validation_dir, "validation")):
        if not folder.is_dir():
            problems.append(f"{folder}: no such folder (the {name} split)")
    if problems:
        raise ImageDataError(str(train_dir.parent), problems)
    train, train_skipped = scan_folder(train_dir, "train", skip_bad, problems, decode)
    validation, val_skipped = scan_folder(validation_dir, "validation", skip_bad, problems, decode)
    if train and validation:
        _check_same_classes(list(train), list(validation), f"{train_dir} and {validation_dir}", problems)
    if problems:
        raise ImageDataError(str(train_dir.parent), problems)
    names = sorted(train)
    return ImageData(str(train_dir.parent), names, _as_split("train", train, names, train_skipped),
                     _as_split("validation", validation, names, val_skipped))


# --- hub datasets -------------------------------------------------------------------------------


def _columns(features, source: str, problems: list[str]) -> tuple[str | None, str | None]:
    """The image column and the class-label column of a hub split."""
    from datasets import ClassLabel
    from datasets import Image as ImageFeature

    image = next((k for k, v in features.items() if isinstance(v, ImageFeature)), None)
    label = next((k for k, v in features.items() if isinstance(v, ClassLabel)), None)
    if image is None or label is None:
        problems.append(f"{source} needs an image column and a class-label column, found {dict(features)}")
    return image, label


def load_hub_images(name: str, config: str | None = None, train_split: str = "train",
                    validation_split: str | None = None) -> ImageData:
    """A hub image-classification dataset (``cifar10``, ``imagenet-1k`` ...): its train split and its
    validation split (default: 'validation', else 'test')."""
    import datasets

    try:
        splits = datasets.get_dataset_split_names(name, config)
    except Exception as err:  # noqa: BLE001 - the hub raises many types (offline, unknown name, gated)
        raise ImageDataError(name, [f"cannot read the dataset's splits ({err}): check the name, --dataset_config "
                                    "and network access (or use --train_dir / --validation_dir)"]) from None
    validation_split = validation_split or next((s for s in ("validation", "test") if s in splits), None)
    problems = [f"no split {s!r} (it has {splits}): name the split to use with --train_split / --validation_split"
                if s else f"no validation or test split (it has {splits}): name one with --validation_split"
                for s in (train_split, validation_split) if s not in splits]
    if problems:
        raise ImageDataError(name, problems)
    loaded = {role: datasets.load_dataset(name, config, split=split)
              for role, split in (("train", train_split), ("validation", validation_split))}
    columns = {role: _columns(d.features, f"{name}[{d.split}]", problems) for role, d in loaded.items()}
    if problems:
        raise ImageDataError(name, problems)
    names = {role: d.features[columns[role][1]].names for role, d in loaded.items()}
    if names["train"] != names["validation"]:
        _check_same_classes(names["train"], names["validation"], name, problems)
        raise ImageDataError(name, problems or ["the splits list the same classes in another order: their label "
                                                "ids mean different classes"])
    splits_out = {role: ImageSplit(role, list(range(len(d))), list(d[columns[role][1]])) for role, d in loaded.items()}
    hub = {role: (d, columns[role][0]) for role, d in loaded.items()}
    return ImageData(name, names["train"], splits_out["train"], splits_out["validation"], hub=hub)


# --- batches ------------------------------------------------------------------------------------


class _Examples(torch.utils.data.Dataset):
    """Keys ``(epoch, position)`` -> (image tensor, label); position indexes the split."""

    def __init__(self, data: ImageData, split: ImageSplit, transform, seed: int):
        self.data, self.split, self.transform, self.seed = data, split, transform, seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, position = key
        rng = np.random.default_rng((self.seed % 2**32, epoch, position))
        image = self.data.load_image(self.split, self.split.items[position])
        return self.transform(image, rng), self.split.labels[position]


def _collate(examples: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([x for x, _ in examples]),
            "labels": torch.tensor([label for _, label in examples])}


def _own_generator() -> torch.Generator:
    """A DataLoader draws a seed for its workers when it starts; from its own generator, not the global one,
    so that where an epoch or an evaluation starts does not shift the model's random numbers (router noise,
    dropout) and a resumed run draws what the uninterrupted one did."""
    return torch.Generator().manual_seed(0)


def batches_per_epoch(num_examples: int, micro_batch: int, world: int) -> int:
    """Micro-batches each rank gets per epoch (every rank the same number; the tail is dropped)."""
    return num_examples // world // micro_batch


def epoch_batches(num_examples: int, micro_batch: int, rank: int, world: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's micro-batches (positions in the split) of one epoch."""
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    per_rank = batches_per_epoch(num_examples, micro_batch, world) * micro_batch
    share = order[rank::world][:per_rank]
    return [share[i:i + micro_batch] for i in range(0, per_rank, micro_batch)]


def train_batches(data: ImageData, transform, micro_batch: int, rank: int, world: int, seed: int,
                  start_batch: int = 0, workers: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches of this rank's share of the train split, from its ``start_batch``-th on."""
    from torch.utils.data import DataLoader

    per_epoch = batches_per_epoch(len(data.train), micro_batch, world)
    if per_epoch == 0:
        raise ImageDataError(data.source, [f"the train split has {len(data.train)} images: fewer than one "
                                           f"micro-batch of {micro_batch} per rank on {world} rank(s)"])
    dataset = _Examples(data, data.train, transform, seed)
    epoch, offset = divmod(start_batch, per_epoch)
    while True:
        keys = [[(epoch, p) for p in batch]
                for batch in epoch_batches(len(data.train), micro_batch, rank, world, seed, epoch)[offset:]]
        yield from DataLoader(dataset, batch_sampler=keys, collate_fn=_collate, num_workers=workers,
                              generator=_own_generator())
        epoch, offset = epoch + 1, 0


def eval_batches(data: ImageData, transform, batch_size: int, rank: int, world: int, limit: int | None = None,
                 workers: int = 0) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """This rank's share of the validation split (at most ``limit`` images in all), with a mask of the
    examples it counts: every rank runs the same number of forwards (expert parallelism needs it), the
    shares padded by wrapping around and the padding masked out."""
    from torch.utils.data import DataLoader

    total = min(len(data.validation), limit or len(data.validation))
    positions = list(range(rank, math.ceil(total / world) * world, world))
    counted = torch.tensor([p < total for p in positions])
    dataset = _Examples(data, data.validation, transform, seed=0)
    keys = [[(0, p % total) for p in positions[i:i + batch_size]] for i in range(0, len(positions), batch_size)]
    loader = DataLoader(dataset, batch_sampler=keys, collate_fn=_collate, num_workers=workers,
                        generator=_own_generator())
    for i, batch in enumerate(loader):
        yield batch, counted[i * batch_size:(i + 1) * batch_size]
