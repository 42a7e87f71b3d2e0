"""``train_loop_per_worker``: the one Ray Train loop every stage runs in.

parse config -> set up the worker -> build the stage -> restore the latest checkpoint -> epochs, each ending in
``ray.train.report`` (a barrier: every rank reports every epoch; only rank 0 attaches a checkpoint).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any


def _resolve(value: Any) -> Any:
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _progress(event: dict[str, Any], queue=None) -> None:
    """Rank 0's progress: to the driver's queue (``driver.progress_to``), or a line on the worker's stdout."""
    if queue is not None:
        queue.put(event)
        return
    from tgan_ray.terminal import progress_line

    # Straight to the process's stdout (which Ray streams to the driver once): Train V2 patches print() and
    # tees it when another library has wrapped sys.stdout, which printed every line twice.
    sys.__stdout__.write(progress_line(event) + "\n")
    sys.__stdout__.flush()


def _maybe_inject_fault(config: dict, epoch: int, ctx) -> None:
    """Kill this worker once, in the middle of a given epoch: how tests prove a lost worker is recovered."""
    fault = config.get("fault_injection")
    if not fault or epoch != fault["epoch"] or ctx.rank != fault.get("rank", 0):
        return
    marker = Path(fault["marker"])
    if not marker.exists():
        marker.write_text("killed")
        os._exit(1)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Run one stage. ``config`` keys: stage, stage_cfg, data, ray, seed, tracking, extractor."""
    import ray.train
    from ray.train import Checkpoint

    from tgan_ray.tracking import Tracker
    from tgan_ray.train.plumbing import read_checkpoint_state, setup_worker, write_checkpoint_dir
    from tgan_ray.train.stages import create_stage

    ctx = setup_worker(config.get("ray", {}), config.get("seed", 0))
    queue = config.get("progress")
    data = {k: _resolve(v) for k, v in config["data"].items()}
    stage = create_stage(
        config["stage"], config["stage_cfg"], data, ctx, config.get("extractor", "random-resnet18")
    )

    event = {"stage": config["stage"], "epochs": stage.num_epochs}
    start_epoch, best, starts = 0, None, []
    state = read_checkpoint_state(ray.train.get_checkpoint())
    if state is not None:
        stage.load_state_dict(state["stage"])
        start_epoch, best, starts = state["epoch"] + 1, state.get("best"), state.get("starts", [])
        if ctx.is_main:
            _progress({**event, "kind": "resumed", "epoch": state["epoch"] + 1}, queue)
    starts = [*starts, start_epoch]  # where each (re)start began: the record of resumes

    tracking = config.get("tracking") or {}
    tracker = Tracker(tracking.get("uri"), tracking.get("experiment", "tgan-ray"), tracking.get("run_id"))
    if not ctx.is_main:
        tracker = Tracker(None)
    sample_every = tracking.get("sample_every", 5)

    last = stage.num_epochs - 1
    t_start = time.time()
    for epoch in range(start_epoch, stage.num_epochs):
        t_epoch = time.perf_counter()
        metrics = stage.train_epoch(epoch)
        seconds = time.perf_counter() - t_epoch
        images = len(stage.loader) * stage.loader.batch_size * ctx.world_size
        metrics.update({"train/epoch_s": seconds, "train/images_per_s": images / seconds})
        _maybe_inject_fault(
            config, epoch, ctx
        )  # a crash mid-epoch, after its training, before its checkpoint
        metrics["epoch"] = epoch + 1
        checkpoint = None
        is_eval = (epoch + 1) % stage.eval_every == 0 or epoch == last
        if is_eval and ctx.is_main:
            metrics.update(stage.evaluate())
            score = metrics[stage.score]
            if best is None or (score < best if stage.mode == "min" else score > best):
                best = score
            metrics["score"], metrics["best_score"] = score, best
            state = {"stage": stage.state_dict(), "epoch": epoch, "best": best, "starts": starts}
            checkpoint = Checkpoint.from_directory(write_checkpoint_dir(state, stage.export))
        if ctx.is_main:
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch + 1)
            if (epoch + 1) % sample_every == 0 or epoch == last:
                tracker.log_image(stage.sample_grid(), f"samples/epoch_{epoch + 1:04d}.png")
            done = epoch + 1 - start_epoch
            shown = {
                k.split("/")[-1]: v
                for k, v in metrics.items()
                if isinstance(v, float) and not k.endswith(("lr", "epoch_s")) and "std" not in k
            }
            eta = (time.time() - t_start) / done * (stage.num_epochs - epoch - 1)
            _progress({**event, "kind": "epoch", "epoch": epoch + 1, "metrics": shown, "eta_s": eta}, queue)
        if is_eval:
            # Every rank reports the same number of times; only rank 0 carries the checkpoint and the score.
            # The checkpoint folder is a temporary copy: once uploaded to storage it is deleted, not left in /tmp.
            ray.train.report(
                metrics if ctx.is_main else {"epoch": epoch + 1},
                checkpoint=checkpoint,
                delete_local_checkpoint_after_upload=checkpoint is not None,
            )
    if start_epoch > last and ctx.is_main:
        _progress({**event, "kind": "complete"}, queue)
