"""The ``tgan`` command. Commands only parse options and call library functions.

tgan demo                                   # synthetic HAADF stack -> masks + PSD report, quick preset
tgan run --images stack/ --out runs/r1      # your own stack (folder, glob or s3://bucket/prefix)
tgan synth --out synth/ --modality bf-tem   # a synthetic stack with exact ground-truth masks

The options several commands share, and how a command fails or ends, are in ``cli_common.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from tgan_ray.cli_common import (
    AsJson,
    ConfigFile,
    Preset,
    Sets,
    Verbose,
    config_from_options,
    fail,
    finish,
    parse_sets,
    serve_config,
    user_errors,
)

app = typer.Typer(
    help="Label-free segmentation of nanoparticles in electron micrographs (pix2pix + CycleGAN + UNet++ on Ray).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", help="Folder to write images/, masks/ and pixel_size.json.")],
    modality: Annotated[
        str, typer.Option(help="haadf (bright particles) | bf-tem (dark particles).")
    ] = "haadf",
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 8,
    size: Annotated[int, typer.Option(help="Image side in px.")] = 512,
    snr: Annotated[float, typer.Option(help="Signal-to-noise ratio; 2 is hard, 10 is easy.")] = 6.0,
    hard: Annotated[
        bool, typer.Option(help="Thick, uneven support and defocus: a global threshold fails.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a synthetic EM stack with exact ground-truth masks."""
    from tgan_ray.data.synthetic import make_stack

    if modality not in ("haadf", "bf-tem"):
        fail(f"--modality must be haadf or bf-tem, got {modality!r}")
    path = make_stack(out, n=n, modality=modality, size=size, snr=snr, seed=seed, hard=hard)
    typer.echo(f"wrote {n} {modality} images and masks to {path}")


@app.command()
def run(
    images: Annotated[str, typer.Option("--images", help="Stack: a folder, a glob or s3://bucket/prefix.")],
    out: Annotated[
        str,
        typer.Option(
            "--out",
            help="Run folder, or s3://bucket/prefix (a local working copy is kept); running again resumes it.",
        ),
    ],
    preset: Preset = "auto",
    config: ConfigFile = None,
    particle_contrast: Annotated[
        str | None, typer.Option(help="bright (HAADF) | dark (BF-TEM) | auto.")
    ] = None,
    seed_model: Annotated[
        str | None, typer.Option(help="NPsSegNet checkpoint used as the step-2 segmenter (domain transfer).")
    ] = None,
    pixel_size_nm: Annotated[
        float | None, typer.Option(help="Pixel size in nm (overrides metadata).")
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="Adaptation rounds (repeat steps 2-8).")] = None,
    tuned: Annotated[
        Path | None, typer.Option(help="A Tune campaign folder whose best settings to use.")
    ] = None,
    set_: Sets = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Run steps 1-8 on an unlabelled stack: masks, particles.csv, summary.json and report.html."""
    overrides = parse_sets(set_)
    if particle_contrast:
        overrides["rough.particle_contrast"] = particle_contrast
    if pixel_size_nm:
        overrides["data.pixel_size_nm"] = pixel_size_nm
    if rounds:
        overrides["run.rounds"] = rounds
    if tuned:
        from tgan_ray.tune import tuned_overrides

        overrides = {**tuned_overrides(tuned), **overrides}
    from tgan_ray.config import auto_preset

    chosen = auto_preset() if preset == "auto" else preset
    cfg = config_from_options(chosen, config, overrides)
    preamble = None
    if preset == "auto":
        why = "a GPU is present" if chosen == "paper" else "no GPU found; on a GPU it would be paper"
        preamble = f"preset auto: {chosen} ({why}; --preset chooses another)"
    _run(images, out, cfg, seed_model, as_json, preamble, verbose)


def _run(images, out, cfg, seed_model=None, as_json=False, preamble=None, verbose=False):
    """``preamble`` comes with the first step line, so a run that fails its input checks prints only the error.

    Without ``verbose``, Ray's and MLflow's logs go to the run's log file, and training stages draw bars.
    """
    from tgan_ray.cli_summary import run_dict, run_lines
    from tgan_ray.pipeline import log_file, run_pipeline
    from tgan_ray.terminal import StageBars

    pending = [preamble] if preamble else []

    def log(message: str) -> None:
        while pending:
            typer.echo(pending.pop(), err=as_json)
        typer.echo(message, err=as_json)

    bars = StageBars()
    try:
        result = run_pipeline(
            images, out, cfg, seed_model=seed_model, log=log, quiet=not verbose, progress=bars
        )
    except user_errors() as exc:
        fail(str(exc))
    finally:
        bars.close()
    lines = run_lines(result) + ([] if verbose else [f"log:       {log_file(out)} (Ray, Train, MLflow)"])
    finish(lines, run_dict(result), as_json)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Run folder for the demo.")] = Path("demo-run"),
    preset: Preset = "quick",
    n: Annotated[int, typer.Option("--n", help="Synthetic images in the demo stack.")] = 8,
    size: Annotated[int, typer.Option(help="Synthetic image side in px.")] = 256,
    set_: Sets = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Make a synthetic HAADF stack and run the whole pipeline on it (quick preset: minutes on a laptop CPU)."""
    from tgan_ray.data.synthetic import make_stack

    cfg = config_from_options(preset, None, parse_sets(set_))
    stack = out / "stack"
    if not (stack / "images").is_dir():
        make_stack(stack, n=n, modality="haadf", size=size, seed=cfg.data.seed)
        typer.echo(f"synthetic HAADF stack: {stack}/images (ground truth in {stack}/masks)", err=as_json)
    _run(str(stack / "images"), out / "run", cfg, as_json=as_json, verbose=verbose)


