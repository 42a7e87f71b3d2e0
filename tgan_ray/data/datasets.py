"""Torch datasets for the three trainable stages (pure torch, no Ray).

- :class:`PairedDataset` (pix2pix, step 3): rough mask -> image pairs, both in the GAN's tanh range [-1, 1].
- :class:`UnpairedDataset` (CycleGAN, step 5): domain A (1st generation) and domain B (real), B drawn at random.
- :class:`SegmentationDataset` (NPsSegNet, step 7): image in [0, 1] and a {0, 1} label map.

Items are numpy arrays or image files (PNG, JPEG, TIFF), loaded lazily. Frames larger than ``size`` are cut to it
(random crop for training, centre crop otherwise) or, with ``fit='resize'``, resized whole (the paper's 512x512);
smaller frames are reflection-padded. Randomness (crops, augmentation, the B draw) comes from one generator per
item: drawn from torch's generator when ``seed`` is None (so a run seeded with ``torch.manual_seed``, and
DataLoader's per-worker seeds, repeats), else a pure function of (seed, epoch, index), so results do not
depend on DataLoader workers. Call :meth:`set_epoch` each epoch, as with ``DistributedSampler``.

    ds = SegmentationDataset(image_paths, mask_paths, transform=train_transform(), size=512, train=True)
    image, label = ds[0]    # (1, 512, 512) float32 in [0, 1], (512, 512) int64
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from tgan_ray.io import read_image

from .tiling import resize_to
from .transforms import reseed

ImageSource = np.ndarray | str | os.PathLike
Fit = Literal["crop", "resize"]
Loader = Callable[[ImageSource], np.ndarray]


def read_gray(path: str | os.PathLike) -> np.ndarray:
    """An image file as a 2-D array in its stored dtype, which :func:`to_unit_float` scales by.

    The project's one image reader (:func:`tgan_ray.io.read_image`: every supported format, the decompression-bomb
    guard, one-line errors; colour becomes luminance), its float32 grey values put back in the file's dtype.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image file not found: {p}")
    em = read_image(p)
    stored = np.dtype(em.meta["dtype"])
    return np.rint(em.data).astype(stored) if np.issubdtype(stored, np.integer) else em.data


def to_unit_float(arr: np.ndarray, name: str = "image") -> np.ndarray:
    """Integer images scaled by their dtype's maximum, floats checked to lie in [0, 1]; float32 out."""
    arr = np.asarray(arr)
    if arr.dtype == bool:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        return (arr / np.iinfo(arr.dtype).max).astype(np.float32)
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if lo < -0.01 or hi > 1.01:
        raise ValueError(f"{name} is float with range [{lo:.3g}, {hi:.3g}]; normalise it to [0, 1] first")
    return np.clip(arr, 0, 1).astype(np.float32)


def _name(source: ImageSource, index: int, kind: str) -> str:
    return str(source) if not isinstance(source, np.ndarray) else f"{kind} #{index}"


