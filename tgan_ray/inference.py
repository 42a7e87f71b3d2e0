"""Inference with trained artefacts: GAN generators (steps 4 and 6) and NPsSegNet on real frames (step 8).

One code path for the pipeline, Ray Data batch jobs and Ray Serve, so a big stack and a single frame at the
microscope get the same masks.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from tgan_ray.config import DataConfig, SegmenterConfig
from tgan_ray.data.tiling import TileMap, inference_tile_side, tile_image, untile


def pick_device(device: str | None = None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 convolutions natively (AVX512-BF16 or AMX); elsewhere oneDNN emulates them."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def inference_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype a network runs in at inference: ``segmenter.inference_precision`` on this device.

    'auto' is bf16 on a GPU and on a CPU with native bf16 (2x faster than fp32 for NPsSegNet on an AVX512-BF16
    EPYC, probabilities within 0.013), fp32 on other CPUs, where emulated bf16 is slower than fp32.
    """
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_bf16() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def load_generator(model_path: str | Path, device: str | torch.device | None = None) -> torch.nn.Module:
    """Rebuild a pix2pix / CycleGAN generator from a stage's ``model.pt``."""
    from tgan_ray.models.networks import define_generator

    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"generator checkpoint not found: {path}")
    artefact = torch.load(path, map_location="cpu", weights_only=True)
    if "generator" not in artefact:
        raise ValueError(f"{path} is not a GAN generator checkpoint (kind={artefact.get('kind')!r})")
    cfg = artefact["config"]
    net = define_generator(
        encoder=cfg["generator_encoder"],
        decoder_channels=tuple(cfg["generator_decoder_channels"]),
        noise_channels=int(cfg.get("noise_channels", 0)),  # pix2pix only; CycleGAN has none
    )
    net.load_state_dict(artefact["generator"])
    return net.to(pick_device(device) if not isinstance(device, torch.device) else device).eval()


@torch.no_grad()
def run_generator(
    generator: torch.nn.Module,
    inputs: np.ndarray,
    batch_size: int = 16,
    noise_seeds: np.ndarray | None = None,
) -> np.ndarray:
    """Images or masks in [0, 1] (N x H x W) -> generated images in [0, 1] (N x H x W, float32).

    Args:
        generator: from :func:`load_generator`.
        inputs: masks (pix2pix) or images (CycleGAN).
        batch_size: inputs per forward pass.
        noise_seeds: one seed per input for a noise-input generator (``NoiseInput``): image i then depends on
            its seed alone, not on batching or on what ran before. None: noise from torch's generator.
    """
    from tgan_ray.models.networks import NoiseInput

    device = next(generator.parameters()).device
    out = []
    for i in range(0, len(inputs), batch_size):
        chunk = np.ascontiguousarray(inputs[i : i + batch_size], dtype=np.float32)
        n = len(chunk)
        # Every forward pass gets exactly batch_size inputs (the last one zero-padded): CPU kernels pick their
        # algorithm, and so their rounding, by batch size, and a pair regenerated alone must be the same image.
        x = torch.from_numpy(
            np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), np.float32)])
        )
        x = x[:, None]
        kwargs = {}
        if isinstance(generator, NoiseInput) and noise_seeds is not None:
            seeds = list(noise_seeds[i : i + batch_size]) + [0] * (batch_size - n)
            maps = [
                torch.randn(
                    (generator.channels, *x.shape[2:]), generator=torch.Generator().manual_seed(int(s))
                )
                for s in seeds
            ]
            kwargs["noise"] = torch.stack(maps)
        # fp32 on every CPU, so that virtual data do not depend on the CPU's instruction set.
        with _autocast(device, torch.bfloat16 if device.type == "cuda" else torch.float32):
            y = generator(x.to(device) * 2 - 1, **kwargs)
        out.append(((y[:n].float().clamp(-1, 1) + 1) / 2)[:, 0].cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,) + inputs.shape[1:], np.float32)


