"""The run: :class:`Pipeline` (one run folder, its manifest and MLflow parent run, and steps 1-8 in order),
the input checks and :func:`run_pipeline`."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tgan_ray.config import Config, config_to_dict, flatten_config, save_config
from tgan_ray.manifest import Manifest, round_step
from tgan_ray.pipeline.common import PipelineError, check_same_config
from tgan_ray.pipeline.gans import GANSteps
from tgan_ray.pipeline.rough import RoughStep
from tgan_ray.pipeline.segment import SegmentSteps
from tgan_ray.pipeline.segmenter import SegmenterStep
from tgan_ray.pipeline.stack import StackStep
from tgan_ray.run_folder import RunFolder
from tgan_ray.tracking import Tracker, resolve_tracking_uri


@dataclass
class PipelineResult:
    run_dir: Path  # the local run folder, or the working copy of an S3 one
    summary: dict[str, Any]
    report: Path
    segmenter: Path
    remote: str | None = None  # the S3 run folder, if any


class Pipeline(StackStep, RoughStep, GANSteps, SegmenterStep, SegmentSteps):
    """One run folder and the steps that fill it. Each ``step_*`` is skipped when the manifest has it done.

    The steps live one module per step of the method: ``stack.py`` (1), ``rough.py`` (2), ``gans.py`` (2->6),
    ``segmenter.py`` (7), ``segment.py`` (8, the self-check, the report, the registry); :meth:`run` calls them in
    order."""

    def __init__(
        self, images: str, run_dir: str | Path, cfg: Config, seed_model: str | None = None, log=print
    ):
        self.images, self.cfg, self.log = images, cfg, log
        self.seed_model = seed_model or (cfg.rough.seed_model if cfg.rough.method == "model" else None)
        self.folder = RunFolder(run_dir, cfg.storage)
        self.folder.pull()  # an S3 run folder resumes on any machine
        self.run_dir = self.folder.local
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest(self.run_dir)
        if self.folder.remote and self.manifest.get("working_copy") != str(self.run_dir):
            self.manifest.set("working_copy", str(self.run_dir))
        self.rng = np.random.default_rng(cfg.data.seed)
        saved = self.manifest.get("config")
        check_same_config(self.run_dir, saved, cfg)
        if saved is None:
            self.manifest.set("config", config_to_dict(cfg))
            self.manifest.set("images", images)
        save_config(cfg, self.run_dir / "config.yaml")
        self.tracker = self._parent_run()
        self.folder.push()

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def _parent_run(self) -> Tracker:
        uri = resolve_tracking_uri(self.cfg.tracking, self.run_dir)
        root = Tracker(uri, self.cfg.tracking.experiment)
        run_id = self.manifest.get("mlflow_run_id")
        if run_id:
            return Tracker(uri, self.cfg.tracking.experiment, run_id)
        parent = root.start_child(f"pipeline-{self.run_dir.name}", tags={"images": self.images})
        parent.log_params(flatten_config(self.cfg))
        if parent.run_id:
            self.manifest.set("mlflow_run_id", parent.run_id)
        return parent

    def run_step(self, name: str, fn, *args) -> dict[str, Any]:
        if self.manifest.done(name):
            self.log(f"== {name}: done earlier, skipped")
            return self.manifest.outputs(name)
        self.log(f"== {name} ...")
        t0 = time.time()
        outputs = fn(*args)
        self.manifest.mark_done(name, outputs, time.time() - t0)
        self.folder.push()
        self.log(f"== {name}: finished in {time.time() - t0:.1f}s")
        return outputs

    def _trained(self, stage: dict[str, Any]) -> dict[str, Any]:
        """A training step is recorded done: keep only its best model (``run.keep_checkpoints`` keeps all)."""
        from tgan_ray.train.driver import prune_checkpoints

        if not self.cfg.run.keep_checkpoints:
            freed = prune_checkpoints(stage, self.cfg.storage)
            if freed:
                self.log(f"   pruned {freed / 2**20:.0f} MB of Ray Train checkpoints (best model kept)")
        return stage

    def work_frame(self, stem: str) -> np.ndarray:
        return np.load(self.run_dir / "work" / f"{stem}.npy").astype(np.float32)

    def estimate_training(self) -> None:
        """Before a CPU run's first training step: print how long training will take, from a timed warm-up.

        Skipped on a cluster (``ray.address``, or ``RAY_ADDRESS`` inside a Ray job) or with GPU workers, where
        this process's CPU says nothing about the workers'."""
        from tgan_ray.runtime import cluster_address, use_gpu
        from tgan_ray.train.estimate import estimate_line, estimate_training

        if (
            self.manifest.done(round_step(1, "pix2pix"))
            or cluster_address(self.cfg.ray)
            or use_gpu(self.cfg.ray)
        ):
            return
        estimate = estimate_training(self.cfg)
        self.manifest.set("training_estimate", estimate)
        self.log(f"   {estimate_line(estimate)}")

    def run(self) -> PipelineResult:
        stack = self.run_step("stack", self.step_stack)
        self.estimate_training()
        seg = None
        for rnd in range(1, self.cfg.run.rounds + 1):
            rough = self.run_step(round_step(rnd, "rough"), self.step_rough, stack, rnd)
            prior = self.run_step(round_step(rnd, "prior"), self.step_prior, stack, rough, rnd)
            p2p = self._trained(
                self.run_step(round_step(rnd, "pix2pix"), self.step_pix2pix, stack, rough, prior, rnd)
            )
            gen1 = self.run_step(round_step(rnd, "gen1"), self.step_gen, "masks", "gen1", p2p, rnd)
            cyc = self._trained(
                self.run_step(round_step(rnd, "cyclegan"), self.step_cyclegan, stack, gen1, rnd)
            )
            gen2 = self.run_step(round_step(rnd, "gen2"), self.step_gen, "gen1", "gen2", cyc, rnd, p2p)
            virtual = self.run_step(round_step(rnd, "virtual"), self.step_virtual, stack, prior, gen2, rnd)
            seg = self._trained(
                self.run_step(round_step(rnd, "segmenter"), self.step_segmenter, prior, virtual, rnd)
            )
        masks = self.run_step("segment", self.step_segment, stack, seg)
        self.run_step("selfcheck", self.step_selfcheck, stack, seg)
        report = self.run_step("report", self.step_report, stack, masks, self.cfg.run.rounds)
        self.run_step("register", self.step_register, seg)
        self.tracker.end()
        return PipelineResult(
            self.run_dir, report["summary"], Path(report["report"]), Path(seg["model"]), self.folder.remote
        )


def check_inputs(images: str, out: str | Path, cfg: Config, seed_model: str | None = None) -> None:
    """What a user can get wrong, checked before Ray, MLflow or a run folder: a failed check leaves nothing.

    The stack (folder, glob or S3 prefix, credentials included), the run folder (a folder, writable, or an S3
    prefix we may list; and, when it holds a run, one started with the same config) and a local seed model.

    Raises:
        StackError, StorageError or PipelineError, each with a one-line message naming the culprit.
    """
    from tgan_ray.io import list_stack
    from tgan_ray.io import storage as st

    list_stack(images, cfg.storage)
    if st.is_s3(out):
        _check_s3_run_folder(str(out), cfg)
    else:
        _check_local_run_folder(Path(out), cfg)
    remote = seed_model and (st.is_s3(seed_model) or ":/" in seed_model)  # s3://, models:/, runs:/
    if seed_model and not remote and not Path(seed_model).is_file():
        raise PipelineError(f"seed model not found: {seed_model}")


def _check_s3_run_folder(out: str, cfg: Config) -> None:
    from tgan_ray.io import storage as st

    st.check_access(out, cfg.storage)  # endpoint, credentials, bucket: one line each
    manifest = st.join(out, "manifest.json")
    if st.exists(manifest, cfg.storage):
        saved = json.loads(st.read_bytes(manifest, cfg.storage)).get("config")
        check_same_config(out, saved, cfg)


def _check_local_run_folder(out: Path, cfg: Config) -> None:
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {out} is a file; the run folder must be a folder")
    if (out / "manifest.json").is_file():
        check_same_config(out, Manifest(out).get("config"), cfg)
    parent = next(p for p in (out, *out.parents) if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PipelineError(f"cannot write the run folder {out}: {parent} is not writable")


def run_pipeline(
    images: str,
    out: str | Path,
    cfg: Config,
    seed_model: str | None = None,
    log=print,
    quiet: bool = False,
    progress=None,
) -> PipelineResult:
    """Run (or resume) steps 1-8 on a stack: a folder, a glob or an s3:// prefix.

    Args:
        out: the run folder: a local folder, or an ``s3://`` prefix (with a local working copy, ``run_folder.py``).
        log: where the step lines go.
        quiet: Ray, Ray Data, Train and MLflow logs and Python warnings go to ``<out>/logs/tgan.log`` (what
            ``tgan run`` does without ``-v``); the unreadable-files warning stays on the terminal.
        progress: with ``quiet``, the sink of the training stages' progress events (default: lines to ``log``;
            the CLI draws :class:`~tgan_ray.terminal.StageBars`).
    """
    from tgan_ray.runtime import init_ray, library_logs_to
    from tgan_ray.terminal import progress_line
    from tgan_ray.train.driver import progress_to

    check_inputs(images, out, cfg, seed_model)
    if not quiet:
        init_ray(cfg.ray)
        return Pipeline(images, out, cfg, seed_model, log).run()

    def lines(event: dict) -> None:
        if event.get("kind") != "end":
            log(progress_line(event))

    with library_logs_to(log_file(out)), progress_to(progress or lines):
        init_ray(cfg.ray, log_to_driver=False)
        return Pipeline(images, out, cfg, seed_model, log).run()


def log_file(run_dir: str | Path) -> Path:
    """Where a quiet run keeps Ray's, Train's and MLflow's logs (in the working copy of an S3 run folder)."""
    return RunFolder(run_dir).local / "logs" / "tgan.log"
