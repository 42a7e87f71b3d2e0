"""The image history that CycleGAN shows its discriminators (the reference's ``util/image_pool.py``).

Not a network: a plain buffer of generated images with its own random generator, seeded so that runs repeat.
"""

from __future__ import annotations

import random

import torch

__all__ = ["ImagePool"]


class ImagePool:
    """History of generated images shown to a discriminator (Shrivastava et al. 2017, used by CycleGAN).

    Until the pool is full every image is stored and returned. After that, each image is, with probability 1/2,
    swapped for a random stored one (which is returned), and otherwise returned as is.

    Args:
        pool_size: Images kept; 0 disables the pool (``query`` returns its input).
        seed: Seed of the pool's own random generator. None draws it from torch's generator, as the datasets do,
            so a run seeded with ``torch.manual_seed`` (every training worker is) repeats; an unseeded
            ``random.Random()`` made CycleGAN, and every step after it, differ from run to run.
    """

    def __init__(self, pool_size: int = 50, seed: int | None = None):
        if pool_size < 0:
            raise ValueError(f"pool_size must be >= 0, got {pool_size}")
        self.pool_size = pool_size
        self.images: list[torch.Tensor] = []
        if seed is None:
            seed = int(torch.randint(2**62, ()).item())
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.images)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """Mix a batch of generated images with the history.

        Args:
            images: Generated images; they are detached before storing.

        Returns:
            A batch of the same shape and dtype, detached from any graph.

        Shape:
            (N, C, H, W) -> (N, C, H, W).
        """
        images = images.detach()
        if self.pool_size == 0:
            return images
        out = []
        for image in images:
            if len(self.images) < self.pool_size:
                self.images.append(image.clone())
                out.append(image)
            elif self._rng.random() > 0.5:
                idx = self._rng.randrange(self.pool_size)
                out.append(self.images[idx].to(image.dtype))
                self.images[idx] = image.clone()
            else:
                out.append(image)
        return torch.stack(out, 0)
