"""Ray Tune campaigns over GAN hyperparameters, each trial scored by KID/FID, never by loss.

    tgan tune --stage pix2pix --images stack/ --out campaigns/p2p --num-samples 8 --scheduler asha
    tgan run --images stack/ --out runs/r1 --tuned campaigns/p2p       # use the winner's settings

Ray 2.60 pattern (``Tuner(trainer)`` raises): a Tune driver function builds the stage's TorchTrainer with
``TuneReportCallback`` and fits it. ASHA stops trials whose score lags at the same epoch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tgan_ray.config import Config, ConfigError, CycleGANConfig, Pix2PixConfig, config_to_dict
from tgan_ray.manifest import round_step, write_json

# Search space syntax, in YAML or Python: {field: {choice: [...]}} | {loguniform: [lo, hi]} | {uniform: [lo, hi]}.
DEFAULT_SPACES: dict[str, dict[str, dict[str, list]]] = {
    "pix2pix": {
        "lr_g": {"loguniform": [5e-5, 1e-3]},
        "lr_d": {"loguniform": [5e-5, 1e-3]},
        "lambda_l1": {"choice": [5.0, 10.0, 20.0, 50.0]},
        "discriminator_layers": {"choice": [2, 3, 4]},
        "batch_size": {"choice": [2, 4, 8]},
    },
    "cyclegan": {
        "lr_g": {"loguniform": [5e-5, 1e-3]},
        "lr_d": {"loguniform": [5e-5, 1e-3]},
        "lambda_cycle": {"choice": [5.0, 10.0, 20.0]},
        "lambda_identity": {"choice": [0.0, 0.5, 1.0]},
        "discriminator_layers": {"choice": [2, 3, 4]},
    },
}
_KINDS = ("choice", "loguniform", "uniform")


@dataclass
class CampaignResult:
    stage: str
    best_overrides: dict[str, Any]  # stage fields of the winning trial
    best_score: float
    metric: str
    checkpoint_path: str
    trials: list[dict[str, Any]]
    model_version: str | None = None


def load_space(path: str | Path | None, stage: str) -> dict[str, dict[str, list]]:
    """A search space from YAML, or the stage's default."""
    if path is None:
        return DEFAULT_SPACES[stage]
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"search space file not found: {p}")
    space = yaml.safe_load(p.read_text()) or {}
    if not isinstance(space, dict):
        raise ConfigError(f"search space {p} must map field names to {{choice|loguniform|uniform: [...]}}")
    return space


def validate_space(stage: str, space: dict[str, Any], base: Pix2PixConfig | CycleGANConfig) -> None:
    """Reject an invalid search space before any trial starts: unknown fields, bad kinds, bad values."""
    fields = type(base).model_fields
    for name, spec in space.items():
        if name not in fields:
            raise ConfigError(f"search space: {stage} has no field {name!r}")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in _KINDS:
            raise ConfigError(
                f"search space: {name} must be one of {{choice|loguniform|uniform: [...]}}, got {spec!r}"
            )
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values or (kind != "choice" and len(values) != 2):
            raise ConfigError(
                f"search space: {name}.{kind} needs {'a list' if kind == 'choice' else '[low, high]'}"
            )
        if kind != "choice" and not values[0] < values[1]:
            raise ConfigError(f"search space: {name}.{kind} needs low < high, got {values}")
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(f"search space: {name}.loguniform needs positive bounds, got {values}")
        for value in values:
            try:
                base.model_copy(update={}).model_validate({**base.model_dump(), name: value})
            except Exception as exc:
                msg = str(exc).splitlines()[2].strip() if len(str(exc).splitlines()) > 2 else str(exc)
                raise ConfigError(f"search space: {name}={value!r} is invalid for {stage}: {msg}") from None


def _to_tune(space: dict[str, Any]) -> dict[str, Any]:
    from ray import tune

    make = {
        "choice": tune.choice,
        "loguniform": lambda v: tune.loguniform(*v),
        "uniform": lambda v: tune.uniform(*v),
    }
    return {name: make[next(iter(spec))](next(iter(spec.values()))) for name, spec in space.items()}


