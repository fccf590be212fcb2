"""Image transforms of the ImageNet recipe, written with PIL and torch: Inception-style random-resized crop,
horizontal flip, RandAugment, normalisation; and mixup / cutmix with label smoothing.

Why not timm / torchvision: timm's transforms and ``Mixup`` are the well-kept reference, but timm needs
torchvision, and torchvision's wheels are built against one torch release each (a mismatched pair fails
at import: "operator torchvision::nms does not exist"). These few functions keep the job on torch alone.
Their behaviour follows timm's (``timm.data.mixup.Mixup``, ``timm.data.transforms.RandomResizedCropAndInterpolation``,
``timm.data.auto_augment.rand_augment_transform``) as noted per function; the tests check ``Mixup``
against timm's formulas on crafted inputs (and against timm itself where it imports).

Shape suffixes: B batch, C channels, P pixels per side, L labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from torch import Tensor

# ViT's normalisation (Inception style: pixels to [-1, 1]); the image processor saved with a model uses the same.
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


# --- per-image transforms -------------------------------------------------------------------------


def random_resized_crop(image: Image.Image, size: int, rng: np.random.Generator, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> Image.Image:
    """Inception-style crop (torchvision's ``RandomResizedCrop``, timm's default): a random area share in
    ``scale`` and log-uniform aspect ratio in ``ratio``, 10 tries, else a centre crop clamped to ``ratio``;
    resized to ``size`` x ``size`` (bicubic, as timm's ImageNet recipe)."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    in_ratio = width / height
    w, h = (width, round(width / ratio[0])) if in_ratio < ratio[0] else \
        (round(height * ratio[1]), height) if in_ratio > ratio[1] else (width, height)
    left, top = (width - w) // 2, (height - h) // 2
    return image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))


def _level(magnitude: float, high: float, rng: np.random.Generator, signed: bool = True) -> float:
    value = magnitude / 10.0 * high
    return -value if signed and rng.random() < 0.5 else value


# RandAugment's operations with timm's magnitude scale (0..10): name -> (image, magnitude, rng) -> image
_FILL = (128, 128, 128)
RAND_AUGMENT_OPS = {
    "AutoContrast": lambda im, m, rng: ImageOps.autocontrast(im),
    "Equalize": lambda im, m, rng: ImageOps.equalize(im),
    "Invert": lambda im, m, rng: ImageOps.invert(im),
    "Rotate": lambda im, m, rng: im.rotate(_level(m, 30, rng), fillcolor=_FILL),
    "Posterize": lambda im, m, rng: ImageOps.posterize(im, max(1, int(8 - m / 10 * 4))),
    "Solarize": lambda im, m, rng: ImageOps.solarize(im, int(256 - m / 10 * 256)),
    "SolarizeAdd": lambda im, m, rng: _solarize_add(im, int(m / 10 * 110)),
    "Color": lambda im, m, rng: ImageEnhance.Color(im).enhance(1 + _level(m, 0.9, rng)),
    "Contrast": lambda im, m, rng: ImageEnhance.Contrast(im).enhance(1 + _level(m, 0.9, rng)),
    "Brightness": lambda im, m, rng: ImageEnhance.Brightness(im).enhance(1 + _level(m, 0.9, rng)),
    "Sharpness": lambda im, m, rng: ImageEnhance.Sharpness(im).enhance(1 + _level(m, 0.9, rng)),
    "ShearX": lambda im, m, rng: im.transform(im.size, Image.AFFINE, (1, _level(m, 0.3, rng), 0, 0, 1, 0),
                                              fillcolor=_FILL),
    "ShearY": lambda im, m, rng: im.transform(im.size, Image.AFFINE, (1, 0, 0, _level(m, 0.3, rng), 1, 0),
                                              fillcolor=_FILL),
    "TranslateXRel": lambda im, m, rng: im.transform(im.size, Image.AFFINE,
                                                     (1, 0, _level(m, 0.45, rng) * im.size[0], 0, 1, 0),
                                                     fillcolor=_FILL),
    "TranslateYRel": lambda im, m, rng: im.transform(im.size, Image.AFFINE,
                                                     (1, 0, 0, 0, 1, _level(m, 0.45, rng) * im.size[1]),
                                                     fillcolor=_FILL),
}