@app.command()
def tune(
    stage: Annotated[str, typer.Option("--stage", help="Which GAN to tune: pix2pix | cyclegan.")],
    images: Annotated[str, typer.Option("--images", help="Stack: a folder, a glob or s3://bucket/prefix.")],
    out: Annotated[Path, typer.Option("--out", help="Campaign folder (campaign.json holds the winner).")],
    num_samples: Annotated[int, typer.Option("--num-samples", help="Trials to run.")] = 4,
    scheduler: Annotated[str, typer.Option(help="asha (stop weak trials early) | fifo.")] = "asha",
    space: Annotated[
        Path | None, typer.Option(help="YAML search space: field: {choice|loguniform|uniform: [...]}.")
    ] = None,
    max_concurrent: Annotated[
        int, typer.Option(help="Trials at once (each takes its workers' CPUs/GPUs).")
    ] = 1,
    preset: Preset = "paper",
    config: ConfigFile = None,
    set_: Sets = None,
) -> None:
    """Search GAN hyperparameters with Ray Tune; trials are scored by KID on held-out real images."""
    from tgan_ray.config import ConfigError
    from tgan_ray.tune import load_space, run_campaign

    cfg = config_from_options(preset, config, parse_sets(set_))
    try:
        result = run_campaign(
            stage,
            images,
            cfg,
            out,
            num_samples,
            scheduler,
            load_space(space, stage) if stage in ("pix2pix", "cyclegan") else None,
            max_concurrent,
            log=lambda m: typer.echo(m),
        )
    except (ConfigError, *user_errors()) as exc:
        fail(str(exc))
    typer.secho(f"best KID {result.best_score:.4g}: {result.best_overrides}", fg=typer.colors.GREEN)
    typer.echo(f"use it: tgan run --images {images} --out <run> --tuned {out}")


@app.command()
def ablate(
    images: Annotated[str, typer.Option("--images", help="Stack: a folder, a glob or s3://bucket/prefix.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for ablation.csv / .json / .png.")],
    sizes: Annotated[
        str, typer.Option(help="pix2pix subset sizes, comma-separated; 'all' = every image.")
    ] = "5,10,20,40,all",
    preset: Preset = "paper",
    config: ConfigFile = None,
    set_: Sets = None,
) -> None:
    """The paper's Figure 3 on your data: pix2pix on growing subsets vs pix2pix(5) + CycleGAN, by FID/KID/IS/SSIM/PSNR."""
    from tgan_ray.ablation import run_ablation

    cfg = config_from_options(preset, config, parse_sets(set_))
    try:
        parsed = tuple(None if s.strip() == "all" else int(s) for s in sizes.split(","))
    except ValueError:
        fail(f"--sizes must be whole numbers or 'all', got {sizes!r}")
    try:
        table = run_ablation(images, out, cfg, parsed, log=lambda m: typer.echo(m))
    except user_errors() as exc:
        fail(str(exc))
    typer.echo(table.to_string(index=False))
    typer.echo(f"table and plot: {out}/ablation.csv, {out}/ablation.png")


@app.command()
def generate(
    run_dir: Annotated[
        str, typer.Option("--run", help="A finished `tgan run` folder or s3:// run (its prior and GANs).")
    ],
    out: Annotated[str, typer.Option("--out", help="Output folder or s3://bucket/prefix.")],
    n: Annotated[int, typer.Option("--n", help="Virtual (image, mask) pairs to make.")] = 1000,
    preset: Preset = "paper",
    config: ConfigFile = None,
    set_: Sets = None,
    as_json: AsJson = False,
) -> None:
    """Generate a virtual labelled dataset at scale with Ray Data (re-running completes what is missing)."""
    from tgan_ray.cli_summary import generate_lines
    from tgan_ray.generate import generate_from_run

    cfg = config_from_options(preset, config, parse_sets(set_))
    try:
        result = generate_from_run(run_dir, n, out, cfg)
    except (ValueError, *user_errors()) as exc:
        fail(str(exc))
    finish(generate_lines(result), result.to_dict(), as_json)