class Segmenter:
    """A trained NPsSegNet with everything needed to segment a real frame at the working scale.

    Inference tiles are decoupled from the training tile: the network is fully convolutional, so it predicts on
    tiles up to ``segmenter.inference_tile`` px, which cuts the work spent on overlaps. Neighbouring tiles overlap
    by ``tile_overlap`` x the training tile, so every tile border keeps the context a training tile had.

    Args:
        model_path: an NPsSegNet checkpoint written by ``save_segmenter`` (or a segmenter stage's model.pt).
        data_cfg: the run's data settings (tile size, scale rule, normalisation percentiles).
        seg_cfg: inference settings (tile size and overlap, tiles per pass, precision).
    """

    def __init__(
        self,
        model_path: str | Path,
        data_cfg: DataConfig | None = None,
        seg_cfg: SegmenterConfig | None = None,
        device: str | None = None,
    ):
        from tgan_ray.models.npssegnet import load_segmenter

        self.device = pick_device(device)
        self.model, self.meta = load_segmenter(str(model_path), map_location="cpu")
        # channels_last: 30% faster on CPU too (oneDNN), measured for NPsSegNet on 2 EPYC cores.
        self.model = self.model.to(self.device, memory_format=torch.channels_last).eval()
        self.data_cfg = data_cfg or DataConfig.from_saved(self.meta.get("data", {}))
        self.seg_cfg = seg_cfg or SegmenterConfig()
        self.dtype = inference_dtype(self.device, self.seg_cfg.inference_precision)
        self.overlap_px = int(round(self.seg_cfg.tile_overlap * self.data_cfg.image_size))
        self.max_tile = max(self.seg_cfg.inference_tile, self.data_cfg.image_size)
        # Smallest particle, px at the working scale: written by the pipeline from its morphology prior.
        self.min_particle_px = float(self.meta.get("min_particle_px") or 0.0)
        # The real particles' signed median contrast to their support (step 2's masks), written by the pipeline;
        # 0 (a checkpoint from elsewhere) keeps faint particles.
        self.particle_contrast = float(self.meta.get("particle_contrast") or 0.0)

    def tile(self, work: np.ndarray) -> tuple[np.ndarray, TileMap]:
        """A frame at the working scale -> its inference tiles (N x S x S) and how to blend them back."""
        side = inference_tile_side(work.shape, self.max_tile, self.overlap_px)
        return tile_image(np.asarray(work, dtype=np.float32), side, self.overlap_px / side)

    @torch.inference_mode()
    def predict_tiles(self, tiles: np.ndarray) -> np.ndarray:
        """Particle probability of a stack of tiles (N x S x S or N x 1 x S x S) -> N x S x S, float32.

        Tiles go through the network ``inference_batch_size`` training tiles' worth of pixels at a time, so
        memory stays what it was at the training tile size whatever the inference tile.
        """
        tiles = np.asarray(tiles, dtype=np.float32).reshape(-1, *np.shape(tiles)[-2:])
        area = self.data_cfg.image_size**2 / max(tiles.shape[-1] * tiles.shape[-2], 1)
        per_pass = max(1, int(self.seg_cfg.inference_batch_size * area))
        out = []
        for i in range(0, len(tiles), per_pass):
            x = torch.from_numpy(np.ascontiguousarray(tiles[i : i + per_pass, None])).to(self.device)
            with _autocast(self.device, self.dtype):
                logits = self.model(x.contiguous(memory_format=torch.channels_last))
            out.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, *tiles.shape[-2:]), np.float32)

    def predict_tile_stacks(self, tile_stacks: list[np.ndarray]) -> list[np.ndarray]:
        """:meth:`predict_tiles` for the tiles of several frames: frames whose tiles have one size share passes.

        Frames of different shapes get different inference tiles (:meth:`tile`), so they are grouped by size.
        """
        out: list[np.ndarray] = [np.empty(0, np.float32)] * len(tile_stacks)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, tiles in enumerate(tile_stacks):
            by_size.setdefault(tuple(tiles.shape[-2:]), []).append(i)
        for members in by_size.values():
            probs = self.predict_tiles(np.concatenate([tile_stacks[i] for i in members]))
            counts = np.cumsum([len(tile_stacks[i]) for i in members])[:-1]
            for i, p in zip(members, np.split(probs, counts), strict=True):
                out[i] = p
        return out

    def tiles_of(self, image: np.ndarray, scale: float | None = None) -> tuple[np.ndarray, TileMap]:
        """A normalised frame at its own resolution -> its inference tiles at the working scale (:meth:`tile`).

        ``scale``: this frame's working scale, where it differs from the model's (another magnification).
        """
        from tgan_ray.data.working import to_working, working_scale

        return self.tile(to_working(image, scale or working_scale(image.shape, self.data_cfg)))

    def blend(self, probs: np.ndarray, tilemap: TileMap, shape: tuple[int, int]) -> np.ndarray:
        """Tile probabilities from :meth:`predict_tiles` -> the frame's probability at its own resolution."""
        from tgan_ray.data.working import to_original

        return to_original(untile(probs, tilemap), shape)

    def probabilities(
        self, images: list[np.ndarray], scales: list[float | None] | None = None
    ) -> list[np.ndarray]:
        """Particle probability of several normalised frames (float32 [0, 1]), each at its own resolution.

        ``scales``: each frame's working scale where it differs from the model's (another magnification).
        The tiles of all the frames go through the network together: a GPU gets full batches from small frames.
        """
        scales = scales or [None] * len(images)
        tiled = [self.tiles_of(im, s) for im, s in zip(images, scales, strict=True)]
        probs = self.predict_tile_stacks([tiles for tiles, _ in tiled])
        return [
            self.blend(p, tilemap, im.shape) for p, (_, tilemap), im in zip(probs, tiled, images, strict=True)
        ]

    def probability(self, image: np.ndarray, scale: float | None = None) -> np.ndarray:
        """Particle probability for a normalised frame (float32 [0, 1]), at the frame's own resolution.

        ``scale``: this frame's working scale, where it differs from the model's (another magnification).
        """
        return self.probabilities([image], [scale])[0]

    def probability_working(self, work: np.ndarray) -> np.ndarray:
        """Particle probability for a frame already at the working scale."""
        tiles, tilemap = self.tile(work)
        return untile(self.predict_tiles(tiles), tilemap)

    def segment_working(self, work: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        """Boolean mask of a frame at the working scale (the self-check, the rough segmenter of later rounds)."""
        return self.working_mask(self.probability_working(work), work, threshold)

    def working_mask(self, probability: np.ndarray, work: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        """Probability of a frame at the working scale -> its cleaned mask, faint particles dropped."""
        return self.drop_faint(clean_mask(probability > threshold, self.min_particle_px), work)

    def segment(self, image: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        """Boolean particle mask of a normalised frame, at its original resolution."""
        return self.to_mask(self.probability(image), threshold, image=image)

    def to_mask(
        self,
        probability: np.ndarray,
        threshold: float = 0.5,
        scale: float | None = None,
        image: np.ndarray | None = None,
        rough: np.ndarray | None = None,
    ) -> np.ndarray:
        """Particle probability at a frame's original resolution -> its cleaned boolean mask.

        ``image``: the normalised frame, to drop the particles fainter than real ones (:meth:`drop_faint`);
        ``rough``: the rough segmenter's mask of the same frame, whose particles then set that bar.
        """
        from tgan_ray.data.working import working_scale

        scale = scale or working_scale(probability.shape, self.data_cfg)
        mask = clean_mask(probability > threshold, self.min_particle_px / scale**2)
        return mask if image is None else self.drop_faint(mask, image, scale, rough)

    def drop_faint(
        self, mask: np.ndarray, image: np.ndarray, scale: float = 1.0, rough: np.ndarray | None = None
    ) -> np.ndarray:
        """The mask without the particles that stand out from their support less than a real particle must.

        The bar is step 6's for a virtual image to show a particle (``segmenter.min_drawn_contrast`` x the real
        particles' median contrast, ``masks/consistency.py``). A network trained on virtual images also marks
        bright grains of a textured support: on real HAADF frames these have a quarter of a particle's contrast
        to their ring of support, or less (docs/quality.md, "Faint particles").

        The real particles are the stack's (step 2's masks, at the working scale), or, given ``rough`` with at
        least ``MIN_MEASURED_PARTICLES`` particles of the contrast's sign, this frame's own, measured on this
        frame the same way: thickness, focus and gain change a particle's contrast from frame to frame, and a
        grainy support's grains rise with it (PtW5: its rough particles 0.22, the grains NPsSegNet marked 0.07, the
        stack's median 0.16, so a bar of 0.05 let most grains through).

        Args:
            mask: (H, W) bool; image: the normalised frame, same shape; scale: its working scale (the ring
                of support is ``RING_PX`` wide at the working scale); rough: (H, W) bool or None.
        """
        from tgan_ray.masks.classical import MIN_MEASURED_PARTICLES
        from tgan_ray.masks.consistency import RING_PX, particle_contrast, undrawn_particles

        ring_px = max(1, round(RING_PX / scale))
        reference = self.particle_contrast
        if rough is not None and reference:
            contrast = particle_contrast(image, rough, ring_px)[0]
            contrast = contrast[np.isfinite(contrast) & (np.sign(contrast) == np.sign(reference))]
            if len(contrast) >= MIN_MEASURED_PARTICLES:
                reference = float(np.median(contrast))
        faint = undrawn_particles(image, mask, reference, self.seg_cfg.min_drawn_contrast, ring_px)
        return mask & ~faint


def clean_mask(mask: np.ndarray, min_area: float) -> np.ndarray:
    """Drop objects and fill holes of at most ``min_area`` px: specks of noise are not particles.

    A network trained on virtual images marks a few single-digit-pixel specks of shot noise or support texture.
    Real particles are never smaller than the morphology prior's smallest ones, so these can only be errors.
    """
    from skimage.morphology import remove_small_holes, remove_small_objects

    if min_area < 1 or not mask.any():
        return mask
    area = max(int(min_area), 1)
    return remove_small_holes(remove_small_objects(mask, max_size=area), max_size=area)
