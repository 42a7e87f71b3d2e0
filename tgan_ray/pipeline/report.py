"""The run's PSD report: particles.csv / .parquet, summary.json, plots and one self-contained report.html."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def build_report(pipe, stack: dict, masks: dict, rnd: int) -> dict[str, Any]:
    """Write the report of the real stack's particles into the run folder.

    Args:
        pipe: the :class:`~tgan_ray.pipeline.Pipeline` (run folder, config, tracker).
        stack: output of the stack step (frames, splits).
        masks: output of the segment step: ``folder`` of masks and ``particles_table``, the particles that
            segment_stack measured on them (Parquet).
        rnd: the last round (its samples are shown).
    """
    from tgan_ray.analysis.report import write_report

    run_dir: Path = pipe.run_dir
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    df, images = _write_particle_tables(pipe, stack, masks)
    summary, check = _write_summary(pipe, df, stack, images)
    figures = _report_figures(pipe, df, summary, stack, masks, rnd, plots)
    report = write_report(
        run_dir,
        f"tgan-ray report: {Path(str(pipe.images)).name or pipe.images}",
        summary,
        figures,
        tables=_report_tables(pipe, rnd, summary, check, images),
        extra={
            "images": pipe.images,
            "frames": len(stack["frames"]),
            "unreadable": len(stack["skipped"]),
            "rounds": pipe.cfg.run.rounds,
            "image_size": pipe.cfg.data.image_size,
            "resize_mode": pipe.cfg.data.resize_mode,
        },
    )
    pipe.tracker.log_metrics({f"psd/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
    tables = [run_dir / "particles.csv", run_dir / "particles.parquet"]
    for path in [run_dir / "summary.json", *tables, report, *figures.values()]:
        pipe.tracker.log_artifact(path, "report")
    pipe.log(f"   {summary.get('count')} particles; report: {report}")
    return {"report": str(report), "summary": summary, "csv": str(run_dir / "particles.csv")}


def _write_particle_tables(pipe, stack: dict, masks: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """particles.csv / .parquet of the stack's frames; returns them and the segment step's per-image table."""
    from tgan_ray.analysis.particles import PARTICLE_COLUMNS
    from tgan_ray.analysis.report import write_particles_csv, write_particles_parquet

    run_dir: Path = pipe.run_dir
    df = _stack_particles(masks["particles_table"], [f["stem"] for f in stack["frames"]], PARTICLE_COLUMNS)
    units = {f["pixel_size_nm"] is not None for f in stack["frames"]}
    if len(units) > 1:
        pipe.log(
            "   warning: some images have a pixel size and some do not; give --pixel-size-nm to report all in nm"
        )
    images = pd.read_parquet(masks["images_table"]).set_index("image")
    if "uncertainty" in images:  # the frames to check by eye: each particle carries its frame's uncertainty
        df["image_uncertainty"] = df["image"].map(images["uncertainty"]).round(4)
    write_particles_csv(df, run_dir / "particles.csv")
    write_particles_parquet(df, run_dir / "particles.parquet")
    return df, images


def _write_summary(pipe, df: pd.DataFrame, stack: dict, images: pd.DataFrame) -> tuple[dict, dict | None]:
    """summary.json: the PSD summary plus the self-check's outputs; returns it and the self-check (or None)."""
    from tgan_ray.analysis.psd import psd_summary, write_summary

    summary = psd_summary(df, images=[f["stem"] for f in stack["frames"]])
    check = pipe.manifest.outputs("selfcheck") if pipe.manifest.done("selfcheck") else None
    if check:
        summary["self_check"] = check
    if "lead" in images:  # merge_rough: the frames where NPsSegNet missed most of the rough particles
        from tgan_ray.analysis.selfcheck import LEAD_ROUGH

        summary["frames_led_by_rough"] = sorted(images.index[images["lead"] == LEAD_ROUGH])
    write_summary(summary, pipe.run_dir / "summary.json")
    return summary, check


def _report_figures(
    pipe, df: pd.DataFrame, summary: dict, stack: dict, masks: dict, rnd: int, plots: Path
) -> dict[str, Path]:
    """The report's figures, by caption: PSD, shapes, mask overlays on the first frames and the sample grid."""
    from PIL import Image

    from tgan_ray.analysis.plots import plot_overlay, plot_psd, plot_shapes
    from tgan_ray.io import read_mask_png

    figures = {
        "Particle size distribution with lognormal fit": plot_psd(df, summary, plots / "psd.png"),
        "Particle shape": plot_shapes(df, plots / "shapes.png"),
    }
    for frame in stack["frames"][: pipe.cfg.run.report_overlays]:
        image = pipe.work_frame(frame["stem"])
        mask = read_mask_png(Path(masks["folder"]) / f"{frame['stem']}.png")
        mask_small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(image.shape[::-1])) > 127
        figures[f"Masks on {frame['stem']}"] = plot_overlay(
            image, mask_small, plots / f"overlay_{frame['stem']}.png", frame["stem"]
        )
    figures["Samples: real | rough mask | random mask | 1st generation | 2nd generation"] = _sample_grid(
        pipe, stack, rnd, plots
    )
    return figures


