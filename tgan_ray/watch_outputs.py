"""The watch loop's output folder: the ledger of frames sent, the particle table and the running summary.

:class:`WatchOutputs` owns everything under ``out_dir``: ``sent.json`` (the ledger, written atomically, so each
frame is sent once across restarts), ``particles.csv`` (appended per frame and cut back to the ledger on restart),
and, rewritten from every particle so far, ``running_summary.json`` (with the per-frame mean diameters, their
bootstrap intervals and the drift), ``psd.png``, ``mean_diameter.png`` and ``particles.parquet``.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tgan_ray.analysis.particles import PARTICLE_COLUMNS

__all__ = [
    "FRAME_COLUMNS",
    "LEDGER",
    "PARTICLES_CSV",
    "PARTICLES_PARQUET",
    "PSD_PNG",
    "SERIES_PNG",
    "SUMMARY_JSON",
    "WatchOutputs",
]

_log = logging.getLogger("tgan_ray.watch")  # the watch loop's logger: one stream for `tgan watch`

LEDGER = "sent.json"
PARTICLES_CSV = "particles.csv"
SUMMARY_JSON = "running_summary.json"
PSD_PNG = "psd.png"
SERIES_PNG = "mean_diameter.png"
PARTICLES_PARQUET = "particles.parquet"
FRAME_COLUMNS = ("frame_index", "file", "acquired_at")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class WatchOutputs:
    """Output folder state: the ledger, the particle table and the running summary."""

    def __init__(self, out_dir: Path):
        self.out = out_dir
        self.out.mkdir(parents=True, exist_ok=True)
        self.ledger_path = out_dir / LEDGER
        self.csv_path = out_dir / PARTICLES_CSV
        try:
            ledger = json.loads(self.ledger_path.read_text()) if self.ledger_path.is_file() else {}
        except ValueError:
            raise ValueError(
                f"{self.ledger_path} is not a valid watch ledger; move it away to send every frame again"
            ) from None
        self.frames: dict[str, dict[str, Any]] = ledger.get("frames", {})
        self.csv_bytes = int(ledger.get("csv_bytes", 0))
        self._repair_csv()
        self.table = self._load_table()

    def _repair_csv(self) -> None:
        # Rows written after the last ledger update belong to a frame the ledger does not know: cut them, the
        # frame is sent again. A CSV shorter than the ledger says cannot be repaired by cutting; keep it.
        if self.csv_path.is_file() and self.csv_path.stat().st_size > self.csv_bytes:
            with open(self.csv_path, "r+b") as f:
                f.truncate(self.csv_bytes)
            _log.warning("cut %s back to the last frame in %s", self.csv_path, self.ledger_path)

    def _load_table(self) -> pd.DataFrame:
        if self.csv_path.is_file() and self.csv_path.stat().st_size > 0:
            return pd.read_csv(self.csv_path)
        return pd.DataFrame(columns=[*FRAME_COLUMNS, *PARTICLE_COLUMNS])

    @property
    def next_index(self) -> int:
        return 1 + max((int(f.get("frame_index", -1)) for f in self.frames.values()), default=-1)

    def record(self, rel: str, stat: os.stat_result, response: dict[str, Any]) -> dict[str, Any]:
        """Append the frame's particles to the CSV, then the frame to the ledger (in that order: see repair)."""
        index = self.next_index
        acquired = datetime.fromtimestamp(stat.st_mtime, timezone.utc).isoformat()
        rows = pd.DataFrame(response.get("particles") or [], columns=list(PARTICLE_COLUMNS))
        rows.insert(0, "acquired_at", acquired)
        rows.insert(0, "file", rel)
        rows.insert(0, "frame_index", index)
        new_file = not self.csv_path.is_file() or self.csv_path.stat().st_size == 0
        with open(self.csv_path, "a", newline="") as f:
            rows.to_csv(f, header=new_file, index=False)
            f.flush()
            os.fsync(f.fileno())
        self.csv_bytes = self.csv_path.stat().st_size
        if not rows.empty:
            self.table = rows if self.table.empty else pd.concat([self.table, rows], ignore_index=True)
        summary = response.get("summary") or {}
        entry = {
            "status": "sent",
            "frame_index": index,
            "size": stat.st_size,
            "mtime": stat.st_mtime,
            "mtime_ns": stat.st_mtime_ns,
            "acquired_at": acquired,
            "sent_at": datetime.now(timezone.utc).isoformat(),
            "count": summary.get("count"),
            "mean_diameter": summary.get("mean"),
            "mean_diameter_ci95": _mean_interval(rows, seed=index),
            "unit": summary.get("unit"),
            "pixel_size_nm": response.get("pixel_size_nm"),
            "model": response.get("model"),
        }
        self.frames[rel] = entry
        self.save_ledger()
        return entry

    def reject(self, rel: str, stat: os.stat_result, reason: str) -> None:
        self.frames[rel] = {
            "status": "rejected",
            "reason": reason,
            "size": stat.st_size,
            "mtime": stat.st_mtime,
            "mtime_ns": stat.st_mtime_ns,
        }
        self.save_ledger()

    def is_done(self, rel: str, size: int, mtime_ns: int) -> bool:
        """Sent, or rejected in exactly this state. A rejected file that changed since (a writer that paused
        longer than the settle time, then finished it) is tried again."""
        entry = self.frames.get(rel)
        if entry is None:
            return False
        if entry.get("status") == "sent":
            return True
        return (entry.get("size"), entry.get("mtime_ns")) == (size, mtime_ns)

    def save_ledger(self) -> None:
        _atomic_write_text(
            self.ledger_path, json.dumps({"csv_bytes": self.csv_bytes, "frames": self.frames}, indent=1)
        )

    def write_summary(self) -> dict[str, Any]:
        """Rewrite running_summary.json, psd.png, mean_diameter.png and particles.parquet from every particle
        so far."""
        from tgan_ray.analysis import plot_psd, psd_summary, write_particles_parquet, write_summary
        from tgan_ray.analysis.plots import plot_mean_series

        table = self.table
        if not table.empty and table["unit"].nunique() > 1:
            # A folder mixing calibrated and uncalibrated frames: summarise the latest frame's unit only.
            unit = table["unit"].iloc[-1]
            table = table[table["unit"] == unit]
        sent = {k: v for k, v in self.frames.items() if v.get("status") == "sent"}
        psd = psd_summary(table, images=sorted(sent))
        psd.pop("per_image", None)  # the per-frame series below says the same, in acquisition order
        series = sorted(
            (
                {
                    "frame_index": v["frame_index"],
                    "file": k,
                    "acquired_at": v["acquired_at"],
                    "mtime": v["mtime"],
                    "count": v.get("count"),
                    "mean_diameter": v.get("mean_diameter"),
                    "mean_diameter_ci95": v.get("mean_diameter_ci95"),
                }
                for k, v in sent.items()
            ),
            key=lambda r: r["frame_index"],
        )
        summary = {
            "frames": len(sent),
            "rejected": sum(v.get("status") == "rejected" for v in self.frames.values()),
            "count": psd["count"],
            "mean_diameter": psd["mean"],
            "unit": psd["unit"],
            "drift": _drift(series),
            "psd": psd,
            "per_frame": series,
            "updated_at": datetime.now(timezone.utc).isoformat(),
        }
        write_summary(summary, self.out / SUMMARY_JSON)
        plot_psd(table, psd, self.out / PSD_PNG)
        plot_mean_series(series, psd["unit"], self.out / SERIES_PNG)
        write_particles_parquet(self.table, self.out / PARTICLES_PARQUET)
        return summary


