"""What the pipeline's steps share: the error type, PNG folders as arrays, and small helpers."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from tgan_ray.config import Config, config_to_dict, flatten_config


class PipelineError(ValueError):
    """A run that cannot go on: the message says why and what to change."""


def load_pngs(folder: Path, names: list[str], is_mask: bool = False) -> np.ndarray:
    from PIL import Image

    from tgan_ray.io import read_mask_png

    if is_mask:
        return np.stack([read_mask_png(folder / n).astype(np.uint8) for n in names])
    return np.stack([np.asarray(Image.open(folder / n)).astype(np.float32) / 255 for n in names])


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(flat(v, key) if isinstance(v, dict) else {key: v})
    return out


@contextlib.contextmanager
def quiet_ray_data():
    """No Ray Data progress bars inside the pipeline: each step prints its own summary line instead."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    try:
        yield
    finally:
        ctx.enable_progress_bars = before


def spread(n: int, most: int = 8) -> list[int]:
    """Up to ``most`` indices spread evenly over ``n`` frames: the frames that fix a stack's contrast and radii."""
    return sorted({round(i) for i in np.linspace(0, n - 1, min(n, most))})


def own_scales(stack: dict) -> dict[str, float] | None:
    """stem -> working scale of the frames step 1 gave their own scale (another magnification); None if none."""
    own = {f["stem"]: f["scale"] for f in stack["frames"] if f.get("scale") != stack["scale"]}
    return own or None


def sidecar_pixel_size(first_uri: str) -> float | None:
    """A stack-wide calibration file, ``pixel_size.json`` ({"pixel_size_nm": ...}), beside or above the images.

    PNG and JPEG carry no calibration; `tgan synth` writes this file, and users can too.
    """
    if str(first_uri).startswith("s3://"):
        return None
    folder = Path(first_uri).parent
    for candidate in (folder / "pixel_size.json", folder.parent / "pixel_size.json"):
        if candidate.is_file():
            try:
                value = json.loads(candidate.read_text()).get("pixel_size_nm")
            except (json.JSONDecodeError, AttributeError):
                raise PipelineError(f"{candidate} is not valid JSON with a pixel_size_nm number") from None
            if value is not None and (not isinstance(value, (int, float)) or value <= 0):
                raise PipelineError(f"{candidate}: pixel_size_nm must be a positive number, got {value!r}")
            return value
    return None


def count_particles(mask: np.ndarray) -> int:
    from skimage.measure import label

    return int(label(mask).max())


def load_mask(path: Path) -> np.ndarray:
    from tgan_ray.io import read_mask_png

    return read_mask_png(path)


def save_pngs_named(folder: Path, stems: list[str], masks: list[np.ndarray]) -> None:
    from tgan_ray.io import write_mask_png

    folder.mkdir(parents=True, exist_ok=True)
    for s, m in zip(stems, masks):
        write_mask_png(folder / f"{s}.png", m)


def check_same_config(run_dir: Path | str, saved: dict | None, cfg: Config) -> None:
    """Refuse to resume ``run_dir`` with other settings than it started with.

    A run started by an older version lacks the options added since: each counts as unchanged while it keeps its
    default (the behaviour before it existed), so an upgrade does not strand a half-finished run.
    """
    if saved is None or saved == config_to_dict(cfg):
        return
    before, defaults = flat(saved), flatten_config(Config())
    changed = sorted(k for k, v in flatten_config(cfg).items() if before.get(k, defaults.get(k)) != v)
    if changed:
        raise PipelineError(
            f"run folder {run_dir} was started with a different config ({', '.join(changed[:5])}); "
            "use a new --out, or the same settings to resume"
        )
