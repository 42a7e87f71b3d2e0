"""Getting real frames to the training size and predictions back to the original pixels.

Two ways, chosen by ``data.resize_mode``:

- ``resize``: the whole frame is padded to a square (by reflection) and resized to ``size`` (the paper: 512x512).
  Particle sizes measured at working scale are converted back with :meth:`TileMap.effective_pixel_size_nm`.
- ``tile``: the frame is cut into overlapping ``size`` tiles at native scale (reflection-padded at the edges so
  every tile is full size); predictions are blended back with a linear cross-fade window. This is the sliding
  window used on 2048x2048 micrographs.

Both return a :class:`TileMap` that records how to undo them.

    tiles, tmap = to_working_size(frame, 512, mode="tile", overlap=0.25)
    prob = restore(model(tiles), tmap)                     # back to frame.shape
    prob = sliding_window_predict(predict_fn, frame, 512)  # the same, batched
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from skimage.transform import resize

ResizeMode = Literal["resize", "tile"]


@dataclass
class TileMap:
    """How a frame was brought to the working size, so predictions map back to original pixels.

    Attributes:
        original_shape: (H, W) of the original frame.
        mode: 'resize' (one resized square) or 'tile' (native-scale tiles).
        tile_size: Working side, px.
        scale: Original px per working px (1.0 for tiles).
        pad: (top, bottom, left, right) reflection padding added to the original frame, original px.
        boxes: (row, col) top-left corner of each tile in the padded frame.
        overlap_px: Overlap between neighbouring tiles, px.
    """

    original_shape: tuple[int, int]
    mode: ResizeMode
    tile_size: int
    scale: float = 1.0
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)
    boxes: list[tuple[int, int]] = field(default_factory=list)
    overlap_px: int = 0

    @property
    def n_tiles(self) -> int:
        return len(self.boxes)

    def effective_pixel_size_nm(self, original_nm: float) -> float:
        """Pixel size of the working-scale image: original pixel size times the scale factor."""
        return float(original_nm) * self.scale

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (for manifests and Ray Data rows)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TileMap:
        return cls(
            original_shape=tuple(data["original_shape"]),
            mode=data["mode"],
            tile_size=int(data["tile_size"]),
            scale=float(data["scale"]),
            pad=tuple(data["pad"]),
            boxes=[tuple(b) for b in data["boxes"]],
            overlap_px=int(data["overlap_px"]),
        )


def _check_2d(img: np.ndarray, what: str) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 2 or 0 in img.shape:
        raise ValueError(f"{what} must be a non-empty 2-D (H, W) array, got shape {img.shape}")
    return img


def resize_to(img: np.ndarray, size: int, order: int = 1) -> tuple[np.ndarray, TileMap]:
    """Pad a frame to a square (reflection, centred) and resize it to ``size`` x ``size``.

    Padding first keeps pixels square, so one scale factor converts sizes back to nm.

    Args:
        img: Frame.
        size: Working side, px.
        order: Spline order (1 for images, 0 for masks and labels; 0 keeps the dtype).

    Returns:
        (resized, tilemap). Images come back float32; order 0 keeps the input dtype.

    Shape:
        img: (H, W) -> resized: (size, size).
    """
    img = _check_2d(img, "resize_to image")
    h, w = img.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    pad = (top, side - h - top, left, side - w - left)
    square = np.pad(img, ((pad[0], pad[1]), (pad[2], pad[3])), mode="reflect")
    out = resize(
        square,
        (size, size),
        order=order,
        preserve_range=True,
        anti_aliasing=bool(order) and side > size,  # smooth before shrinking so noise does not alias
    )
    out = out.astype(img.dtype) if order == 0 else out.astype(np.float32)
    return out, TileMap((h, w), "resize", size, scale=side / size, pad=pad, boxes=[(0, 0)])


def unresize(pred: np.ndarray, tilemap: TileMap, order: int = 1) -> np.ndarray:
    """Undo :func:`resize_to`: resize back to the padded square, then crop the padding.

    Shape:
        pred: (size, size) or (C, size, size) -> (H, W) or (C, H, W).
    """
    pred = np.asarray(pred)
    top, bottom, left, right = tilemap.pad
    h, w = tilemap.original_shape
    side = max(h, w)
    out_shape = (*pred.shape[:-2], side, side)
    out = resize(pred, out_shape, order=order, preserve_range=True, anti_aliasing=False)
    out = out.astype(pred.dtype) if order == 0 else out.astype(np.float32)
    return out[..., top : top + h, left : left + w]


def _axis_layout(length: int, size: int, stride: int, margin: int) -> tuple[int, int, int]:
    """Tiles along one axis: (count, padding before, padding after)."""
    if length <= size:  # one tile, the frame centred in it: as much context as the frame has
        return 1, (size - length) // 2, size - length - (size - length) // 2
    needed = length + 2 * margin
    count = 1 if needed <= size else math.ceil((needed - size) / stride) + 1
    total = (count - 1) * stride + size
    return count, margin, total - length - margin


def tile_image(img: np.ndarray, size: int, overlap: float = 0.25) -> tuple[np.ndarray, TileMap]:
    """Cut a frame into overlapping full-size tiles at native scale.

    The frame is reflection-padded by half an overlap on every side (so border pixels have context) and at the
    far edges as needed, so frames of any shape, including ones smaller than a tile, give full tiles.

    Args:
        img: Frame.
        size: Tile side, px.
        overlap: Fraction of a tile shared with each neighbour, in [0, 1).

    Returns:
        (tiles, tilemap).

    Shape:
        img: (H, W) -> tiles: (N, size, size), row-major order.
    """
    img = _check_2d(img, "tile_image image")
    if size < 1:
        raise ValueError(f"tile size must be >= 1 px, got {size}")
    if not 0 <= overlap < 1:
        raise ValueError(f"tile overlap={overlap} must be a fraction in [0, 1) (segmenter.tile_overlap)")
    overlap_px = min(int(round(overlap * size)), size - 1)
    stride = size - overlap_px
    margin = overlap_px // 2
    n_rows, top, bottom = _axis_layout(img.shape[0], size, stride, margin)
    n_cols, left, right = _axis_layout(img.shape[1], size, stride, margin)
    padded = np.pad(img, ((top, bottom), (left, right)), mode="reflect" if min(img.shape) > 1 else "edge")
    boxes = [(r * stride, c * stride) for r in range(n_rows) for c in range(n_cols)]
    tiles = np.stack([padded[r : r + size, c : c + size] for r, c in boxes])
    tilemap = TileMap(img.shape, "tile", size, 1.0, (top, bottom, left, right), boxes, overlap_px)
    return tiles, tilemap


def inference_tile_side(shape: tuple[int, int], max_side: int, overlap_px: int, multiple: int = 32) -> int:
    """Square tile side (a multiple of ``multiple``, at most ``max_side``) that covers a frame in the fewest tiles.

    The fewest tiles of at most ``max_side`` are found first, then shrunk to just cover the frame: a 1664 px
    frame with 512 px tiles and 32 px overlap takes 4 x 4 tiles of 448 px (1.16x the frame's pixels), not
    4 x 4 of 512 (1.5x).
    """
    if max_side < multiple or max_side % multiple:
        raise ValueError(f"inference tile side {max_side} must be a positive multiple of {multiple}")
    margin = overlap_px // 2
    side = multiple
    for length in shape:
        if length <= max_side:  # one tile holds the axis: tile_image centres the frame in it, no overlap
            fit = length
        else:
            needed = length + 2 * margin
            count = math.ceil((needed - overlap_px) / (max_side - overlap_px))
            fit = math.ceil((needed - overlap_px) / count) + overlap_px
        side = max(side, min(max_side, multiple * math.ceil(fit / multiple)))
    return side


def blend_window(size: int, overlap_px: int) -> np.ndarray:
    """Linear cross-fade weights: neighbouring tiles' weights sum to 1 across an overlap.

    The floor keeps the padded border (covered by one tile only) from dividing by ~0.

    Shape:
        (size, size) float64.
    """
    if overlap_px <= 0:
        return np.ones((size, size))
    i = np.arange(size)
    ramp = np.clip(np.minimum(i + 0.5, size - 0.5 - i) / overlap_px, 1e-3, 1.0)
    return np.outer(ramp, ramp)


def untile(tiles_pred: np.ndarray, tilemap: TileMap) -> np.ndarray:
    """Blend tile predictions back into one frame with :func:`blend_window` weights.

    Shape:
        tiles_pred: (N, S, S) or (N, C, S, S) -> (H, W) or (C, H, W), float32.
    """
    tiles_pred = np.asarray(tiles_pred)
    s = tilemap.tile_size
    if (
        tiles_pred.ndim not in (3, 4)
        or tiles_pred.shape[0] != tilemap.n_tiles
        or tiles_pred.shape[-2:] != (s, s)
    ):
        raise ValueError(
            f"untile expects ({tilemap.n_tiles}, [C,] {s}, {s}) tile predictions, got shape {tiles_pred.shape}"
        )
    top, bottom, left, right = tilemap.pad
    h, w = tilemap.original_shape
    lead = tiles_pred.shape[1:-2]
    acc = np.zeros((*lead, h + top + bottom, w + left + right))
    weight = np.zeros((h + top + bottom, w + left + right))
    window = blend_window(s, tilemap.overlap_px)
    for tile, (r, c) in zip(tiles_pred, tilemap.boxes, strict=True):
        acc[..., r : r + s, c : c + s] += tile * window
        weight[r : r + s, c : c + s] += window
    return (acc / weight)[..., top : top + h, left : left + w].astype(np.float32)


def to_working_size(
    img: np.ndarray, size: int, mode: ResizeMode = "resize", overlap: float = 0.25, order: int = 1
) -> tuple[np.ndarray, TileMap]:
    """Either :func:`resize_to` or :func:`tile_image` (``data.resize_mode``), always as a stack of tiles.

    Shape:
        img: (H, W) -> (N, size, size); N = 1 for 'resize'.
    """
    if mode == "resize":
        out, tilemap = resize_to(img, size, order=order)
        return out[None], tilemap
    if mode == "tile":
        return tile_image(img, size, overlap)
    raise ValueError(f"unknown resize mode {mode!r}; choose 'resize' or 'tile' (data.resize_mode)")


def restore(pred: np.ndarray, tilemap: TileMap, order: int = 1) -> np.ndarray:
    """Map working-size predictions back to the original frame (inverse of :func:`to_working_size`).

    Shape:
        pred: (N, [C,] S, S) -> ([C,] H, W).
    """
    if tilemap.mode == "resize":
        return unresize(np.asarray(pred)[0], tilemap, order=order)
    return untile(pred, tilemap)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; torch is not imported here so this module stays light
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def sliding_window_predict(
    predict_fn: Callable[[Any], Any],
    image: np.ndarray,
    tile: int,
    overlap: float = 0.25,
    batch_size: int = 8,
    as_torch: bool = False,
) -> np.ndarray:
    """Run a per-tile model over a frame of any size and blend the tiles into one probability map.

    Args:
        predict_fn: Maps a float32 batch (numpy, or torch if ``as_torch``) to probabilities of the same shape.
        image: Frame, float (e.g. normalised to [0, 1]).
        tile: Tile side, px (the model's working size).
        overlap: Fraction of a tile shared with each neighbour (``segmenter.tile_overlap``).
        batch_size: Tiles per call (``segmenter.inference_batch_size``).
        as_torch: Pass ``torch.Tensor`` batches instead of numpy arrays.

    Returns:
        Probability map, float32.

    Shape:
        image: (H, W); predict_fn: (B, 1, tile, tile) -> (B, 1, tile, tile) or (B, tile, tile); out: (H, W).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1 (segmenter.inference_batch_size)")
    tiles, tilemap = tile_image(np.asarray(image, dtype=np.float32), tile, overlap)
    preds = []
    for start in range(0, len(tiles), batch_size):
        batch = tiles[start : start + batch_size, None]
        if as_torch:
            import torch

            batch = torch.from_numpy(np.ascontiguousarray(batch))
        out = _to_numpy(predict_fn(batch))
        if out.shape not in ((len(batch), 1, tile, tile), (len(batch), tile, tile)):
            raise ValueError(
                f"predict_fn returned shape {out.shape} for a batch of shape {tuple(batch.shape)};"
                f" expected ({len(batch)}, 1, {tile}, {tile})"
            )
        preds.append(out.reshape(len(batch), tile, tile))
    return untile(np.concatenate(preds), tilemap)