def _mean_interval(particles: pd.DataFrame, seed: int) -> list[float] | None:
    """95% bootstrap interval [low, high] of one frame's mean diameter, resampling its interior particles."""
    from tgan_ray.analysis.bootstrap import bootstrap_psd

    if particles.empty:
        return None
    interior = particles.loc[~particles["touches_border"].astype(bool), "equivalent_diameter"]
    ci = bootstrap_psd(interior.to_numpy(dtype=float), None, seed=seed, statistics=("mean",))
    return None if ci is None else [ci["mean"]["low"], ci["mean"]["high"]]


def _drift(series: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Linear trend of the per-frame mean diameter, per frame and per minute of acquisition time."""
    from scipy import stats

    points = [r for r in series if r["mean_diameter"] is not None]
    if len(points) < 2:
        return None
    index = np.array([r["frame_index"] for r in points], float)
    minutes = np.array([r["mtime"] for r in points], float) / 60.0
    mean_d = np.array([r["mean_diameter"] for r in points], float)
    per_frame = stats.linregress(index, mean_d) if np.ptp(index) > 0 else None
    per_minute = stats.linregress(minutes - minutes.min(), mean_d) if np.ptp(minutes) > 0 else None

    def finite(x: float | None) -> float | None:
        return float(x) if x is not None and np.isfinite(x) else None

    return {
        "frames": len(points),
        "first": float(mean_d[0]),
        "last": float(mean_d[-1]),
        "per_frame": finite(per_frame.slope) if per_frame else None,
        "per_minute": finite(per_minute.slope) if per_minute else None,
        "r": finite(per_frame.rvalue) if per_frame else None,
    }