@app.command()
def segment(
    images: Annotated[str, typer.Option("--images", help="Stack: a folder, a glob or s3://bucket/prefix.")],
    out: Annotated[str, typer.Option("--out", help="Output folder or s3://bucket/prefix.")],
    model: Annotated[
        str | None, typer.Option("--model", help="NPsSegNet checkpoint: path, s3:// or models:/name/version.")
    ] = None,
    rough: Annotated[
        bool,
        typer.Option(
            "--rough",
            help="No model: the classical, training-free segmenter of step 2 (one contrast and particle scale "
            "for the stack), the baseline a label-free model must beat.",
        ),
    ] = False,
    particle_contrast: Annotated[
        str | None, typer.Option(help="With --rough: bright (HAADF) | dark (BF-TEM) | auto.")
    ] = None,
    preset: Preset = "paper",
    config: ConfigFile = None,
    set_: Sets = None,
    as_json: AsJson = False,
) -> None:
    """Segment a whole stack with Ray Data: masks (PNG, and TIFF in nm), particles.parquet, images.parquet, summary.json."""
    from tgan_ray.cli_summary import segment_lines
    from tgan_ray.model_uri import resolve_model_uri
    from tgan_ray.segment import segment_stack

    if rough == (model is not None):
        fail("give --model (a trained NPsSegNet) or --rough (the classical segmenter), one of the two")
    overrides = parse_sets(set_)
    if particle_contrast:
        overrides["rough.particle_contrast"] = particle_contrast
    cfg = config_from_options(preset, config, overrides)
    try:
        resolved = None if rough else resolve_model_uri(model, cfg)
        result = segment_stack(resolved, images, out, cfg, rough=rough)
    except (ValueError, *user_errors()) as exc:
        fail(str(exc))
    finish(segment_lines(result), {**result.to_dict(), "summary": result.summary["stack"]}, as_json)


@app.command()
def serve(
    model: Annotated[
        str, typer.Option("--model", help="NPsSegNet checkpoint: path, s3:// or models:/name/version.")
    ],
    host: Annotated[
        str | None,
        typer.Option(help="Address to bind: 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)."),
    ] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="HTTP port (config default: 8000).")
    ] = None,
    replicas: Annotated[
        int | None, typer.Option(min=1, help="Replicas of the segmenter (fixed, unless --max-replicas).")
    ] = None,
    max_replicas: Annotated[
        int | None, typer.Option(min=1, help="Autoscale up to this many replicas under load.")
    ] = None,
    gpus_per_replica: Annotated[
        float | None, typer.Option(min=0, help="GPUs each replica takes; 0 runs on CPU (config default: 0).")
    ] = None,
    cpus_per_replica: Annotated[float | None, typer.Option(min=0.01, help="CPUs each replica takes.")] = None,
    max_batch_size: Annotated[
        int | None, typer.Option(min=1, help="Requests grouped into one forward pass (config default: 8).")
    ] = None,
    preset: Preset = "paper",
    config: ConfigFile = None,
    set_: Sets = None,
) -> None:
    """Serve the segmenter over HTTP (POST /v1/segment; GET /v1/healthz, /v1/model, /docs) until Ctrl-C.

    Options not given keep the config's serve.* values (see `tgan config`); they win over --set.
    """
    from tgan_ray.serve import serve_model

    cfg = serve_config(
        preset,
        config,
        set_,
        host,
        port,
        replicas,
        max_replicas,
        gpus_per_replica,
        cpus_per_replica,
        max_batch_size,
    )
    try:
        serve_model(model, cfg, blocking=True)
    except (ValueError, *user_errors()) as exc:
        fail(str(exc))


@app.command()
def watch(
    folder: Annotated[Path, typer.Argument(help="The microscope's output folder.")],
    endpoint: Annotated[
        str, typer.Option("--endpoint", help="The `tgan serve` URL, e.g. http://127.0.0.1:8000.")
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Live CSV, PSD plot and summary (default <folder>/tgan-watch)."),
    ] = None,
    interval: Annotated[float, typer.Option(help="Seconds between folder scans.")] = 1.0,
    pixel_size_nm: Annotated[
        float | None, typer.Option(help="Pixel size in nm when the files carry none.")
    ] = None,
) -> None:
    """Send each new, fully written frame to the endpoint once; keep a live particle CSV, PSD plot and drift summary."""
    from tgan_ray.watch import watch_folder

    try:
        watch_folder(folder, endpoint, out, interval=interval, pixel_size_nm=pixel_size_nm, log=typer.echo)
    except (ValueError, NotADirectoryError, *user_errors()) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        typer.echo("stopped")


@app.command("config")
def show_config(preset: Preset = "paper", config: ConfigFile = None, set_: Sets = None) -> None:
    """Print the full config (preset + file + --set) as YAML."""
    import yaml

    from tgan_ray.config import config_to_dict

    cfg = config_from_options(preset, config, parse_sets(set_))
    typer.echo(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def main() -> None:  # pragma: no cover
    app(prog_name="tgan")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
