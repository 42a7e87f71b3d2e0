"""The Ray Data tasks and actor of ``tgan generate`` (:func:`tgan_ray.generate.generate_dataset`): sample the
masks of a block of indices from the prior, turn them into images with pix2pix then CycleGAN, and write each pair's
PNGs, one small manifest row per pair. A pair depends only on (seed, index) and the models, not on which task or
actor made it; :func:`pair_paths` names its files."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from tgan_ray.config import StorageConfig
from tgan_ray.io import storage as st
from tgan_ray.scale_out import local_copy

# S3 puts are latency-bound: a writer task keeps several in flight.
WRITE_THREADS = 8


def sample_masks(
    batch: dict[str, np.ndarray],
    prior: Any,
    size: int,
    seed: int,
    border_policy: str,
    max_empty_fraction: float,
    done: np.ndarray,
):
    """Ray Data task: the masks of the batch's indices that are not written yet.

    Shape:
        batch["id"]: (B,) -> {"index": (b,), "mask": (b, size, size) bool}, b <= B.
    """
    from tgan_ray.masks.sampling import sample_capped_mask_at

    ids = batch["id"].astype(np.int64)
    ids = ids[~np.isin(ids, done)]
    masks = np.zeros((len(ids), size, size), dtype=bool)
    for k, index in enumerate(ids):
        masks[k] = sample_capped_mask_at(prior, size, seed, int(index), max_empty_fraction, border_policy)[0]
    return {"index": ids, "mask": masks}


def _to_u8(images: np.ndarray) -> np.ndarray:
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


class GeneratorActor:
    """Ray Data actor: pix2pix (mask -> 1st generation), then CycleGAN (1st -> 2nd generation).

    Both generators are loaded once per actor. Outputs go back as uint8 (what the PNGs hold), a quarter of
    float32 in the object store.

    Args:
        pix2pix_ref: object-store reference to the pix2pix stage's model.pt bytes (:func:`~tgan_ray.scale_out.read_model`).
        cyclegan_ref: the CycleGAN stage's model.pt bytes, or None for a pix2pix-only dataset.
        device: "cpu" or "cuda".
        batch_size: images per generator call.
        seed: the dataset's seed; pix2pix's noise input for pair i is drawn from (seed, i), so a pair's image,
            like its mask, does not depend on which actor or batch made it.
    """

    def __init__(
        self, pix2pix_ref: list, cyclegan_ref: list | None, device: str, batch_size: int, seed: int = 0
    ):
        from tgan_ray.inference import load_generator
        from tgan_ray.runtime import use_actor_cpus

        use_actor_cpus()
        self.batch_size, self.seed = batch_size, seed
        self.generators = []
        # The refs come wrapped in a list so that Ray hands over the reference, not a copy of the bytes.
        for ref in [pix2pix_ref[0]] + ([cyclegan_ref[0]] if cyclegan_ref else []):
            path = local_copy(ref, ".pt")
            try:
                self.generators.append(load_generator(path, device))
            finally:
                os.unlink(path)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from tgan_ray.inference import run_generator

        noise_seeds = np.array([noise_seed(self.seed, int(i)) for i in batch["index"]], dtype=np.int64)
        first = run_generator(
            self.generators[0], batch["mask"].astype(np.float32), self.batch_size, noise_seeds
        )
        out = {"index": batch["index"], "mask": batch["mask"], "image": _to_u8(first)}
        if len(self.generators) > 1:
            out["gen1"] = out["image"]
            out["image"] = _to_u8(run_generator(self.generators[1], first, self.batch_size))
        return out


def noise_seed(seed: int, index: int) -> int:
    """Seed of pix2pix's noise input for pair ``index`` (a stream apart from the masks' (seed, index))."""
    return int(np.random.SeedSequence([seed, index, 7]).generate_state(1, np.uint32)[0])


def pair_paths(index: int) -> dict[str, str]:
    """Relative paths of pair ``index`` in a generated dataset."""
    name = f"{index:07d}.png"
    return {"image": f"images/{name}", "mask": f"masks/{name}", "gen1": f"gen1/{name}"}


def write_pairs(
    batch: dict[str, np.ndarray], out: str, storage: StorageConfig | None, seed: int, write_gen1: bool
) -> dict[str, np.ndarray]:
    """Ray Data task: write each pair's PNGs (each object atomic) and return one small manifest row per pair."""
    from tgan_ray.io import write_mask_png, write_png

    def write_one(k: int) -> None:
        paths = pair_paths(int(batch["index"][k]))
        write_mask_png(st.join(out, paths["mask"]), batch["mask"][k], storage)
        if write_gen1 and "gen1" in batch:
            write_png(st.join(out, paths["gen1"]), batch["gen1"][k], storage)
        # The image last: a pair counts as done when its image and mask both exist.
        write_png(st.join(out, paths["image"]), batch["image"][k], storage)

    with ThreadPoolExecutor(max_workers=WRITE_THREADS) as pool:
        list(pool.map(write_one, range(len(batch["index"]))))
    return {"index": batch["index"], "seed": np.full(len(batch["index"]), seed, dtype=np.int64)}
