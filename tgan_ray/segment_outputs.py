"""The tables and summaries ``tgan segment`` (:func:`tgan_ray.segment.segment_stack`) writes on the driver from its
actors' rows: every particle streamed into ``particles.parquet``, the whole stack's PSD and the per-image summaries
in ``summary.json``, and ``images.parquet`` (one row per image), written last as the commit. The masks themselves
are written by the actors (:mod:`tgan_ray.segment_actor`)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from typing import Any

import numpy as np

from tgan_ray.config import StorageConfig
from tgan_ray.io import storage as st
from tgan_ray.segment_actor import STATUS_ERROR, STATUS_REUSED, STATUS_SEGMENTED

IMAGE_COLUMNS = (
    "image", "source", "status", "reason", "mask", "pixel_size_nm", "unit", "height", "width",
    "particle_count", "border_count", "uncertainty", "lead",
)  # fmt: skip


def _particle_schema():
    import pyarrow as pa

    floats = "centroid_x centroid_y area equivalent_diameter major_axis minor_axis eccentricity circularity"
    floats = floats.split() + ["solidity"]
    return pa.schema(
        [("image", pa.string()), ("particle_id", pa.int64())]
        + [(c, pa.float64()) for c in floats]
        + [
            ("touches_border", pa.bool_()),
            ("unit", pa.string()),
            ("source", pa.string()),
            ("pixel_size_nm", pa.float64()),
        ]
    )


class ParticleSink:
    """Streams particle tables into one local Parquet file; published to ``out`` at the end."""

    def __init__(self):
        import pyarrow.parquet as pq

        self.schema = _particle_schema()
        fd, self.path = tempfile.mkstemp(suffix=".parquet", prefix="tgan-particles-")
        os.close(fd)
        self.writer = pq.ParquetWriter(self.path, self.schema)
        self.rows, self.closed = 0, False

    def add(self, ipc: bytes, source: str, pixel_size_nm: float | None) -> None:
        import pyarrow as pa

        table = pa.ipc.open_stream(ipc).read_all()
        n = table.num_rows
        table = table.append_column("source", pa.array([source] * n, pa.string()))
        table = table.append_column("pixel_size_nm", pa.array([pixel_size_nm] * n, pa.float64()))
        self.writer.write_table(table.select(self.schema.names).cast(self.schema))
        self.rows += n

    def close(self) -> None:
        if not self.closed:
            self.writer.close()
            self.closed = True


def collect_rows(
    batches: Iterable[dict[str, np.ndarray]], sink: ParticleSink
) -> tuple[list[dict], dict[str, Any]]:
    """The images-table rows of the actors' batches, their particles streamed into ``sink``.

    Returns:
        (rows, per_image): one row per image (``IMAGE_COLUMNS``), and stem -> PSD summary of each image read.
    """
    rows, per_image = [], {}
    for batch in batches:
        for k in range(len(batch["source"])):
            row = {c: batch[c][k] for c in IMAGE_COLUMNS}
            pixel = None if row["pixel_size_nm"] != row["pixel_size_nm"] else float(row["pixel_size_nm"])
            row["pixel_size_nm"] = pixel
            if row["status"] != STATUS_ERROR:
                sink.add(batch["particles"][k], row["source"], pixel)
                per_image[row["image"]] = json.loads(batch["summary"][k])
            rows.append(row)
    return rows, per_image


def _stack_summary(particles_path: str, images: list[str]) -> dict[str, Any]:
    """PSD of the whole stack, read back with only the columns it needs (memory: a few floats a particle)."""
    import pyarrow.parquet as pq

    from tgan_ray.analysis import psd_summary

    columns = (
        "image equivalent_diameter touches_border circularity eccentricity solidity minor_axis major_axis"
    )
    columns = columns.split() + ["unit"]
    df = pq.read_table(particles_path, columns=columns).to_pandas()
    units = sorted(set(df["unit"])) if len(df) else []
    if len(units) > 1:  # some frames calibrated, some not: a PSD must not mix nm and px
        nm = df["unit"] == "nm"
        summary = psd_summary(df[nm], images=sorted(set(df.loc[nm, "image"])))
        summary["note"] = (
            "frames without a pixel size (px) are left out of this nm summary; set data.pixel_size_nm"
        )
        return summary
    return psd_summary(df, images=images)


def write_outputs(
    out: str, storage: StorageConfig | None, sink: ParticleSink, rows: list[dict], per_image: dict[str, Any]
) -> dict[str, Any]:
    """Publish ``particles.parquet`` and ``summary.json``, then ``images.parquet`` (the commit).

    Returns:
        The summary written to ``summary.json``.
    """
    import pandas as pd

    ok = [r["image"] for r in rows if r["status"] != STATUS_ERROR]
    summary = {
        "stack": _stack_summary(sink.path, ok),
        "images": {
            "total": len(rows),
            "segmented": sum(r["status"] == STATUS_SEGMENTED for r in rows),
            "reused": sum(r["status"] == STATUS_REUSED for r in rows),
            "errors": sum(r["status"] == STATUS_ERROR for r in rows),
        },
        "per_image": per_image,
    }
    st.upload_file(sink.path, st.join(out, "particles.parquet"), storage)
    st.write_bytes(
        st.join(out, "summary.json"), json.dumps(summary, indent=2, allow_nan=False).encode(), storage
    )
    table = pd.DataFrame(rows, columns=list(IMAGE_COLUMNS)).sort_values("source", kind="stable")
    st.write_bytes(st.join(out, "images.parquet"), table.to_parquet(index=False), storage)  # the commit
    return summary
