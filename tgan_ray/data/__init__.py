"""Data: synthetic EM stacks, stack splitting (step 1), tiling/resizing, augmentation and torch datasets.

``transforms`` (albumentations, OpenCV) and ``datasets`` (torch) are imported on first use, so code that only
splits a stack or tiles a frame does not pay for them.
"""

from __future__ import annotations

import importlib
from typing import Any

from .splits import StackSplit, split_stack
from .synthetic import SynthConfig, make_image, make_stack, render_layers, synth_config
from .tiling import (
    TileMap,
    resize_to,
    restore,
    sliding_window_predict,
    tile_image,
    to_working_size,
    unresize,
    untile,
)

_LAZY = {
    "train_transform": "transforms",
    "test_transform": "transforms",
    "PairedDataset": "datasets",
    "UnpairedDataset": "datasets",
    "SegmentationDataset": "datasets",
    "read_gray": "datasets",
}

__all__ = [
    "StackSplit",
    "split_stack",
    "SynthConfig",
    "make_image",
    "make_stack",
    "render_layers",
    "synth_config",
    "TileMap",
    "resize_to",
    "restore",
    "sliding_window_predict",
    "tile_image",
    "to_working_size",
    "unresize",
    "untile",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