def fit_to_size(
    image: np.ndarray,
    mask: np.ndarray | None,
    size: int | None,
    train: bool,
    fit: Fit,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Bring an (image, mask) pair to ``size`` x ``size``.

    'crop': reflection-pad up to ``size`` if smaller (the mask is reflected the same way, so it stays exact),
    then a random crop (train) or the centre crop. 'resize': the whole frame, via :func:`resize_to`.

    Shape:
        image, mask: (H, W) -> (size, size); size None leaves them as they are.
    """
    if size is None:
        return image, mask
    if fit == "resize":
        image = resize_to(image, size)[0]
        return image, None if mask is None else resize_to(mask, size, order=0)[0]
    if fit != "crop":
        raise ValueError(f"unknown fit {fit!r}; choose 'crop' or 'resize'")
    h, w = image.shape
    pad_h, pad_w = max(0, size - h), max(0, size - w)
    if pad_h or pad_w:
        widths = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))
        image = np.pad(image, widths, mode="reflect")
        mask = None if mask is None else np.pad(mask, widths, mode="reflect")
        h, w = image.shape
    if train:
        r, c = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    else:
        r, c = (h - size) // 2, (w - size) // 2
    image = image[r : r + size, c : c + size]
    return image, None if mask is None else mask[r : r + size, c : c + size]


class _FrameDataset(Dataset):
    """Shared plumbing: lazy loading, per-item generators, fitting and augmentation."""

    def __init__(
        self,
        transform: Callable | None,
        size: int | None,
        train: bool,
        fit: Fit,
        seed: int | None,
        loader: Loader | None,
    ) -> None:
        if size is not None and size < 1:
            raise ValueError(f"size={size} must be >= 1 px (data.image_size)")
        if fit not in ("crop", "resize"):
            raise ValueError(f"unknown fit {fit!r}; choose 'crop' or 'resize' (data.resize_mode)")
        self.transform = transform
        self.size = size
        self.train = train
        self.fit = fit
        self.seed = seed
        self.loader = loader or read_gray
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Vary crops, augmentation and pairings between epochs when a seed is set."""
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        if self.seed is None:
            # Not OS entropy: a training worker seeds torch (train/plumbing.seed_everything), so its run repeats.
            return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        return np.random.default_rng([self.seed, self.epoch, index])

    def _load_image(self, source: ImageSource, index: int) -> np.ndarray:
        name = _name(source, index, "image")
        arr = source if isinstance(source, np.ndarray) else self.loader(source)
        if arr.ndim != 2:
            raise ValueError(f"{name} has shape {arr.shape}; expected a 2-D grayscale frame")
        return to_unit_float(arr, name)

    def _load_mask(self, source: ImageSource, index: int) -> np.ndarray:
        arr = source if isinstance(source, np.ndarray) else self.loader(source)
        if arr.ndim != 2:
            raise ValueError(f"{_name(source, index, 'mask')} has shape {arr.shape}; expected a 2-D mask")
        return (np.asarray(arr) > 0).astype(np.uint8)

    def _prepare(
        self, image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None]:
        image, mask = fit_to_size(image, mask, self.size, self.train, self.fit, rng)
        if self.transform is not None:
            if hasattr(self.transform, "set_random_state"):
                reseed(self.transform, int(rng.integers(2**63)))
            out = self.transform(image=image) if mask is None else self.transform(image=image, mask=mask)
            image, mask = out["image"], out.get("mask", mask)
        image = np.ascontiguousarray(np.clip(image, 0, 1), dtype=np.float32)
        return image, None if mask is None else np.ascontiguousarray(mask, dtype=np.uint8)


def _check_pairs(images: Sequence, masks: Sequence, cls: str) -> None:
    if len(images) != len(masks):
        raise ValueError(f"{cls} got {len(images)} images but {len(masks)} masks")
    if not images:
        raise ValueError(f"{cls} got no images")


class _PairedBase(_FrameDataset):
    def __init__(self, images, masks, transform, size, train, fit, seed, loader, kept_label=None) -> None:
        _check_pairs(images, masks, type(self).__name__)
        super().__init__(transform, size, train, fit, seed, loader)
        self.images, self.masks = list(images), list(masks)
        self.kept_label = kept_label  # a mask value kept as is, not read as a particle (unsure pixels)

    def _load_mask(self, source: ImageSource, index: int) -> np.ndarray:
        mask = super()._load_mask(source, index)
        if self.kept_label is not None:
            raw = source if isinstance(source, np.ndarray) else self.loader(source)
            mask[np.asarray(raw) == self.kept_label] = self.kept_label
        return mask

    def __len__(self) -> int:
        return len(self.images)

    def _pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image = self._load_image(self.images[index], index)
        mask = self._load_mask(self.masks[index], index)
        if image.shape != mask.shape:
            raise ValueError(
                f"{_name(self.images[index], index, 'image')} is {image.shape} but its mask"
                f" {_name(self.masks[index], index, 'mask')} is {mask.shape}"
            )
        image, mask = self._prepare(image, mask, self._rng(index))
        return image, mask


class PairedDataset(_PairedBase):
    """(mask, image) pairs for pix2pix: the mask is the generator input, the image its target.

    Args:
        images: Frames (arrays: uint8/uint16 or float in [0, 1]; or file paths).
        masks: Binary masks (any value > 0 is a particle), same shapes as the images.
        transform: Joint augmentation called as ``transform(image=, mask=)`` (see ``transforms.py``).
        size: Working side, px (None: keep the frames' own size).
        train: Random crops (True) or centre crops (False).
        fit: 'crop' at native scale, or 'resize' the whole frame.
        seed: None: drawn from torch's generator (repeats when torch is seeded), else reproducible per (seed, epoch, index).
        loader: Reads a path to a 2-D array (default :func:`read_gray`).

    Returns (per item):
        dict with ``mask`` (1, S, S) float32 in {-1, 1} (0 where ``unsure_label``), ``image`` (1, S, S) float32
        in [-1, 1] and ``label`` (S, S) int64 in {0, 1}.

    ``unsure_label``: mask value of regions that are neither particle nor background (a pseudo-label's
    unsure pixels); the generator sees 0 there. None: none.
    """

    def __init__(
        self,
        images: Sequence[ImageSource],
        masks: Sequence[ImageSource],
        transform: Callable | None = None,
        size: int | None = None,
        train: bool = True,
        fit: Fit = "crop",
        seed: int | None = None,
        loader: Loader | None = None,
        unsure_label: int | None = None,
    ) -> None:
        super().__init__(images, masks, transform, size, train, fit, seed, loader, unsure_label)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, mask = self._pair(index)
        unsure = mask == self.kept_label if self.kept_label is not None else np.zeros(mask.shape, bool)
        particle = (mask > 0) & ~unsure
        generator_input = np.where(unsure, 0.0, np.where(particle, 1.0, -1.0)).astype(np.float32)
        return {
            "mask": torch.from_numpy(generator_input)[None],
            "image": (torch.from_numpy(image) * 2 - 1)[None],
            "label": torch.from_numpy(particle.astype(np.int64)),
        }


class SegmentationDataset(_PairedBase):
    """(image, label) pairs for NPsSegNet. Arguments as :class:`PairedDataset`, and:

    Args:
        ignore_label: Mask value kept as is, not read as a particle: pixels the loss leaves out (pseudo-labels
            of real frames, ``masks/pseudo.py``). None: every value > 0 is a particle.

    Returns (per item):
        (image, label): image (1, S, S) float32 in [0, 1]; label (S, S) int64 in {0, 1} (or ``ignore_label``).
    """

    def __init__(
        self,
        images: Sequence[ImageSource],
        masks: Sequence[ImageSource],
        transform: Callable | None = None,
        size: int | None = None,
        train: bool = True,
        fit: Fit = "crop",
        seed: int | None = None,
        loader: Loader | None = None,
        ignore_label: int | None = None,
    ) -> None:
        super().__init__(images, masks, transform, size, train, fit, seed, loader, ignore_label)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self._pair(index)
        return torch.from_numpy(image)[None], torch.from_numpy(mask.astype(np.int64))


class UnpairedDataset(_FrameDataset):
    """Two unaligned domains for CycleGAN: A[i] with a randomly drawn B (CycleGAN's unaligned dataset).

    Args:
        images_a: Domain A frames (the 1st generation).
        images_b: Domain B frames (the real stack, subset 2).
        size: Working side, px (None: keep the frames' own size).
        seed: None: drawn from torch's generator (repeats when torch is seeded), else reproducible per (seed, epoch, index).
        transform: Image-only augmentation, applied to A and B independently.
        train: Random crops (True) or centre crops (False).
        fit: 'crop' at native scale, or 'resize' the whole frame.
        loader: Reads a path to a 2-D array (default :func:`read_gray`).

    Returns (per item):
        dict with ``A`` and ``B``, each (1, S, S) float32 in [-1, 1]. Length is max(len A, len B).
    """

    def __init__(
        self,
        images_a: Sequence[ImageSource],
        images_b: Sequence[ImageSource],
        size: int | None = None,
        seed: int | None = None,
        transform: Callable | None = None,
        train: bool = True,
        fit: Fit = "crop",
        loader: Loader | None = None,
    ) -> None:
        if not images_a or not images_b:
            raise ValueError(
                f"UnpairedDataset needs both domains; got {len(images_a)} A and {len(images_b)} B"
            )
        super().__init__(transform, size, train, fit, seed, loader)
        self.images_a, self.images_b = list(images_a), list(images_b)

    def __len__(self) -> int:
        return max(len(self.images_a), len(self.images_b))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self._rng(index)
        ia = index % len(self.images_a)
        ib = int(rng.integers(len(self.images_b)))  # random B breaks fixed A-B pairs, as in CycleGAN
        a, _ = self._prepare(self._load_image(self.images_a[ia], ia), None, rng)
        b, _ = self._prepare(self._load_image(self.images_b[ib], ib), None, rng)
        return {"A": (torch.from_numpy(a) * 2 - 1)[None], "B": (torch.from_numpy(b) * 2 - 1)[None]}