def _trial_driver(config: dict[str, Any], context: dict[str, Any]) -> None:
    """One trial: a TorchTrainer for the stage with the trial's settings, reporting to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from tgan_ray.config import build_config
    from tgan_ray.tracking import Tracker
    from tgan_ray.train.driver import build_trainer

    ctx = context
    cfg = build_config(ctx["config"])
    stage = ctx["stage"]
    stage_cfg = getattr(cfg, stage).model_copy(update=config["params"])
    stage_cfg = type(stage_cfg).model_validate(stage_cfg.model_dump())
    trial_id = ray.tune.get_context().get_trial_id()
    parent = Tracker(ctx["tracking_uri"], cfg.tracking.experiment, ctx["parent_run_id"])
    child = parent.start_child(f"{stage}-{trial_id}", tags={"stage": stage, "trial_id": trial_id})
    child.log_params({f"{stage}.{k}": v for k, v in stage_cfg.model_dump(mode="json").items()})
    loop_config = {
        "stage": stage,
        "stage_cfg": stage_cfg.model_dump(mode="json"),
        "data": ctx["data"],
        "ray": cfg.ray.model_dump(mode="json"),
        "seed": cfg.data.seed,
        "extractor": ctx["extractor"],
        "tracking": {
            "uri": child.uri,
            "experiment": child.experiment,
            "run_id": child.run_id,
            "sample_every": cfg.tracking.sample_every,
        },
    }
    trainer = build_trainer(
        stage, loop_config, cfg, f"{stage}-{trial_id}", ctx["storage_path"], callbacks=[TuneReportCallback()]
    )
    try:
        trainer.fit()
    finally:
        child.end()


def run_campaign(
    stage: str,
    images: str,
    cfg: Config,
    out: str | Path,
    num_samples: int = 4,
    scheduler: str = "asha",
    space: dict[str, Any] | None = None,
    max_concurrent: int = 1,
    driver_cpus: float = 0.25,
    log=print,
) -> CampaignResult:
    """Search ``stage``'s hyperparameters on a stack; the best trial by KID (lower is better) wins.

    Args:
        stage: "pix2pix" or "cyclegan".
        images: the stack (folder, glob, s3://).
        cfg: base config; trials override fields of ``cfg.<stage>``.
        out: campaign folder (prepared data, Ray storage, ``campaign.json``, MLflow store).
        num_samples: trials.
        scheduler: "asha" (early stopping) or "fifo".
        space: search space (see :data:`DEFAULT_SPACES`); validated before any trial starts.
        max_concurrent: trials at once. Each takes ``driver_cpus`` plus its workers' CPUs.
    """
    from tgan_ray.pipeline import Pipeline
    from tgan_ray.runtime import init_ray

    if stage not in DEFAULT_SPACES:
        raise ConfigError(f"tune --stage must be one of {', '.join(DEFAULT_SPACES)}, got {stage!r}")
    if scheduler not in ("asha", "fifo"):
        raise ConfigError(f"--scheduler must be asha or fifo, got {scheduler!r}")
    space = space if space is not None else DEFAULT_SPACES[stage]
    validate_space(stage, space, getattr(cfg, stage))
    out = Path(out).resolve()
    init_ray(cfg.ray)

    # The campaign's data come from the pipeline's own steps (resumable in <out>/prep).
    pipe = Pipeline(images, out / "prep", cfg, log=log)
    data = _campaign_data(pipe, stage)
    campaign = pipe.tracker.start_child(
        f"tune-{stage}-{out.name}", tags={"campaign": str(out), "stage": stage}
    )
    campaign.log_params({"num_samples": num_samples, "scheduler": scheduler, "space": json.dumps(space)})
    results = _fit_trials(
        stage, cfg, out, data, campaign, space, num_samples, scheduler, max_concurrent, driver_cpus
    )
    best = _best_result(results, campaign, stage)
    trials = _trial_summaries(results)
    best_params = dict(best.config["params"])
    best_score = float(best.metrics["score"])
    checkpoint = best.metrics["checkpoint_path"]
    campaign.log_metrics({"best_score": best_score})
    version = campaign.register_model(
        Path(checkpoint) / "model.pt",
        f"{cfg.tracking.registered_model}-{stage}-generator",
        {"kid_random-resnet18": best_score, **{k: v for k, v in best_params.items()}},
    )
    campaign.end()
    result = CampaignResult(
        stage, best_params, best_score, "kid_random-resnet18", checkpoint, trials, version
    )
    write_json(out / "campaign.json", result.__dict__)
    log(f"best {stage} trial: KID {best_score:.4g} with {best_params}; checkpoint {checkpoint}")
    return result


def _campaign_data(pipe, stage: str) -> dict[str, Any]:
    """The stage's training data from the pipeline's round-1 steps: pix2pix needs the rough masks and the
    prior, CycleGAN also the 1st generation (so a pix2pix too)."""
    stack = pipe.run_step("stack", pipe.step_stack)
    rough = pipe.run_step(round_step(1, "rough"), pipe.step_rough, stack, 1)
    prior = pipe.run_step(round_step(1, "prior"), pipe.step_prior, stack, rough, 1)
    if stage == "pix2pix":
        return pipe.pix2pix_data(stack, rough, prior, 1)
    p2p = pipe.run_step(round_step(1, "pix2pix"), pipe.step_pix2pix, stack, rough, prior, 1)
    gen1 = pipe.run_step(round_step(1, "gen1"), pipe.step_gen, "masks", "gen1", p2p, 1)
    return pipe.cyclegan_data(stack, gen1)


def _make_scheduler(scheduler: str, stage_cfg: Pix2PixConfig | CycleGANConfig):
    """ASHA over the stage's epochs (no trial cut before two evaluations), or FIFO (all run to the end)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    epochs = stage_cfg.epochs + stage_cfg.epochs_decay
    return (
        ASHAScheduler(
            time_attr="epoch",
            max_t=epochs,
            grace_period=min(stage_cfg.eval_every * 2, epochs),
            reduction_factor=2,
        )
        if scheduler == "asha"
        else FIFOScheduler()
    )


def _fit_trials(
    stage: str,
    cfg: Config,
    out: Path,
    data: dict[str, Any],
    campaign,
    space: dict[str, Any],
    num_samples: int,
    scheduler: str,
    max_concurrent: int,
    driver_cpus: float,
):
    """Run the campaign's trials (each a :func:`_trial_driver`) and return Tune's ``ResultGrid``."""
    from ray import tune

    from tgan_ray.train.driver import put_data, with_worker_cpus

    sched = _make_scheduler(scheduler, getattr(cfg, stage))
    # Each trial's driver takes driver_cpus; its workers share what the concurrent trials leave.
    cfg = with_worker_cpus(cfg, reserved=max_concurrent * driver_cpus, trials=max_concurrent)
    context = {
        "stage": stage,
        "config": config_to_dict(cfg),
        "data": put_data(data),
        "tracking_uri": campaign.uri,
        "parent_run_id": campaign.run_id,
        "extractor": "random-resnet18",
        "storage_path": str(out / "ray"),
    }
    tuner = tune.Tuner(
        # The context (config, data refs) travels by with_parameters, so it is neither searched nor printed.
        tune.with_resources(tune.with_parameters(_trial_driver, context=context), {"CPU": driver_cpus}),
        param_space={"params": _to_tune(space)},
        tune_config=tune.TuneConfig(
            metric="score",
            mode="min",
            scheduler=sched,
            num_samples=num_samples,
            max_concurrent_trials=max_concurrent,
        ),
        run_config=tune.RunConfig(name=f"tune-{stage}", storage_path=str(out / "tune"), verbose=0),
    )
    return tuner.fit()


def _best_result(results, campaign, stage: str):
    """The trial result with the lowest score; ends ``campaign`` as FAILED if no trial reported a checkpoint.

    Raises:
        RuntimeError: no trial reported a scored checkpoint (the first trials' errors are in the message).
    """
    best = results.get_best_result("score", "min", scope="all")
    if best is None or best.metrics is None or "checkpoint_path" not in best.metrics:
        campaign.end("FAILED")
        errors = [str(r.error).splitlines()[0] for r in results if r.error]
        raise RuntimeError(
            f"no trial of the {stage} campaign reported a scored checkpoint; errors: {errors[:3]}"
        )
    return best


def _trial_summaries(results) -> list[dict[str, Any]]:
    """One row per trial: its id, its best score, its error (if any) and its settings."""
    # Each trial's best scored report (Result.metrics is only its last one, which ASHA may have cut short).
    trials = []
    for r in results:
        scored = [
            m
            for m in (r.metrics_dataframe.to_dict("records") if r.metrics_dataframe is not None else [])
            if m.get("score") is not None
        ] or ([r.metrics] if r.metrics and "score" in r.metrics else [])
        best_row = min(scored, key=lambda m: m["score"]) if scored else {}
        trials.append(
            {
                "trial_id": (r.metrics or {}).get("trial_id"),
                "score": best_row.get("score"),
                "error": str(r.error).splitlines()[0] if r.error else None,
                **r.config["params"],
            }
        )
    return trials


def tuned_overrides(campaign_dir: str | Path) -> dict[str, Any]:
    """Dotted config overrides (``pix2pix.lr_g`` ...) from a finished campaign's ``campaign.json``."""
    path = Path(campaign_dir) / "campaign.json"
    if not path.is_file():
        raise ConfigError(
            f"no campaign.json in {campaign_dir}: run `tgan tune ... --out {campaign_dir}` first"
        )
    result = json.loads(path.read_text())
    return {f"{result['stage']}.{k}": v for k, v in result["best_overrides"].items()}