def _report_tables(
    pipe, rnd: int, summary: dict, check: dict | None, images: pd.DataFrame
) -> dict[str, pd.DataFrame]:
    """The report's tables, by title: self-check, particles per image, steps and the prior's KS distances."""
    stage_rows = []
    for step, info in pipe.manifest.data["steps"].items():
        metrics = info.get("outputs", {}).get("metrics", {})
        row = {"step": step, "seconds": info.get("seconds")}
        row.update({k: v for k, v in metrics.items() if k.startswith("val/") and "std" not in k})
        stage_rows.append(row)
    ks = json.loads((pipe.run_dir / f"round{rnd}" / "prior_ks.json").read_text())
    per_image = pd.DataFrame(
        [{"image": k, "particles": v} for k, v in (summary.get("per_image_counts") or {}).items()]
    )
    return {
        **_self_check_tables(check, images),
        "Particles per image": per_image,
        "Steps": pd.DataFrame(stage_rows),
        "Sampled masks vs morphology prior (KS distance, lower is closer)": pd.DataFrame(
            [{"feature": k, "ks": v} for k, v in ks.items()]
        ),
    }


def _self_check_tables(check: dict | None, images: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The self-check's verdict and signals, and the frames ordered by the segmenter's uncertainty."""
    tables = {}
    if check:
        step2, agree, support = check.get("step2", {}), check.get("agreement", {}), check.get("support") or {}
        rows = [
            ("verdict", check.get("verdict")),
            ("warning", check.get("warning") or "none"),
            ("step 2: particles per frame", step2.get("particles_per_frame")),
            ("step 2: median diameter, working px", step2.get("median_diameter_px")),
            ("step 2: blob diameter of the stack, working px", step2.get("expected_diameter_px")),
            ("step 2: contrast / that of support patches", step2.get("contrast_to_support")),
            ("rough's confident particles found by NPsSegNet (IoU >= 0.3)", agree.get("recall")),
            ("confident particles checked (held-out frames)", agree.get("confident")),
            ("NPsSegNet's particles with a classical candidate under them", support.get("share")),
            ("virtual data used", (check.get("realism") or {}).get("source")),
            ("KID of the virtual data vs real crops", (check.get("realism") or {}).get("kid")),
        ]
        tables["Self-check"] = pd.DataFrame(rows, columns=["signal", "value"]).astype({"value": str})
    if "uncertainty" in images and images["uncertainty"].notna().any():
        order = images["uncertainty"].sort_values(ascending=False)
        frames = pd.DataFrame({"image": order.index, "uncertainty": order.to_numpy()})
        if "lead" in images:  # segmenter.merge_rough: whose outlines each frame's mask keeps
            frames["masks led by"] = images["lead"].reindex(order.index).to_numpy()
        tables["Frames to check by eye first (share of marked pixels the segmenter is unsure of)"] = frames
    return tables


def _stack_particles(table: str, stems: list[str], columns) -> pd.DataFrame:
    """segment_stack's particles of the stack's frames, in frame order, with measure_particles' columns."""
    df = pd.read_parquet(table)
    df = df[df["image"].isin(stems)]
    order = {s: i for i, s in enumerate(stems)}
    df = df.sort_values(["image", "particle_id"], key=lambda c: c.map(order) if c.name == "image" else c)
    return df[list(columns)].reset_index(drop=True)


def _sample_grid(pipe, stack: dict, rnd: int, plots: Path) -> Path:
    from PIL import Image

    from tgan_ray.analysis.plots import plot_grid
    from tgan_ray.data.working import random_crops
    from tgan_ray.io import read_mask_png

    round_dir = pipe.run_dir / f"round{rnd}"
    virtual = round_dir / "virtual"
    names = sorted(p.name for p in (virtual / "images").glob("*.png"))[:4]
    stems = stack["subset1"]
    rows = []
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        stem = stems[i % len(stems)]
        real, rough = random_crops(
            [pipe.work_frame(stem)],
            pipe.cfg.data.image_size,
            1,
            rng,
            [read_mask_png(round_dir / "rough" / f"{stem}.png")],
        )
        rows.append(
            [
                real[0],
                rough[0].astype(np.float32),
                read_mask_png(virtual / "masks" / name).astype(np.float32),
                np.asarray(Image.open(virtual / "gen1" / name), dtype=np.float32) / 255,
                np.asarray(Image.open(virtual / "images" / name), dtype=np.float32) / 255,
            ]
        )
    return plot_grid(
        rows, ["real", "rough mask", "random mask", "1st generation", "2nd generation"], plots / "samples.png"
    )
