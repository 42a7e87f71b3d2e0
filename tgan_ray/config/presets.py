"""The named presets (``paper``, ``quick``, ``cpu``) and how override layers merge onto each other.

A preset is a nested dict of overrides on the paper defaults (the ``paper`` preset is empty), kept as data so
`tgan config --preset quick` can print it. :func:`deep_merge` is the one rule by which every layer (preset, YAML
file, ``--set``) lands on the one below; :func:`auto_preset` picks the preset that fits this machine.
"""

from __future__ import annotations

from typing import Any


def deep_merge(base: dict, update: dict) -> dict:
    """``base`` with ``update`` on top: nested dicts merge key by key, any other value replaces."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


_LIGHT_GENERATOR = {
    # A 0.4M-parameter timm encoder: about 4x faster than ResNet-18 per GAN step on a CPU.
    "generator_encoder": "tu-mobilenetv3_small_050",
    "generator_decoder_channels": [64, 32, 16, 16, 8],
    "discriminator_width": 16,
}
_QUICK: dict[str, Any] = {
    "data": {
        "image_size": 64,
        "resize_mode": "tile",
        "target_particle_px": 12,
        "subset1_size": 3,
        "test_fraction": 0.2,
        "real_crops": 64,
    },
    # Sparse stacks leave most 64 px tiles empty: 400 masks still give the segmenter a few hundred particles.
    "prior": {"n_masks": 400},
    "pix2pix": {
        "epochs": 30,
        "epochs_decay": 10,
        "batch_size": 4,
        "steps_per_epoch": 10,
        "eval_every": 10,
        "eval_images": 16,
        **_LIGHT_GENERATOR,
    },
    "cyclegan": {
        "epochs": 15,
        "epochs_decay": 5,
        "batch_size": 4,
        "steps_per_epoch": 10,
        "eval_every": 5,
        "eval_images": 16,
        "pool_size": 16,
        **_LIGHT_GENERATOR,
    },
    "segmenter": {
        "encoder": "resnet18",
        # UNet++'s nested decoder dominates its cost: narrow widths make CPU training and inference ~10x cheaper.
        "decoder_channels": [64, 32, 16, 16, 8],
        "epochs": 20,
        "batch_size": 8,
        "steps_per_epoch": 10,
        "lr": 1e-3,
        "val_every": 2,
        "real_fraction": 0.5,
    },
    # Every local CPU to the one worker: one thread left a core idle on a 2-core machine.
    "ray": {"num_workers": 1, "cpus_per_worker": None},
    "tracking": {"sample_every": 10},
}
# A first run on a CPU (2 cores: about half an hour for ten 2048² frames): the quick networks, 2x larger tiles so
# the generators see the support's thickness gradients, and twice the steps; NPsSegNet also learns from real crops.
_CPU: dict[str, Any] = deep_merge(
    _QUICK,
    {
        "data": {"image_size": 128, "target_particle_px": 14, "subset1_size": 5, "real_crops": 96},
        "prior": {"n_masks": 400},
        # Step 2's unsure pixels as pix2pix's third input value (PtW end to end: label-free F1 0.799-0.803 -> 0.819).
        "pix2pix": {
            "epochs": 40,
            "epochs_decay": 10,
            "steps_per_epoch": 12,
            "eval_every": 10,
            "unsure_input": True,
        },
        "cyclegan": {"epochs": 20, "epochs_decay": 5, "steps_per_epoch": 12, "eval_every": 5},
        # Masked particles neither generation drew are left out of the loss (Ru end to end: F1 0.591 -> 0.688).
        "segmenter": {
            "epochs": 30,
            "steps_per_epoch": 12,
            "val_every": 3,
            "inference_batch_size": 4,
            "ignore_undrawn": True,
        },
    },
)
PRESETS: dict[str, dict[str, Any]] = {"paper": {}, "quick": _QUICK, "cpu": _CPU}


def auto_preset() -> str:
    """The preset that fits this machine: ``paper`` with a CUDA GPU, else ``cpu`` (the paper's takes days there)."""
    import torch

    return "paper" if torch.cuda.is_available() else "cpu"
