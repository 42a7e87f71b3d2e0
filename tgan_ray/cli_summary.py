"""How ``tgan`` commands end: a few lines a person reads (counts, where the outputs are, errors by file),
or with ``--json`` one JSON document for scripts. Never a Python repr.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_LISTED_ERRORS = 20  # more than this and the rest is counted, not listed


def _number(value: float | None, unit: str) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3g} {unit}"


def psd_line(summary: dict[str, Any]) -> str:
    """'123 particles, mean diameter 10.2 nm (95% CI 9.81-10.6), d10/d50/d90 7.1/10/14 nm'."""
    count, unit = summary.get("count") or 0, summary.get("unit") or "px"
    parts = [f"{count} particles"]
    if summary.get("mean") is not None:
        mean = f"mean diameter {_number(summary['mean'], unit)}"
        ci = (summary.get("intervals") or {}).get("mean")
        if ci:
            level = 100 * (summary.get("intervals") or {}).get("level", 0.95)
            mean += f" ({level:.0f}% CI {ci['low']:.3g}-{ci['high']:.3g})"
        parts.append(mean)
    if summary.get("d10") is not None:
        d = "/".join(f"{summary[k]:.3g}" for k in ("d10", "d50", "d90"))
        parts.append(f"d10/d50/d90 {d} {unit}")
    return ", ".join(parts)


def error_lines(errors: list[tuple[str, str]]) -> list[str]:
    """'errors (n):' then one '  <file>: <reason>' line each, at most MAX_LISTED_ERRORS."""
    if not errors:
        return []
    lines = [f"errors ({len(errors)}):"]
    lines += [f"  {source}: {reason}" for source, reason in errors[:MAX_LISTED_ERRORS]]
    if len(errors) > MAX_LISTED_ERRORS:
        lines.append(f"  ... and {len(errors) - MAX_LISTED_ERRORS} more")
    return lines


def segment_lines(result) -> list[str]:
    """Ending of ``tgan segment`` (a :class:`~tgan_ray.segment.SegmentResult`)."""
    d = result.to_dict()
    done = f"done: {result.segmented} images segmented, {result.reused} reused"
    if result.errors:
        done += f", {len(result.errors)} unreadable"
    lines = [f"{done} in {result.seconds:.0f} s", "  " + psd_line(result.summary.get("stack") or {})]
    lines += [
        f"masks:     {result.masks} (PNG; TIFF in nm beside them, instance labels in labels/)",
        f"particles: {d['particles_table']}",
        f"images:    {d['images_table']} (every image's status)",
        f"summary:   {d['summary_json']}",
    ]
    return lines + error_lines(result.errors)


def generate_lines(result) -> list[str]:
    """Ending of ``tgan generate`` (a :class:`~tgan_ray.generate.GenerateResult`)."""
    return [
        f"done: {result.count} (image, mask) pairs: {result.generated} generated, {result.reused} reused, "
        f"in {result.seconds:.0f} s ({result.images_per_s:.1f} pairs/s)",
        f"pairs:    {result.out}",
        f"manifest: {result.manifest}",
    ]


def run_lines(result) -> list[str]:
    """Ending of ``tgan run`` / ``tgan demo`` (a :class:`~tgan_ray.pipeline.PipelineResult`)."""
    run_dir = result.run_dir
    remote = [f"run:       {result.remote} (working copy: {run_dir})"] if result.remote else []
    return [
        "done: " + psd_line(result.summary),
        *remote,
        f"report:    {result.report}",
        f"particles: {run_dir / 'particles.csv'} (and .parquet)",
        f"summary:   {run_dir / 'summary.json'}",
        f"masks:     {run_dir / 'masks'} (PNG; TIFF in nm beside them, instance labels in labels/)",
        f"segmenter: {result.segmenter}",
    ]


def run_dict(result) -> dict[str, Any]:
    run_dir = result.run_dir
    return {
        "run_dir": str(run_dir),
        "remote": result.remote,
        "report": str(result.report),
        "segmenter": str(result.segmenter),
        "masks": str(run_dir / "masks"),
        "particles_csv": str(run_dir / "particles.csv"),
        "particles_parquet": str(run_dir / "particles.parquet"),
        "summary_json": str(run_dir / "summary.json"),
        "summary": result.summary,
    }


def to_json(payload: dict[str, Any]) -> str:
    """Indented JSON; NaN and inf become null so that any JSON reader takes it."""
    from tgan_ray.analysis.psd import json_safe

    return json.dumps(json_safe(payload), indent=2, allow_nan=False)