def _solarize_add(image: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return image.point(lut * len(image.getbands()))


def rand_augment(image: Image.Image, num_ops: int, magnitude: float, rng: np.random.Generator,
                 magnitude_std: float = 0.5) -> Image.Image:
    """RandAugment (Cubuk et al.) as timm's ``rand-m{magnitude}-n{num_ops}-mstd{magnitude_std}``: ``num_ops``
    operations drawn uniformly (with replacement), each applied with probability 0.5 at a magnitude drawn
    from N(magnitude, magnitude_std) clipped to [0, max(10, magnitude)]: a magnitude above 10 (the official
    WideNet script asks 15) stretches every operation's range linearly, as TensorFlow's RandAugment does."""
    names = list(RAND_AUGMENT_OPS)
    for index in rng.integers(0, len(names), size=num_ops):
        if rng.random() < 0.5:
            level = float(np.clip(rng.normal(magnitude, magnitude_std) if magnitude_std > 0 else magnitude, 0,
                                  max(10.0, magnitude)))
            image = RAND_AUGMENT_OPS[names[index]](image, level, rng)
    return image


def to_tensor(image: Image.Image, mean=MEAN, std=STD) -> Tensor:
    """PIL RGB image -> normalised (C, P, P) float tensor."""
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    return (array - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


@dataclass
class TrainTransform:
    """Training-time augmentation of one image: crop, flip, RandAugment, normalise."""

    image_size: int
    rand_augment_ops: int = 2  # RandAugment operations per image (0: none)
    rand_augment_magnitude: float = 9.0  # on timm's 0..10 scale
    crop_scale_min: float = 0.08  # smallest area share of the random-resized crop

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Tensor:
        image = random_resized_crop(image.convert("RGB"), self.image_size, rng, scale=(self.crop_scale_min, 1.0))
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        if self.rand_augment_ops:
            image = rand_augment(image, self.rand_augment_ops, self.rand_augment_magnitude, rng)
        return to_tensor(image)


@dataclass
class EvalTransform:
    """Evaluation-time preprocessing: resize to ``image_size`` x ``image_size`` (bilinear) and normalise, as the
    image processor saved with the model does (``widenet_ds.modeling.image_processor_for``)."""

    image_size: int

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> Tensor:
        return to_tensor(image.convert("RGB").resize((self.image_size, self.image_size), Image.BILINEAR))


# --- batch mixing ---------------------------------------------------------------------------------


def smoothed_one_hot(labels_B: Tensor, num_labels: int, smoothing: float) -> Tensor:
    """timm's ``one_hot`` with ``off = smoothing / L`` and ``on = 1 - smoothing + off``: (B, L)."""
    off = smoothing / num_labels
    target = torch.full((len(labels_B), num_labels), off, device=labels_B.device)
    return target.scatter_(1, labels_B.long().view(-1, 1), 1.0 - smoothing + off)


def mixup_target(labels_B: Tensor, num_labels: int, lam: float, smoothing: float) -> Tensor:
    """timm's ``mixup_target``: each row's smoothed target mixed with the batch-reversed row's, weights
    ``lam`` and ``1 - lam``."""
    return (smoothed_one_hot(labels_B, num_labels, smoothing) * lam
            + smoothed_one_hot(labels_B.flip(0), num_labels, smoothing) * (1.0 - lam))


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[tuple[int, int, int, int], float]:
    """timm's ``rand_bbox`` + ``cutmix_bbox_and_lam(correct_lam=True)``: a box of sides ``sqrt(1 - lam)`` of the
    image's, centred uniformly, clipped to the image; ``lam`` corrected to the share of the image kept."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
    left, right = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
    kept = 1.0 - (bottom - top) * (right - left) / float(height * width)
    return (int(top), int(bottom), int(left), int(right)), float(kept)


def mix_images(images_BCPP: Tensor, lam: float, box: tuple[int, int, int, int] | None) -> Tensor:
    """timm's ``Mixup._mix_batch`` (mode 'batch') for given parameters: cutmix pastes the batch-reversed
    images into ``box``; mixup blends ``lam * x + (1 - lam) * x.flip(0)``. Returns a new tensor."""
    if box is not None:
        top, bottom, left, right = box
        out = images_BCPP.clone()
        out[:, :, top:bottom, left:right] = images_BCPP.flip(0)[:, :, top:bottom, left:right]
        return out
    return images_BCPP * lam + images_BCPP.flip(0) * (1.0 - lam)


@dataclass
class Mixup:
    """Mixup / cutmix and label smoothing over a batch, as ``timm.data.Mixup`` in its default 'batch' mode.

    Per batch: with probability ``prob`` a mix happens; with both alphas > 0 it is cutmix with probability
    ``switch_prob``, else mixup; lam ~ Beta(alpha, alpha) of the chosen one; cutmix's lam is corrected to the
    pasted area. The targets are ``mixup_target`` (label smoothing included, also for unmixed batches).
    Randomness comes from the ``rng`` passed in (timm draws from numpy's global state), so a resumed run
    mixes as the uninterrupted one did. The batch size must be even (timm's rule: rows pair with the
    batch reversed)."""

    num_labels: int
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1

    def params(self, rng: np.random.Generator) -> tuple[float, bool]:
        """timm's ``_params_per_batch``: (lam, use_cutmix)."""
        if not (rng.random() < self.prob) or (self.mixup_alpha <= 0 and self.cutmix_alpha <= 0):
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(rng.random() < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return float(rng.beta(alpha, alpha)), use_cutmix

    def __call__(self, images_BCPP: Tensor, labels_B: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        if len(images_BCPP) % 2:
            raise ValueError(f"mixup pairs each image with the batch reversed: the micro-batch must be even, got "
                             f"{len(images_BCPP)}")
        lam, use_cutmix = self.params(rng)
        if lam != 1.0:
            box = None
            if use_cutmix:
                box, lam = cutmix_box(images_BCPP.shape[-2], images_BCPP.shape[-1], lam, rng)
            images_BCPP = mix_images(images_BCPP, lam, box)
        return images_BCPP, mixup_target(labels_B, self.num_labels, lam, self.label_smoothing)


@dataclass
class AugmentSettings:
    """The ``augmentation`` block of a DeepSpeed JSON for the image job: the recipe's data side."""

    crop_scale_min: float = 0.08  # smallest area share of the random-resized crop
    rand_augment_ops: int = 2  # RandAugment operations per image (0: off)
    rand_augment_magnitude: float = 9.0  # RandAugment magnitude (timm's scale: 10 is the ops' full range)
    mixup_alpha: float = 0.8  # Beta(alpha, alpha) of mixup's lam (0: off)
    cutmix_alpha: float = 1.0  # Beta(alpha, alpha) of cutmix's lam (0: off)
    mix_prob: float = 1.0  # share of batches mixed
    switch_prob: float = 0.5  # with both alphas > 0: share of mixed batches that use cutmix
    label_smoothing: float = 0.1  # off-target mass of the smoothed targets

    @classmethod
    def from_dict(cls, block: dict | None, source: str = "augmentation") -> AugmentSettings:
        """Build from a JSON block; ``ConfigError`` lists every unknown key and bad value."""
        import dataclasses

        from ..config import ConfigError

        block = dict(block or {})
        known = {f.name for f in dataclasses.fields(cls)}
        problems = [f"{source}: unknown key '{k}' (known: {', '.join(sorted(known))})" for k in block if k not in known]
        settings = cls(**{k: v for k, v in block.items() if k in known})
        for name in known:
            value = getattr(settings, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                problems.append(f"{source}.{name} must be a number >= 0, got {value!r}")
        if not problems:
            problems += [f"{source}.{name} must be at most 1, got {getattr(settings, name)!r}"
                         for name in ("crop_scale_min", "mix_prob", "switch_prob", "label_smoothing")
                         if getattr(settings, name) > 1]
            if not 0 < settings.crop_scale_min:
                problems.append(f"{source}.crop_scale_min must be > 0 (a crop of no area), got 0")
            if settings.rand_augment_ops != int(settings.rand_augment_ops):
                problems.append(f"{source}.rand_augment_ops must be an integer, got {settings.rand_augment_ops!r}")
        if problems:
            raise ConfigError(source, problems)
        return settings

    def mixes(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def train_transform(self, image_size: int) -> TrainTransform:
        return TrainTransform(image_size, int(self.rand_augment_ops), self.rand_augment_magnitude, self.crop_scale_min)

    def mixup(self, num_labels: int) -> Mixup:
        return Mixup(num_labels, self.mixup_alpha, self.cutmix_alpha, self.mix_prob, self.switch_prob,
                     self.label_smoothing)
